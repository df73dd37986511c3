# A real Kubernetes control plane for the tests (issue 12), built from Go modules: etcd,
# kube-apiserver and kube-controller-manager on loopback, plus kubectl and helm. Included by the
# top-level Makefile (`-include mk/cluster.mk`). Versions come from versions.env.
#
#   make cluster-build    build the binaries once per version into $STREAMOPS_CACHE/bin
#   make cluster-up       start the control plane (idempotent); admin kubeconfig .dev/cluster/kubeconfig
#   make cluster-down     stop only what cluster-up started
#   make test-cluster     only the operator's tests against it

.PHONY: cluster-build cluster-up cluster-down test-cluster

cluster-build: ## Build kube-apiserver, kube-controller-manager, kubectl, etcd and helm from Go modules (cached)
	bash scripts/cluster-build.sh

cluster-up: ## Start the local control plane (etcd, kube-apiserver, kube-controller-manager)
	bash scripts/cluster-up.sh

cluster-down: ## Stop the local control plane started by cluster-up
	bash scripts/cluster-down.sh

test-cluster: cluster-up ## Operator integration tests against the local control plane
	$(CARGO) build -p streamops-operator --bins
	$(CARGO) test -p streamops-operator --test cluster --no-fail-fast
