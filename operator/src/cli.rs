//! Command line. The flag and environment-variable names are a contract with the Helm chart.

use std::net::SocketAddr;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// Worker image used when a StreamConsumer sets no `spec.image`.
pub const DEFAULT_WORKER_IMAGE: &str = "ghcr.io/streamops/streamops-worker:0.1.0";

/// The streamops operator.
#[derive(Debug, Parser)]
#[command(name = "streamops-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(RunArgs),
}

/// `streamops-operator run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces). An empty value means all.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Worker image for StreamConsumers without spec.image.
    #[arg(long, env = "STREAMOPS_WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    pub worker_image: String,

    /// Run the controller only while holding the leader Lease (default: true).
    #[arg(
        long = "leader-election",
        env = "STREAMOPS_LEADER_ELECTION",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "true",
        default_missing_value = "true",
        overrides_with = "no_leader_election"
    )]
    pub leader_election: bool,

    /// Run the controller without leader election (one operator replica only).
    #[arg(long = "no-leader-election", overrides_with = "leader_election")]
    pub no_leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, default_value = "streamops-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Log format.
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The namespace to watch; `None` for all.
    pub fn watch_namespace(&self) -> Option<&str> {
        self.namespace
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
    }

    /// Whether leader election is on.
    pub fn leader_election(&self) -> bool {
        self.leader_election && !self.no_leader_election
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RunArgs {
        let mut argv = vec!["streamops-operator", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(r) => r,
        }
    }

    // Environment variables are process-wide: every assertion that depends on them is here, so
    // no other test races with it.
    #[test]
    fn flags_environment_and_defaults() {
        for var in [
            "WATCH_NAMESPACE",
            "STREAMOPS_WORKER_IMAGE",
            "STREAMOPS_LEADER_ELECTION",
            "POD_NAMESPACE",
        ] {
            std::env::remove_var(var);
        }
        let r = run(&[]);
        assert_eq!(r.watch_namespace(), None);
        assert_eq!(r.worker_image, "ghcr.io/streamops/streamops-worker:0.1.0");
        assert!(r.leader_election());
        assert_eq!(r.lease_name, "streamops-operator");
        assert_eq!(r.lease_namespace, None);
        assert_eq!(r.metrics_listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(r.log_format, LogFormat::Json);

        let r = run(&[
            "--namespace",
            "team-a",
            "--worker-image",
            "w:2",
            "--no-leader-election",
            "--lease-name",
            "l",
            "--lease-namespace",
            "ops",
            "--metrics-listen",
            "127.0.0.1:9000",
            "--log-format",
            "text",
        ]);
        assert_eq!(r.watch_namespace(), Some("team-a"));
        assert_eq!(r.worker_image, "w:2");
        assert!(!r.leader_election());
        assert_eq!(r.lease_name, "l");
        assert_eq!(r.lease_namespace.as_deref(), Some("ops"));
        assert_eq!(r.log_format, LogFormat::Text);

        assert!(run(&["--leader-election"]).leader_election());
        assert!(!run(&["--leader-election=false"]).leader_election());
        assert!(run(&["--no-leader-election", "--leader-election"]).leader_election());

        std::env::set_var("WATCH_NAMESPACE", "team-b");
        std::env::set_var("STREAMOPS_WORKER_IMAGE", "w:3");
        std::env::set_var("STREAMOPS_LEADER_ELECTION", "false");
        std::env::set_var("POD_NAMESPACE", "streamops-system");
        let r = run(&[]);
        assert_eq!(r.watch_namespace(), Some("team-b"));
        assert_eq!(r.worker_image, "w:3");
        assert!(!r.leader_election());
        assert_eq!(r.lease_namespace.as_deref(), Some("streamops-system"));
        assert!(
            run(&["--leader-election"]).leader_election(),
            "the flag beats the environment"
        );

        std::env::set_var("WATCH_NAMESPACE", "");
        assert_eq!(
            run(&[]).watch_namespace(),
            None,
            "empty means all namespaces"
        );
        for var in [
            "WATCH_NAMESPACE",
            "STREAMOPS_WORKER_IMAGE",
            "STREAMOPS_LEADER_ELECTION",
            "POD_NAMESPACE",
        ] {
            std::env::remove_var(var);
        }
    }

    #[test]
    fn unknown_log_format_is_rejected() {
        assert!(Cli::try_parse_from(["streamops-operator", "run", "--log-format", "xml"]).is_err());
    }
}
