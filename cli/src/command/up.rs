//! `sagectl up INVENTORY`: converge the hosts (`crate::pipeline`), then print the recap. The
//! exit code is 0 only when every host succeeded.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::pipeline::{self, Recap, Settings};
use crate::ssh::HostKeyPolicy;

#[derive(clap::Args, Clone)]
pub struct Opts {
    /// The inventory file.
    pub inventory: PathBuf,
    /// Only plan: gather facts and show what would change; change nothing.
    #[arg(long)]
    pub check: bool,
    /// Show a unified diff of every file that changes (secrets masked).
    #[arg(long)]
    pub diff: bool,
    /// Only these hosts: a host, role or group name (repeatable).
    #[arg(long = "limit", value_name = "NAME|ROLE|GROUP")]
    pub limit: Vec<String>,
    /// Hosts converged at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub parallel: u32,
    /// Print the recap as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also list the steps that had nothing to do.
    #[arg(short, long)]
    pub verbose: bool,
    /// Hosts seen for the first time: pin their key (accept-new) or refuse them (strict).
    #[arg(long, value_enum, default_value = "accept-new")]
    pub host_keys: HostKeyPolicy,
    /// No progress output; just the recap.
    #[arg(short, long)]
    pub quiet: bool,
    /// When another run holds the deploy lock (this inventory's, or a host's), wait up to
    /// this long for it instead of failing at once, naming the holder.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub lock_timeout: u64,
}

impl Opts {
    /// Options for converging `inventory` with every default.
    pub fn new(inventory: PathBuf) -> Opts {
        Opts {
            inventory,
            check: false,
            diff: false,
            limit: Vec::new(),
            parallel: 16,
            json: false,
            verbose: false,
            host_keys: HostKeyPolicy::AcceptNew,
            quiet: false,
            lock_timeout: 0,
        }
    }
}

impl Opts {
    fn settings(&self) -> Settings {
        Settings {
            check: self.check,
            diff: self.diff,
            verbose: self.verbose,
            quiet: self.quiet,
            parallel: self.parallel as usize,
            host_keys: self.host_keys,
            lock_timeout: std::time::Duration::from_secs(self.lock_timeout),
            command: "up",
        }
    }
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let (recap, p) = pipeline::converge_inventory(inv, &o.limit, o.settings())?;
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&recap).expect("serializable")
        );
    } else {
        print!("{}", recap.text(&p.inv.tls.public_name));
    }
    Ok(if recap.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Converges `inv` (lab machines first when it has a `lab:` section) and returns the recap.
pub fn converge_inventory(inv: crate::inventory::Inventory, o: Opts) -> anyhow::Result<Recap> {
    pipeline::converge_inventory(inv, &o.limit, o.settings()).map(|(r, _)| r)
}
