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
//! The RBAC the operator needs is listed in `operator/RBAC.md`.

pub mod autoscale;
pub mod build;
pub mod cli;
pub mod consumer_group;
pub mod error;
pub mod http;
pub mod lag;
pub mod lag_book;
pub mod lag_clients;
pub mod lag_poller;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod validation;

#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};
pub use reconcile::{
    error_policy, reconcile, Context, OperatorConfig, ReplicaDecider, SpecReplicas,
};
