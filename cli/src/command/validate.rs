//! `sagectl validate INVENTORY`: every problem at once, or a one-line summary.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::inventory::Role;

#[derive(clap::Args)]
pub struct Opts {
    /// The inventory file.
    pub inventory: PathBuf,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let roles: Vec<String> = Role::DECLARABLE
        .iter()
        .map(|r| (r, inv.with_role(*r).count()))
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    println!(
        "{}: inventory `{}` is valid: {} hosts ({})",
        o.inventory.display(),
        inv.name,
        inv.hosts.len(),
        roles.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
