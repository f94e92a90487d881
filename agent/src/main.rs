//! `sage-agent`: one binary for the three agents sagectl installs (worker, backend, logd).
//! Each reads the JSON config file sagectl rendered for it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sage-agent",
    version,
    about = "sagectl's agents: worker, backend, logd"
)]
struct Cli {
    #[command(subcommand)]
    agent: Agent,
}

#[derive(Subcommand)]
enum Agent {
    /// Run workspaces' code in sandboxed sessions (TLS, backends only).
    Worker(AgentOpts),
    /// HTTPS + SockJS server for browsers; accounts and workspaces.
    Backend(AgentOpts),
    /// TLS log server writing to PostgreSQL.
    Logd(AgentOpts),
    /// Check that an agent's config file loads (as `nginx -t` does): sagectl runs it on a
    /// rendered file before it replaces the live one.
    CheckConfig {
        /// worker, backend or logd.
        agent: String,
        file: PathBuf,
    },
    /// Run one cell on a worker through its protocol, with a backend's certificate (the
    /// deploy's health check); prints the cell's output.
    Probe(ProbeOpts),
    /// Drain this host's worker: backends place no new session on it and move its open ones
    /// (saved first) to other workers, until `--undo`. A flag file in the worker's state
    /// directory, so it outlives restarts; the running worker sees it at its next heartbeat.
    Drain(DrainOpts),
}

#[derive(clap::Args)]
struct DrainOpts {
    /// The worker's config file (for its state directory).
    #[arg(long)]
    config: PathBuf,
    /// Undrain: the worker takes sessions again.
    #[arg(long)]
    undo: bool,
}

#[derive(clap::Args)]
struct ProbeOpts {
    /// The deployment's CA certificate.
    #[arg(long, default_value = "/etc/sage-agent/ca.crt")]
    ca: PathBuf,
    /// A certificate with the backend role.
    #[arg(long, default_value = "/etc/sage-agent/host.crt")]
    cert: PathBuf,
    /// Its private key (a path: the key never travels in arguments).
    #[arg(long, default_value = "/etc/sage-agent/host.key")]
    key: PathBuf,
    /// The worker's name (as in its certificate).
    #[arg(long)]
    worker: String,
    /// The worker's session address, HOST:PORT.
    #[arg(long)]
    address: String,
    /// The cell to run.
    #[arg(long)]
    code: String,
}

#[derive(clap::Args)]
struct AgentOpts {
    /// The config file sagectl rendered for this agent.
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A fixed mmap threshold: glibc otherwise raises it after the first large free, and then
    // every thread's arena keeps argon2's 19 MiB blocks (hundreds of MB after a burst of
    // sign-ins).
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under systemd the journal stamps each line already.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        fmt.without_time().with_ansi(false).init();
    } else {
        fmt.init();
    }
    let result = match cli.agent {
        Agent::Probe(o) => probe(&o),
        Agent::Drain(o) => drain(&o),
        Agent::CheckConfig { agent, file } => check_config(&agent, &file),
        Agent::Worker(o) => worker(&o),
        Agent::Backend(o) => backend(&o),
        Agent::Logd(o) => logd(&o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sage-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an agent on a multi-threaded runtime: binds `listen`, then `serve` until SIGTERM or
/// SIGINT (`service::terminated`, the one place signals are handled).
fn serve<F, Fut>(listen: std::net::SocketAddr, serve: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        serve(listener).await
    })
}

fn worker(o: &AgentOpts) -> anyhow::Result<()> {
    let config = sage_agent::worker::Config::load(&o.config)?;
    // Before any thread: a mount namespace may be needed to reach the cgroup hierarchies.
    sage_agent::worker::cgroup::private_mounts()?;
    serve(config.listen, |l| {
        sage_agent::worker::run(config, l, sage_agent::service::terminated())
    })
}

fn check_config(agent: &str, file: &std::path::Path) -> anyhow::Result<()> {
    match agent {
        "worker" => sage_agent::worker::Config::load(file).map(drop),
        "backend" => sage_agent::backend::Config::load(file).map(drop),
        "logd" => sage_agent::logd::Config::load(file).map(drop),
        other => anyhow::bail!("unknown agent `{other}`: worker, backend or logd"),
    }?;
    println!("{}: a valid {agent} configuration", file.display());
    Ok(())
}

fn drain(o: &DrainOpts) -> anyhow::Result<()> {
    let config = sage_agent::worker::Config::load(&o.config)?;
    let dir = &config.state_dir;
    let changed = sage_agent::worker::drain::set(dir, !o.undo).with_context(|| {
        format!(
            "{}: {}",
            if o.undo { "undraining" } else { "draining" },
            sage_agent::worker::drain::flag(dir).display()
        )
    })?;
    let (now, already) = match (o.undo, changed) {
        (false, true) => (
            "draining: its backends move its open sessions to other workers within a heartbeat",
            "",
        ),
        (false, false) => ("draining", " (already)"),
        (true, true) => (
            "undrained: it takes new sessions again from its next heartbeat",
            "",
        ),
        (true, false) => ("not draining", " (already)"),
    };
    println!("worker {}: {now}{already}", config.host);
    Ok(())
}

fn probe(o: &ProbeOpts) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (out, engine, opened) = rt.block_on(sage_agent::probe::run(
        (&o.ca, &o.cert, &o.key),
        &o.worker,
        &o.address,
        &o.code,
    ))?;
    eprintln!(
        "{}: {engine} session opened in {} ms",
        o.worker,
        opened.as_millis()
    );
    print!("{out}");
    Ok(())
}

fn logd(o: &AgentOpts) -> anyhow::Result<()> {
    let config = sage_agent::logd::Config::load(&o.config)?;
    serve(config.listen, |l| async move {
        sage_agent::logd::run(config, l, sage_agent::service::terminated())
            .await
            .map(drop)
    })
}

fn backend(o: &AgentOpts) -> anyhow::Result<()> {
    let config = sage_agent::backend::Config::load(&o.config)?;
    serve(config.listen, |l| {
        sage_agent::backend::run(config, l, sage_agent::service::terminated())
    })
}
