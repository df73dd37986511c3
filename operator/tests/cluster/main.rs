//! The operator, its CRD and its Helm chart against a real Kubernetes control plane: etcd,
//! kube-apiserver and kube-controller-manager built from Go modules (scripts/cluster-build.sh) and
//! started on loopback by scripts/cluster-up.sh, which these tests run (or reuse). If the control
//! plane cannot start, every test fails with the reason. `make test` builds the binaries first.
//!
//!   cargo test -p streamops-operator --test cluster
//!
//! Each test works in its own namespace, printed with its objects and events when it fails; the
//! operator runs as a subprocess under the Helm chart's ServiceAccount (TokenRequest token), so its
//! RBAC is the chart's, not the admin's.

mod harness;
use streamops_test_support::kafka;

mod helm;
mod leader;
mod lifecycle;
mod security;
mod service;
mod validation;
