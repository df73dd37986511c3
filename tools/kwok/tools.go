//go:build tools

// Package tools pins the kwok main package built by scripts/cluster-build.sh.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
