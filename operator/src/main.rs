use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use streamops_operator::cli::{Cli, Command, LagArgs};
use streamops_operator::lag::{render, KafkaLagReader, LagReader};
use streamops_operator::{run, telemetry};

/// The operator's heap is mostly short-lived: every reconciliation deserializes the objects it
/// reads and serializes the ones it writes, on whichever runtime thread runs it. glibc gives every
/// thread that allocates its own arena (up to 8 per core) and rarely returns their freed pages, so
/// the same live heap costs far more resident memory; one arena, as in the worker, keeps the
/// leader's peak RSS down (DEVELOPERS.md, "Scale bench"). An operator-set `MALLOC_ARENA_MAX`
/// wins. Must run before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes the allocator's tuning; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run_cli()),
        Err(e) => {
            eprintln!("streamops-operator: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_cli() -> ExitCode {
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
