//! Subcommands, one file each, each with an `Opts` struct and a `run` function.

pub mod add_host;
pub mod backup;
pub mod bench;
pub mod chaos;
pub mod completions;
pub mod drain;
pub mod inventory;
pub mod lab;
pub mod logs;
pub mod man;
pub mod promote;
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
    /// Add a worker: write its host file, then converge it and the hosts it concerns.
    AddWorker(add_host::WorkerOpts),
    /// Add a host of any roles: write its host file, then converge it and the hosts it concerns.
    AddHost(add_host::Opts),
    /// Take a worker or backend out of service: no new sessions, open ones moved or finished.
    Drain(drain::Opts),
    /// Put a drained worker or backend back in service.
    Undrain(drain::Opts),
    /// Drain a worker, stop its agent, remove its host file and converge the hosts it concerned.
    RemoveWorker(drain::RemoveOpts),
    /// Make the database standby the primary (the primary is gone), and converge backends and
    /// logd onto it.
    Promote(promote::Opts),
    /// Back up both databases (pg_dump), from the standby when there is one.
    Backup(backup::BackupOpts),
    /// Restore a backup onto the primary database host (a fresh one, or with --replace).
    Restore(backup::RestoreOpts),
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
    /// The resolved inventory and each host's effective variables (`inventory show`).
    #[command(subcommand)]
    Inventory(inventory::Opts),
    /// A shell's completion script for sagectl (bash, zsh, fish, ...), on stdout.
    Completions(completions::Opts),
    /// The manual page (roff), or one page per subcommand written into a directory.
    Man(man::Opts),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(o) => up::run(o),
        Command::AddWorker(o) => add_host::run_worker(o),
        Command::AddHost(o) => add_host::run(o),
        Command::Drain(o) => drain::run(o, true),
        Command::Undrain(o) => drain::run(o, false),
        Command::RemoveWorker(o) => drain::remove_worker(o),
        Command::Promote(o) => promote::run(o),
        Command::Backup(o) => backup::backup(o),
        Command::Restore(o) => backup::restore(o),
        Command::Validate(o) => validate::run(o),
        Command::Render(o) => render::run(o),
        Command::Vars(o) => vars::run(o),
        Command::Lab(o) => lab::run(o),
        Command::Logs(o) => logs::run(o),
        Command::Status(o) => status::run(o),
        Command::Bench(o) => bench::run(o),
        Command::Inventory(o) => inventory::run(o),
        Command::Completions(o) => completions::run(o),
        Command::Man(o) => man::run(o),
    }
}

/// Loads an inventory, printing its problems to stderr when it has any.
pub(crate) fn load(path: &std::path::Path) -> Result<crate::inventory::Inventory, ExitCode> {
    crate::inventory::Inventory::load(path).map_err(|diags| {
        eprintln!("{diags}");
        ExitCode::from(2)
    })
}

/// A runtime for a command's SSH work.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `psql` as the postgres superuser over the unix socket on a database host: one statement on
/// database `db`, unaligned, tab-separated, stopping at the first error.
pub(crate) fn postgres_psql(db: &str, sql: &str) -> Vec<String> {
    [
        "runuser",
        "-u",
        "postgres",
        "--",
        "psql",
        "-XAtq",
        "-F",
        "\t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        db,
        "-c",
        sql,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
