//! The streamops operator: reconciles `StreamConsumer` resources into worker Deployments.
//!
//! - [`build`]: pure `build_*` functions, one per child object, from a [`build::BuildContext`].
//! - [`reconcile`]: the controller: finalizer, server-side apply of the children, orphan cleanup,
//!   status, events, per-object error backoff.
//! - [`status`]: the `Ready`, `Progressing` and `Degraded` conditions, computed from the worker
//!   Deployment.
//! - [`validation`]: the reconciler's second look at a spec (names, `validate_spec`, CEL rules).
//! - [`consumer_group`]: deletion of the consumer group on cleanup, behind a trait.
//! - [`lag`]: consumer-group lag from the brokers (one OffsetFetch per group, ListOffsets per
//!   leader), behind the [`lag::LagReader`] trait; [`lag_poller`] reads it on each object's
//!   interval into the [`lag_book`], which is the [`ReplicaDecider`] of the reconciler;
//!   [`autoscale`] is the pure scale decision.
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`metrics`], [`http`], [`telemetry`], [`cli`], [`run`]: the process around the controller.
//!
//! # How the lag code fits together
//!
//! Lag flows one way, from the brokers to the reconciler, and the reconciler never waits for it.
//! [`lag`] reads a consumer group's lag (a [`lag::LagReader`]: committed offsets against high
//! watermarks, a fixed handful of requests per reading). [`lag_poller`] runs inside the
//! controller, so only on the leader: it walks the controller's store, reads each StreamConsumer on
//! its own interval (`spec.autoscaling.pollIntervalSeconds`, else `--lag-interval`), sets the lag
//! metrics, and records every reading, or its failure, in the [`lag_book`]. Recording is where the
//! decider runs: [`lag_book::LagBook::record`] calls the pure [`autoscale::decide`] with the
//! object's scale policy, the reading, the current replica count and the
//! [`autoscale::ScaleHistory`] the book keeps for that object, and keeps the decided count (and
//! the decision, until it has been announced). When a reading matters (the decided count changed,
//! the lag became readable or unreadable, or the figures changed and the status is getting old),
//! the poller asks the controller to reconcile the object. The [`reconcile`]r then asks the book,
//! its [`ReplicaDecider`], for the replicas to apply, the lag for the status, and the decision to
//! announce as an event. Without `spec.autoscaling` the book carries only the lag, and the replicas
//! are `spec.replicas`.
//!
//! Brokers the operator's admin did not allow are never contacted: the lag of such a
//! StreamConsumer comes from its own workers' reports instead ([`lag_workers`]), and the
//! `LagAvailable` condition says which source it came from.
//!
//! The RBAC the operator needs is listed in `operator/RBAC.md`.

pub mod autoscale;
pub mod brokers;
pub mod build;
pub mod children;
pub mod cli;
pub mod consumer_group;
pub mod error;
pub mod http;
pub mod lag;
pub mod lag_book;
pub mod lag_clients;
pub mod lag_poller;
pub mod lag_workers;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod ownership;
pub mod policy;
pub mod reconcile;
pub mod replay;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod validation;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod secret_scan_tests;

pub use error::{Error, Result};
pub use reconcile::{
    error_policy, reconcile, Context, OperatorConfig, ReplicaDecider, SpecReplicas,
};
