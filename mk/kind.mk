# streamops packaging: container images, a kind cluster, Helm deploy with the dev stack and the
# end-to-end test. Included by the top-level Makefile (`-include mk/kind.mk`), which also owns
# `validate` (scripts/validate_manifests.py) and the venv it runs in.
#
#   make manifests                 regenerate manifests/install.yaml and the chart README table
#   make kind-up images kind-load deploy e2e
#   make kind-down
#
# Everything can be overridden on the command line, e.g. `make images IMAGE_TAG=dev`.

# Evaluated once (not on every reference) unless given.
ifndef STREAMOPS_VERSION
STREAMOPS_VERSION := $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
endif
IMAGE_REGISTRY ?= ghcr.io/streamops
IMAGE_TAG ?= $(STREAMOPS_VERSION)
OPERATOR_IMAGE_REPO ?= $(IMAGE_REGISTRY)/streamops-operator
WORKER_IMAGE_REPO ?= $(IMAGE_REGISTRY)/streamops-worker
OPERATOR_IMAGE ?= $(OPERATOR_IMAGE_REPO):$(IMAGE_TAG)
WORKER_IMAGE ?= $(WORKER_IMAGE_REPO):$(IMAGE_TAG)
# Extra flags for `docker buildx build`, e.g. --platform linux/arm64 or --no-cache.
DOCKER_BUILD_FLAGS ?=
ifndef IMAGE_REVISION
IMAGE_REVISION := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
endif
IMAGE_SOURCE ?= https://github.com/streamops/streamops

KIND_CLUSTER ?= streamops
KIND_CONFIG ?= kind-config.yaml
# Empty: the node image pinned in kind-config.yaml.
KIND_NODE_IMAGE ?=
KUBE_CONTEXT ?= kind-$(KIND_CLUSTER)
HELM_RELEASE ?= streamops
HELM_NAMESPACE ?= streamops-system
DEV_NAMESPACE ?= streamops-dev
KIND_WAIT ?= 300s
# The chart's name for the operator Deployment: <fullname>-operator.
OPERATOR_DEPLOYMENT ?= $(if $(findstring streamops,$(HELM_RELEASE)),$(HELM_RELEASE),$(HELM_RELEASE)-streamops)-operator

# The top-level Makefile's venv (VENV) and its requirements stamp.
VALIDATE_VENV ?= $(or $(VENV),.dev/venv)

# The dev stack's manifests name the worker image of the workspace version; `deploy` rewrites it
# to $(WORKER_IMAGE), so IMAGE_TAG/IMAGE_REGISTRY overrides reach the dev stack too.
DEV_WORKER_IMAGE := ghcr.io/streamops/streamops-worker:$(STREAMOPS_VERSION)

KUBECTL_KIND = kubectl --context $(KUBE_CONTEXT)

# $(call require-tool,TOOL,WHY,HOW): fail with a clear message when TOOL is not on PATH.
define require-tool
@command -v $(1) >/dev/null 2>&1 || { \
  echo "error: '$(1)' is required $(2) but was not found on PATH."; \
  echo "       Install it: $(3)"; exit 1; }
endef

# $(call require-cluster): fail unless the kind cluster exists and its context answers.
define require-cluster
@kind get clusters 2>/dev/null | grep -x '$(KIND_CLUSTER)' >/dev/null || { \
  echo "error: kind cluster '$(KIND_CLUSTER)' does not exist; run 'make kind-up' first."; exit 1; }
@$(KUBECTL_KIND) version >/dev/null 2>&1 || { \
  echo "error: kubectl context '$(KUBE_CONTEXT)' does not answer; is the cluster running?"; exit 1; }
endef

DOCKER_HOW := https://docs.docker.com/engine/install/ (with the buildx plugin)
KIND_HOW := https://kind.sigs.k8s.io/docs/user/quick-start/\#installation (v0.29.0 or newer)
HELM_HOW := https://helm.sh/docs/intro/install/ (v3.8 or newer)
KUBECTL_HOW := https://kubernetes.io/docs/tasks/tools/

.PHONY: manifests kind-tools kind-up images kind-load deploy dev-stack dev-topics dev-reset e2e kind-down

manifests: $(VALIDATE_VENV)/.installed ## Regenerate manifests/install.yaml and the chart README table
	$(VALIDATE_VENV)/bin/python scripts/validate_manifests.py --write

kind-tools:
	$(call require-tool,docker,for kind,$(DOCKER_HOW))
	$(call require-tool,kind,to run a local cluster,$(KIND_HOW))
	$(call require-tool,kubectl,to talk to the cluster,$(KUBECTL_HOW))

kind-up: kind-tools ## Create the kind cluster (control plane + 2 workers) unless it exists
	@docker info >/dev/null 2>&1 || { echo "error: the Docker daemon is not reachable (docker info failed)."; exit 1; }
	@if kind get clusters 2>/dev/null | grep -x '$(KIND_CLUSTER)' >/dev/null; then \
	  echo "kind cluster '$(KIND_CLUSTER)' already exists"; \
	else \
	  kind create cluster --name $(KIND_CLUSTER) --config $(KIND_CONFIG) $(if $(KIND_NODE_IMAGE),--image $(KIND_NODE_IMAGE)) --wait 120s; \
	fi
	$(KUBECTL_KIND) get nodes -o wide

images: ## Build the operator and worker images (tag IMAGE_TAG, default: Cargo version)
	$(call require-tool,docker,to build the images,$(DOCKER_HOW))
	@docker buildx version >/dev/null 2>&1 || { \
	  echo "error: 'docker buildx' is required (BuildKit cache mounts): $(DOCKER_HOW)"; exit 1; }
	@test -n "$(IMAGE_TAG)" || { echo "error: IMAGE_TAG is empty (no version in Cargo.toml?)"; exit 1; }
	docker buildx build --load --provenance=false -f docker/operator.Dockerfile \
	  --build-arg VERSION=$(STREAMOPS_VERSION) --build-arg REVISION=$(IMAGE_REVISION) \
	  --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) --build-arg SOURCE=$(IMAGE_SOURCE) \
	  $(DOCKER_BUILD_FLAGS) -t $(OPERATOR_IMAGE) .
	docker buildx build --load --provenance=false -f docker/worker.Dockerfile \
	  --build-arg VERSION=$(STREAMOPS_VERSION) --build-arg REVISION=$(IMAGE_REVISION) \
	  --build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) --build-arg SOURCE=$(IMAGE_SOURCE) \
	  $(DOCKER_BUILD_FLAGS) -t $(WORKER_IMAGE) .

# Falls back to a single-platform archive when `kind load docker-image` fails (Docker's containerd
# image store, kind issue #3795).
kind-load: kind-tools ## Load both images into the kind cluster
	$(require-cluster)
	@for image in $(OPERATOR_IMAGE) $(WORKER_IMAGE); do \
	  docker image inspect $$image >/dev/null 2>&1 || { echo "error: image $$image is not built; run 'make images'."; exit 1; }; \
	  if ! kind load docker-image $$image --name $(KIND_CLUSTER); then \
	    echo "kind load docker-image failed; retrying through a single-platform archive"; \
	    mkdir -p .dev && \
	    docker image save --platform "$$(docker version -f '{{.Server.Os}}/{{.Server.Arch}}')" -o .dev/kind-image.tar $$image && \
	    kind load image-archive .dev/kind-image.tar --name $(KIND_CLUSTER) && rm -f .dev/kind-image.tar || exit 1; \
	  fi; \
	done

deploy: kind-tools ## helm upgrade --install the operator (local images), then the dev stack
	$(call require-tool,helm,to install the chart,$(HELM_HOW))
	$(require-cluster)
	@# Helm installs crds/ only on first install and never upgrades them: apply the CRD first.
	$(KUBECTL_KIND) apply --server-side --force-conflicts -f charts/streamops/crds/streamconsumer.yaml
	$(KUBECTL_KIND) wait --for=condition=Established crd/streamconsumers.streamops.dev --timeout=60s
	helm upgrade --install $(HELM_RELEASE) charts/streamops --kube-context $(KUBE_CONTEXT) \
	  --namespace $(HELM_NAMESPACE) --create-namespace \
	  --set image.repository=$(OPERATOR_IMAGE_REPO) --set-string image.tag=$(IMAGE_TAG) \
	  --set image.pullPolicy=IfNotPresent \
	  --set worker.image.repository=$(WORKER_IMAGE_REPO) --set-string worker.image.tag=$(IMAGE_TAG) \
	  --set logFormat=text --wait --timeout 5m \
	  --set-json 'lag.brokers=[{"name":"dev","bootstrapServers":["kafka.$(DEV_NAMESPACE):9092"]}]'
	@$(MAKE) --no-print-directory dev-stack

dev-stack: ## Apply manifests/dev/ to kind, wait for it, create the topics
	$(require-cluster)
	@for f in $(filter-out manifests/dev/60-topics.yaml,$(sort $(wildcard manifests/dev/*.yaml))); do \
	  echo '---'; sed 's#$(DEV_WORKER_IMAGE)#$(WORKER_IMAGE)#g' "$$f"; \
	done | $(KUBECTL_KIND) apply -f -
	@for d in kafka postgres redis scorer webhook-sink; do \
	  $(KUBECTL_KIND) -n $(DEV_NAMESPACE) rollout status deploy/$$d --timeout=$(KIND_WAIT) || exit 1; \
	done
	@$(MAKE) --no-print-directory dev-topics

dev-topics: ## (Re)create the example topics on kind (after the broker pod was recreated)
	$(require-cluster)
	$(KUBECTL_KIND) -n $(DEV_NAMESPACE) delete job create-topics --ignore-not-found --wait=true
	sed 's#$(DEV_WORKER_IMAGE)#$(WORKER_IMAGE)#g' manifests/dev/60-topics.yaml | $(KUBECTL_KIND) apply -f -
	$(KUBECTL_KIND) -n $(DEV_NAMESPACE) wait --for=condition=Complete job/create-topics --timeout=$(KIND_WAIT)

# The broker keeps its log on an emptyDir and PostgreSQL keeps the consumers' offsets: after the
# broker pod is recreated the two disagree, so reset them together.
dev-reset: ## Restart the whole kind dev stack with empty state, then recreate the topics
	$(require-cluster)
	$(KUBECTL_KIND) -n $(DEV_NAMESPACE) rollout restart deploy/kafka deploy/postgres deploy/redis deploy/webhook-sink
	@for d in kafka postgres redis webhook-sink; do \
	  $(KUBECTL_KIND) -n $(DEV_NAMESPACE) rollout status deploy/$$d --timeout=$(KIND_WAIT) || exit 1; \
	done
	@$(MAKE) --no-print-directory dev-topics

e2e: ## End-to-end test on kind (scripts/e2e-kind.sh)
	$(call require-tool,kubectl,to talk to the cluster,$(KUBECTL_HOW))
	$(call require-tool,kind,to check the cluster,$(KIND_HOW))
	$(require-cluster)
	KUBE_CONTEXT=$(KUBE_CONTEXT) WORKER_IMAGE=$(WORKER_IMAGE) DEV_NAMESPACE=$(DEV_NAMESPACE) \
	  OPERATOR_NAMESPACE=$(HELM_NAMESPACE) OPERATOR_DEPLOYMENT=$(OPERATOR_DEPLOYMENT) \
	  scripts/e2e-kind.sh

kind-down: ## Delete the kind cluster
	$(call require-tool,kind,to delete the cluster,$(KIND_HOW))
	kind delete cluster --name $(KIND_CLUSTER)
