# The user's path without Docker (issue 16): the local control plane, the test-only local node
# (localnode/, pods run as processes) and the chart installed by helm. Included by the top-level
# Makefile (`-include mk/local.mk`). Test tooling, not product.
#
#   make deploy-local      dev-up + cluster-up + build + local node + helm install; leaves it running
#   make local-down        stop the local node (and its pods' processes) and the control plane
#   make e2e-local         deploy-local, then scripts/e2e-kind.sh against it (full form)
#   make e2e-local-short   the same steps with fewer events and shorter waits (CI)

.PHONY: localnode-build deploy-local local-down e2e-local e2e-local-short

localnode-build:
	$(CARGO) build -p streamops-operator -p streamops-worker -p streamops-localnode --bins

deploy-local: dev-up cluster-build localnode-build ## Local cluster + local node + helm install of the chart; leaves it running
	bash scripts/local.sh deploy

local-down: ## Stop the local node (its pods' processes first) and the local control plane
	bash scripts/local.sh down

e2e-local: deploy-local ## End-to-end test on the local cluster (scripts/e2e-kind.sh, E2E_MODE=local)
	E2E_MODE=local scripts/e2e-kind.sh

e2e-local-short: deploy-local ## Short form of e2e-local (CI)
	E2E_MODE=local E2E_SHORT=1 scripts/e2e-kind.sh
