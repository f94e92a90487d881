//! `sagectl vars`: the variables roles read, their defaults and the role declaring each.

use std::process::ExitCode;

use crate::roles::Catalog;

#[derive(clap::Args)]
pub struct Opts {}

pub fn run(_: Opts) -> anyhow::Result<ExitCode> {
    let catalog = Catalog::embedded()?;
    for def in catalog.roles.values() {
        for (k, v) in &def.defaults {
            println!("{:<14} {k} = {v}", def.role.name());
        }
    }
    Ok(ExitCode::SUCCESS)
}
