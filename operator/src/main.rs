use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use streamops_operator::cli::{Cli, Command, LagArgs};
use streamops_operator::lag::{render, KafkaLagReader, LagReader};
use streamops_operator::{run, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            if let Err(e) = telemetry::init(args.log_format) {
                eprintln!("streamops-operator: cannot initialise logging: {e}");
                return ExitCode::FAILURE;
            }
            match run::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "the operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Lag(args) => lag(&args).await,
    }
}

/// `streamops-operator lag`: the figures on stdout, an error on stderr and exit code 1.
async fn lag(args: &LagArgs) -> ExitCode {
    let target = args.target();
    let reader = KafkaLagReader::with_timeout(Duration::from_secs(args.timeout_seconds.max(1)));
    match reader.read(&target).await {
        Ok(lag) => {
            print!("{}", render(&target, &lag));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "streamops-operator lag: cannot read the lag of group {}: {e}",
                target.group_id
            );
            ExitCode::FAILURE
        }
    }
}
