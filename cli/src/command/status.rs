//! `sagectl status INVENTORY [--json] [--timing]`: every host asked at once, one SSH exec
//! each (`pipeline::status`); the exit code is 1 when anything is down, unreachable or drifted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::pipeline::{Pipeline, Settings};
use crate::status::Report;

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// The inventory file.
    pub inventory: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seconds a host has to answer before it is reported unreachable.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// Print the wall time of the whole command (setup included) on stderr.
    #[arg(long)]
    pub timing: bool,
}

/// The status of every host of `inv`, each given `timeout` to answer. Never starts lab
/// machines: a stopped one is reported unreachable.
pub fn report(inv: crate::inventory::Inventory, timeout: Duration) -> anyhow::Result<Report> {
    let names: Vec<String> = inv.hosts.iter().map(|h| h.name.clone()).collect();
    let settings = Settings {
        check: true,
        quiet: true,
        ..Settings::default()
    };
    let p = Pipeline::new(inv, &names, settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(p.status(timeout)))
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    anyhow::ensure!(
        o.timeout > 0.0 && o.timeout <= 600.0,
        "--timeout {}: give seconds between 0 and 600",
        o.timeout
    );
    let r = report(inv, Duration::from_secs_f64(o.timeout))?;
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("serializable")
        );
    } else {
        print!("{}", r.text());
    }
    if o.timing {
        eprintln!("status took {:.3} s", started.elapsed().as_secs_f64());
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
