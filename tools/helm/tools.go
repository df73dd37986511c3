//go:build tools

// Package tools pins the helm main package built by scripts/cluster-build.sh.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
