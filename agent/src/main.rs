//! `sage-agent`: one binary for the three agents sagectl installs (worker, backend, logd).
//!
//! Each agent reads the JSON config file sagectl rendered for it. The agents themselves land with
//! their own issues; until then each subcommand checks its config file and says it is not built.

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
    /// List the agents this binary implements (sagectl starts only those).
    Built,
}

/// The agents implemented so far; sagectl installs the others' units without starting them.
const BUILT: &[&str] = &[];

#[derive(clap::Args)]
struct AgentOpts {
    /// The config file sagectl rendered for this agent.
    #[arg(long, default_value = "/etc/sage-agent/agent.json")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, opts) = match &cli.agent {
        Agent::Worker(o) => ("worker", o),
        Agent::Backend(o) => ("backend", o),
        Agent::Logd(o) => ("logd", o),
        Agent::Built => {
            for a in BUILT {
                println!("{a}");
            }
            return ExitCode::SUCCESS;
        }
    };
    match not_built(name, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sage-agent {name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn not_built(name: &str, opts: &AgentOpts) -> anyhow::Result<()> {
    std::fs::metadata(&opts.config)
        .with_context(|| format!("cannot read config file {}", opts.config.display()))?;
    anyhow::bail!("the {name} agent is not built yet")
}
