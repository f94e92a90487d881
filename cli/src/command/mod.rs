//! Subcommands, one file each, each with an `Opts` struct and a `run` function.

pub mod bench;
pub mod lab;
pub mod logs;
pub mod render;
pub mod status;
pub mod up;
pub mod validate;
pub mod vars;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sagectl",
    version,
    about = "Stand up a multi-user Sage workspace service on plain Debian machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Converge the inventory's hosts over SSH (lab machines are started first).
    Up(up::Opts),
    /// Check an inventory and report every problem in it.
    Validate(validate::Opts),
    /// Write every host's desired configuration files into a directory.
    Render(render::Opts),
    /// List the variables roles read, with their defaults.
    Vars(vars::Opts),
    /// Local lab machines (systemd-nspawn) for an inventory with a `lab:` section.
    Lab(lab::Opts),
    /// Records from the deployment's logd (with sagectl's admin certificate).
    Logs(logs::Opts),
    /// One screen for the whole deployment: hosts, services, drift, figures, the last `up`.
    Status(status::Opts),
    /// Benchmarks that print figures (`bench up --hosts N`).
    Bench(bench::Opts),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(o) => up::run(o),
        Command::Validate(o) => validate::run(o),
        Command::Render(o) => render::run(o),
        Command::Vars(o) => vars::run(o),
        Command::Lab(o) => lab::run(o),
        Command::Logs(o) => logs::run(o),
        Command::Status(o) => status::run(o),
        Command::Bench(o) => bench::run(o),
    }
}

/// Loads an inventory, printing its problems to stderr when it has any.
pub(crate) fn load(path: &std::path::Path) -> Result<crate::inventory::Inventory, ExitCode> {
    crate::inventory::Inventory::load(path).map_err(|diags| {
        eprintln!("{diags}");
        ExitCode::from(2)
    })
}
