#!/usr/bin/env bash
# Build the local control plane's binaries from Go modules, once per version, into
#   $STREAMOPS_CACHE/bin/kubernetes-<v>/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
#   $STREAMOPS_CACHE/bin/etcd-<v>/etcd
#   $STREAMOPS_CACHE/bin/helm-<v>/helm
# through the wrapper modules in tools/ (their go.sum files make the builds reproducible). A binary
# already in the cache is not rebuilt. One log per binary in $STREAMOPS_CACHE/logs/build-<binary>-<v>.log.
#
#   scripts/cluster-build.sh                  build what is missing
#   scripts/cluster-build.sh etcd helm        only these components (kubernetes, etcd, helm)
#   scripts/cluster-build.sh --print          print the cached binary paths (KEY=path), building nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../versions.env
source "$ROOT/versions.env"

K8S_DIR="$STREAMOPS_CACHE/bin/kubernetes-$KUBERNETES_VERSION"
ETCD_DIR="$STREAMOPS_CACHE/bin/etcd-$ETCD_VERSION"
HELM_DIR="$STREAMOPS_CACHE/bin/helm-$HELM_VERSION"
LOG_DIR="$STREAMOPS_CACHE/logs"

if [[ "${1:-}" == "--print" ]]; then
  echo "KUBE_APISERVER=$K8S_DIR/kube-apiserver"
  echo "KUBE_CONTROLLER_MANAGER=$K8S_DIR/kube-controller-manager"
  echo "KUBE_SCHEDULER=$K8S_DIR/kube-scheduler"
  echo "KUBECTL=$K8S_DIR/kubectl"
  echo "ETCD=$ETCD_DIR/etcd"
  echo "HELM=$HELM_DIR/helm"
  exit 0
fi

COMPONENTS=("$@")
[[ ${#COMPONENTS[@]} -gt 0 ]] || COMPONENTS=(kubernetes etcd helm)
wanted() { [[ " ${COMPONENTS[*]} " == *" $1 "* ]]; }

command -v go >/dev/null || { echo "cluster-build: go is missing (Go >= 1.26 is needed to build the control plane)" >&2; exit 1; }
mkdir -p "$K8S_DIR" "$ETCD_DIR" "$HELM_DIR" "$LOG_DIR"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false"

# build BINARY VERSION MODULE_DIR OUT PACKAGE TAGS LDFLAGS
build() {
  local bin="$1" version="$2" moddir="$3" out="$4" pkg="$5" tags="$6" ldflags="$7"
  if [[ -x "$out" ]]; then
    echo "cluster-build: $bin $version cached at $out"
    return 0
  fi
  local log="$LOG_DIR/build-$bin-$version.log"
  echo "cluster-build: building $bin $version from $pkg (log: $log)"
  local start=$SECONDS
  # Build to a temporary name and rename, so that an interrupted build never leaves a binary that
  # looks cached.
  if ! (cd "$moddir" && {
    echo "# $(date -u +%FT%TZ) go build $pkg ($bin $version) in $moddir"
    go version
    set -x
    go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out.tmp.$$" "$pkg"
  }) >"$log" 2>&1; then
    rm -f "$out.tmp.$$"
    echo "cluster-build: FAILED to build $bin $version (step: go build $pkg in ${moddir#"$ROOT"/}); log: $log" >&2
    tail -n 20 "$log" >&2
    return 1
  fi
  mv "$out.tmp.$$" "$out"
  local took=$((SECONDS - start))
  echo "# built in ${took}s" >>"$log"
  echo "cluster-build: built $bin $version in ${took}s"
}

# Kubernetes: version ldflags as hack/lib/version.sh sets them, so that the servers and kubectl report
# the real version (helm's capabilities read it from the apiserver).
K8S_MAJOR="${KUBERNETES_VERSION%%.*}"
K8S_MINOR="${KUBERNETES_VERSION#*.}"
K8S_MINOR="${K8S_MINOR%%.*}"
k8s_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=v$KUBERNETES_VERSION -X $p.gitMajor=$K8S_MAJOR -X $p.gitMinor=$K8S_MINOR -X $p.gitTreeState=clean"
done
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  wanted kubernetes || continue
  build "$b" "$KUBERNETES_VERSION" "$ROOT/tools/k8s" "$K8S_DIR/$b" "k8s.io/kubernetes/cmd/$b" "selinux,notest" "$k8s_ldflags"
done

wanted etcd && build etcd "$ETCD_VERSION" "$ROOT/tools/etcd" "$ETCD_DIR/etcd" "go.etcd.io/etcd/server/v3" "" "-s -w"

# helm: its Makefile derives the default KubeVersion from the k8s.io/client-go version in its go.mod.
if ! wanted helm; then
  :
elif [[ ! -x "$HELM_DIR/helm" ]]; then
  client_go="$(cd "$ROOT/tools/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)" # v0.37.0
  client_minor="${client_go#v0.}"
  client_minor="${client_minor%%.*}"
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$client_minor"
  done
  build helm "$HELM_VERSION" "$ROOT/tools/helm" "$HELM_DIR/helm" "helm.sh/helm/v3/cmd/helm" "" "$helm_ldflags"
else
  echo "cluster-build: helm $HELM_VERSION cached at $HELM_DIR/helm"
fi
