//! `streamops-chaos`: the fault-injection suite. See `scenarios` for what it proves and how.

mod fleet;
mod proxy;
mod scenarios;
mod stack;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use streamops_crds::HandlerKind;
use streamops_worker::cli::KindArg;
use streamops_worker::worker::wait_for_signal;

use scenarios::{Profile, Row, RunProfile, Scenario};

/// Runs the worker under faults and reconciles every message produced against what came out.
#[derive(Debug, Parser)]
#[command(name = "streamops-chaos", version)]
struct Args {
    /// `short` fits in CI; `full` is the on-demand suite (1,000,000 messages, 30 s outages).
    #[arg(long, value_enum, default_value = "short")]
    profile: Profile,
    /// Scenarios to run (default: all).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Handlers to run (default: every handler a scenario applies to).
    #[arg(long = "handler", value_enum)]
    handlers: Vec<KindArg>,
    /// Messages per lane for every scenario, instead of the profile's counts.
    #[arg(long, value_parser = clap::value_parser!(u64).range(100..))]
    messages: Option<u64>,
    /// The worker binary.
    #[arg(long, default_value = "target/release/streamops-worker")]
    worker_bin: PathBuf,
    /// Scratch directory for logs and configurations.
    #[arg(long, default_value = ".dev/chaos")]
    dir: PathBuf,
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<14} {:<17} {:>9} {:>6} {:>10} {:>10} {:<6} notes",
        "scenario", "handler", "messages", "lost", "duplicated", "recovery", "result"
    );
    for r in rows {
        let recovery = r
            .recovery
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<17} {:>9} {:>6} {:>10} {:>10} {:<6} {}",
            r.scenario,
            r.handler.as_str(),
            r.messages,
            r.lost,
            r.duplicated,
            recovery,
            if r.passed { "PASS" } else { "FAIL" },
            r.notes.join("; ")
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "streamops_chaos=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.worker_bin.exists() {
        eprintln!(
            "streamops-chaos: {} does not exist: build it first (make chaos does)",
            args.worker_bin.display()
        );
        return ExitCode::FAILURE;
    }
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let run = RunProfile {
        profile: args.profile,
        messages: args.messages,
    };
    let only: Vec<HandlerKind> = args.handlers.iter().map(|k| (*k).into()).collect();
    let run_id = format!("{}", std::process::id());
    let dir = args.dir.join(&run_id);
    let worker_bin = match std::fs::canonicalize(&args.worker_bin) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("streamops-chaos: {}: {e}", args.worker_bin.display());
            return ExitCode::FAILURE;
        }
    };
    let mut stack = match stack::Stack::start(worker_bin, dir.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("streamops-chaos: cannot start the chaos stack: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed_to_run = Vec::new();
    for scenario in scenarios {
        eprintln!(
            "streamops-chaos: scenario {} ({:?})",
            scenario.name(),
            args.profile
        );
        // An interrupt drops the scenario, whose child processes are killed on drop, and still
        // tears the stack down and prints what ran.
        let outcome = tokio::select! {
            r = scenarios::run(&mut stack, scenario, run, &only, &run_id) => Some(r),
            _ = wait_for_signal() => None,
        };
        match outcome {
            Some(Ok(mut r)) => rows.append(&mut r),
            Some(Err(e)) => {
                eprintln!(
                    "streamops-chaos: scenario {} could not run: {e:#}",
                    scenario.name()
                );
                failed_to_run.push(scenario.name());
            }
            None => {
                eprintln!("streamops-chaos: interrupted during {}", scenario.name());
                failed_to_run.push(scenario.name());
                break;
            }
        }
    }
    stack.shutdown().await;
    println!();
    print_table(&rows);
    let failed = rows.iter().filter(|r| !r.passed).count() + failed_to_run.len();
    let passed = rows.iter().filter(|r| r.passed).count();
    println!(
        "\nlogs in {}; {:.0}s in all",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    println!("chaos: {passed} passed, {failed} failed");
    if failed == 0 && !rows.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
