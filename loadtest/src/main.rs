//! `livedrop-loadtest`: load generator, invariant checker and report for livedrop. Every
//! scenario targets loopback only, is bounded by a duration and/or a count, and stops by
//! itself. Exit status: 0 when the run passed, 1 on an error, 2 when an invariant broke.

mod api;
mod cli;
mod http;
mod invariant;
mod progress;
mod report;
mod rss;
mod scenarios;
mod tokens;
mod ws;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Scenario};
use crate::report::write_json;
use crate::scenarios::{claims, viewers};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenario, prints and writes its summary; `false` when an invariant broke.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.scenario {
        Scenario::Claims(args) => {
            let json = args.common.json.clone();
            let summary = claims::run(args).await?;
            claims::print(&summary);
            if let Some(path) = json {
                write_json(&path, &summary)?;
            }
            Ok(summary.passed)
        }
        Scenario::Viewers(args) => {
            let json = args.common.json.clone();
            let summary = viewers::run(args).await?;
            viewers::print(&summary);
            if let Some(path) = json {
                write_json(&path, &summary)?;
            }
            Ok(true)
        }
    }
}
