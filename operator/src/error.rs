//! The operator's error type. Each variant has a [`reason`](Error::reason) (CamelCase: event
//! reasons and the `Degraded` condition) and a [`kind`](Error::kind) (snake_case: the `error`
//! label of `streamops_operator_reconcile_failures_total`).

use kube::runtime::finalizer;
use streamops_crds::config::ConfigError;
use streamops_crds::SpecError;

use crate::consumer_group::GroupDeleteError;

/// A failed reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks metadata the API server always sets (name, namespace, uid).
    #[error("the object has no metadata.{0}")]
    MissingMetadata(&'static str),

    /// The spec is invalid. The reconciler reports this through the `Degraded` condition and never
    /// returns it; it only surfaces if the worker configuration rejects a spec that validation
    /// accepted.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),

    /// The worker configuration could not be rendered.
    #[error("cannot render the worker configuration: {0}")]
    RenderConfig(#[source] ConfigError),

    /// Reading a child failed.
    #[error("cannot read {kind} {name}: {source}")]
    GetChild {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Server-side apply of a child failed.
    #[error("cannot apply {kind} {name}: {source}")]
    ApplyChild {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A child's name is taken by an object this StreamConsumer does not control.
    #[error("{kind} {name} exists and is not controlled by this StreamConsumer")]
    ChildConflict {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
    },

    /// A child changed between the read that checked its ownership and the write (another writer
    /// replaced or deleted it): nothing was written; the next pass reads it again.
    #[error("{kind} {name} changed while it was being written (another writer); nothing was written, it is read again")]
    ChildChanged {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
    },

    /// Listing children for orphan cleanup failed.
    #[error("cannot list {kind} objects: {source}")]
    ListChildren {
        /// Kind of the children.
        kind: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Deleting a child failed.
    #[error("cannot delete {kind} {name}: {source}")]
    DeleteChild {
        /// Kind of the child.
        kind: String,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// The status patch failed.
    #[error("cannot patch the status: {0}")]
    PatchStatus(#[source] kube::Error),

    /// Writing the autoscaled count into `spec.replicas` failed.
    #[error("cannot patch spec.replicas: {0}")]
    PatchReplicas(#[source] kube::Error),

    /// Deleting the consumer group failed (retried with backoff until the cleanup deadline).
    #[error("cannot delete consumer group {group}: {source}")]
    ConsumerGroupCleanup {
        /// The consumer group.
        group: String,
        /// What went wrong.
        #[source]
        source: GroupDeleteError,
    },

    /// Removing the finalizer of an object that cannot be parsed failed.
    #[error("cannot remove the finalizer of a malformed object: {0}")]
    MalformedObjectFinalizer(#[source] kube::Error),

    /// Adding or removing the finalizer failed, or the wrapped Apply or Cleanup failed.
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

/// Result of the operator's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// CamelCase reason: the reason of the failure event and of the `Degraded` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingMetadata(_) => "MissingMetadata",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::RenderConfig(_) => "RenderFailed",
            Self::GetChild { .. } => "ReadFailed",
            Self::ApplyChild { .. } => "ApplyFailed",
            Self::ChildConflict { .. } => "ChildConflict",
            Self::ChildChanged { .. } => "ChildChanged",
            Self::ListChildren { .. } => "ListFailed",
            Self::DeleteChild { .. } => "DeleteFailed",
            Self::PatchStatus(_) => "StatusPatchFailed",
            Self::PatchReplicas(_) => "ReplicasPatchFailed",
            Self::ConsumerGroupCleanup { .. } => "ConsumerGroupCleanupFailed",
            Self::MalformedObjectFinalizer(_) => "RemoveFinalizerFailed",
            Self::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.reason()
                }
                finalizer::Error::AddFinalizer(_) => "AddFinalizerFailed",
                finalizer::Error::RemoveFinalizer(_) => "RemoveFinalizerFailed",
                finalizer::Error::UnnamedObject => "MissingMetadata",
                finalizer::Error::InvalidFinalizer => "InvalidFinalizer",
            },
        }
    }

    /// snake_case label of `streamops_operator_reconcile_failures_total{error=...}`.
    pub fn kind(&self) -> String {
        snake_case(self.reason())
    }
}

/// `CamelCase` to `snake_case`: metric labels from reasons.
pub(crate) fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("boom", "InternalError")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn kind_is_the_snake_case_of_the_reason() {
        let e = Error::ApplyChild {
            kind: "Deployment".into(),
            name: "x".into(),
            source: api_error(500),
        };
        assert_eq!(e.reason(), "ApplyFailed");
        assert_eq!(e.kind(), "apply_failed");
    }

    #[test]
    fn finalizer_errors_are_labelled_by_the_wrapped_error() {
        let inner = Error::PatchStatus(api_error(500));
        let e = Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(inner)));
        assert_eq!(e.reason(), "StatusPatchFailed");
        assert_eq!(e.kind(), "status_patch_failed");
        let e = Error::Finalizer(Box::new(finalizer::Error::AddFinalizer(api_error(409))));
        assert_eq!(e.kind(), "add_finalizer_failed");
    }
}
