//go:build tools

// Package tools pins the etcd server main package built by scripts/cluster-build.sh.
package tools

import _ "go.etcd.io/etcd/server/v3"
