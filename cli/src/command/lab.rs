//! `sagectl lab up|down|status|ssh INVENTORY`: the inventory's hosts as local lab machines.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::lab::{Lab, MachineStatus};

#[derive(clap::Args)]
pub struct Opts {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand)]
pub enum Action {
    /// Start a machine for every host (those already running are left alone).
    Up { inventory: PathBuf },
    /// Remove every machine and what the lab made (the base image and apt cache are kept).
    Down { inventory: PathBuf },
    /// Show each machine's state.
    Status { inventory: PathBuf },
    /// Remove one machine, its disk with it (a lost machine, for drills); `lab up` or
    /// `sagectl up` makes a fresh one at its address.
    Destroy { inventory: PathBuf, host: String },
    /// Open a shell, or run a command, on a machine over SSH as root.
    Ssh {
        inventory: PathBuf,
        host: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let path = match &o.action {
        Action::Up { inventory }
        | Action::Down { inventory }
        | Action::Status { inventory }
        | Action::Destroy { inventory, .. }
        | Action::Ssh { inventory, .. } => inventory.clone(),
    };
    let inv = match super::load(&path) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let lab = Lab::new(&inv)?;
    match o.action {
        Action::Up { .. } => lab.up()?,
        Action::Down { .. } => lab.down()?,
        Action::Destroy { host, .. } => {
            if inv.host(&host).is_none() {
                let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
                anyhow::bail!(
                    "no host `{host}` in {}\n  hint: {}",
                    path.display(),
                    crate::diag::suggest(&host, &names)
                );
            }
            lab.destroy(&host)?;
        }
        Action::Status { .. } => {
            let mut all_running = true;
            for (name, st) in lab.status() {
                let addr = inv.host(&name).expect("listed").address;
                println!("{name:<16} {addr:<16} {st}");
                all_running &= matches!(st, MachineStatus::Running { .. });
            }
            return Ok(if all_running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            });
        }
        Action::Ssh { host, command, .. } => {
            let Some(h) = inv.host(&host) else {
                let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
                anyhow::bail!(
                    "no host `{host}` in {}\n  hint: {}",
                    path.display(),
                    crate::diag::suggest(&host, &names)
                );
            };
            let mut c = std::process::Command::new("ssh");
            c.arg("-i").arg(lab.key_path());
            c.arg("-o").arg(format!(
                "UserKnownHostsFile={}",
                lab.known_hosts().display()
            ));
            c.args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "LogLevel=error",
            ]);
            c.arg(format!("root@{}", h.address));
            if !command.is_empty() {
                // ssh joins its arguments into one line for the remote shell: quote each.
                c.arg("--").arg(crate::quote::join(&command));
            }
            return Err(anyhow::Error::from(c.exec()).context("running ssh"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
