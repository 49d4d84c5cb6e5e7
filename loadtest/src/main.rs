//! `livedrop-loadtest`: load generator, invariant checker and report for livedrop. Every
//! scenario targets loopback only, is bounded by a duration and/or a count, and stops by
//! itself. Exit status: 0 when the run passed, 1 on an error, 2 when an invariant broke.

mod api;
mod audience;
mod cli;
mod frames;
mod html;
mod http;
mod http_response;
mod invariant;
mod progress;
mod report;
mod rss;
mod scenarios;
mod series;
mod tally;
mod tokens;
mod viewer_socket;
mod ws;

use std::process::ExitCode;

use clap::Parser;

use serde::Serialize;

use crate::cli::{Cli, Common, Scenario};
use crate::html::write_report;
use crate::report::write_json;
use crate::scenarios::{Outcome, claims, groups, sale, viewers};
use crate::series::Series;

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
            let common = args.common.clone();
            finish(&common, claims::run(args).await?)
        }
        Scenario::Viewers(args) => {
            let common = args.common.clone();
            finish(&common, viewers::run(args).await?)
        }
        Scenario::Sale(args) => {
            let common = args.common.clone();
            finish(&common, sale::run(args).await?)
        }
        Scenario::Groups(args) => {
            let common = args.common.clone();
            finish(&common, groups::run(args).await?)
        }
    }
}

/// Prints a summary, writes `--json` and `--report`, and says whether the run passed.
fn finish<T: Outcome>(common: &Common, s: T) -> anyhow::Result<bool> {
    s.print();
    write_outputs(
        common,
        &format!("livedrop-loadtest {}", s.name()),
        &s,
        s.series(),
    )?;
    Ok(s.passed())
}

/// `--json` and `--report`, when asked for.
fn write_outputs<T: Serialize>(
    common: &Common,
    title: &str,
    summary: &T,
    series: &[Series],
) -> anyhow::Result<()> {
    if let Some(path) = &common.json {
        write_json(path, summary)?;
    }
    if let Some(path) = &common.report {
        write_report(path, title, summary, series)?;
        println!("  report: {}", path.display());
    }
    Ok(())
}
