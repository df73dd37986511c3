use std::process::ExitCode;

use clap::Parser;
use streamops_operator::cli::{Cli, Command};
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
    }
}
