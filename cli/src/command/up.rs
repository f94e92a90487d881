//! `sagectl up INVENTORY`: converge the hosts (`crate::pipeline`), then print the recap. The
//! exit code is 0 only when every host succeeded.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::inventory::Role;
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
    /// Rolling: converge N hosts at a time (or N% of them), stopping at the first failed
    /// batch; workers and backends a batch changes are drained first and put back after their
    /// health checks pass.
    #[arg(long, value_name = "N|N%")]
    pub serial: Option<String>,
    /// With --serial: seconds to wait for a drained worker's sessions to move before converging
    /// it anyway (a backend is not waited for: it hands its browsers over as it restarts).
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
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
            serial: None,
            drain_timeout: 60,
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
            start_lab: true,
        }
    }
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let (recap, p) = match &o.serial {
        None => pipeline::converge_inventory(inv, &o.limit, o.settings())?,
        Some(serial) => rolling(inv, &o, serial)?,
    };
    recap.print(o.json, &p.inv.tls.public_name);
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

/// Batches of `serial` hosts: a number, or a percentage of `hosts` (at least one).
pub fn batches(hosts: &[String], serial: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let bad =
        || anyhow::anyhow!("--serial {serial}: give a number of hosts (2) or a percentage (25%)");
    let n = match serial.strip_suffix('%') {
        Some(p) => {
            let p: usize = p.parse().map_err(|_| bad())?;
            anyhow::ensure!((1..=100).contains(&p), bad());
            (hosts.len() * p).div_ceil(100).max(1)
        }
        None => serial
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(bad)?,
    };
    Ok(hosts.chunks(n).map(<[String]>::to_vec).collect())
}

/// A rolling upgrade: before each batch, what it would change is planned (a check run);
/// workers and backends with changes are drained; after a batch whose hosts all succeeded
/// (health checks included), they are put back. A failed batch leaves them drained and stops.
/// A restarted backend is put back only once it sees as many workers as it did before (the
/// workers announce themselves to it again within seconds): put back at once, it would take
/// every browser of the next backend drained while it had no worker to open their workspaces.
struct Rolling {
    planner: std::sync::Arc<pipeline::Pipeline>,
    timeout: std::time::Duration,
    /// Workers each drained backend saw before its batch.
    saw: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl pipeline::Around for Rolling {
    fn before<'a>(
        &'a self,
        p: &'a std::sync::Arc<pipeline::Pipeline>,
        batch: &'a [String],
    ) -> pipeline::BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let plan = self.planner.converge(batch).await;
            let mut held = Vec::new();
            for r in plan
                .iter()
                .filter(|r| r.changed > 0 || !r.planned.is_empty())
            {
                let h = p.inv.host(&r.host).expect("a host of the run");
                if !(h.has(Role::Worker) || h.has(Role::Backend)) {
                    continue;
                }
                // A backend's browsers stay connected (websockets, polls): waiting for them to
                // leave would only wait out the timeout. Drained in HAProxy, it gets no new
                // ones; when its agent restarts, it hands the open ones over to the other
                // backends itself (requests refused as `restarting` are sent again, the
                // workspaces saved first: agent/src/backend/mod.rs, `hand_over`).
                let backend = h.has(Role::Backend) && !h.has(Role::Worker);
                if h.has(Role::Backend) {
                    match super::drain::healthy_workers(p, &r.host).await {
                        Ok(n) => {
                            self.saw.lock().unwrap().insert(r.host.clone(), n);
                        }
                        Err(e) => eprintln!("{}: its workers not known ({e:#})", r.host),
                    }
                }
                let wait = if backend {
                    std::time::Duration::ZERO
                } else {
                    self.timeout
                };
                match super::drain::drain_host(p, &r.host, true, wait).await {
                    Ok(true) => {}
                    Ok(false) if backend => eprintln!(
                        "{}: its browsers are handed over to the other backends when it restarts",
                        r.host
                    ),
                    Ok(false) => eprintln!(
                        "{}: still busy after {}s, converging it anyway",
                        r.host,
                        self.timeout.as_secs()
                    ),
                    Err(e) => eprintln!(
                        "{}: could not drain it ({e:#}), converging it anyway",
                        r.host
                    ),
                }
                held.push(r.host.clone());
            }
            held
        })
    }

    fn after<'a>(
        &'a self,
        p: &'a std::sync::Arc<pipeline::Pipeline>,
        held: Vec<String>,
        ok: bool,
    ) -> pipeline::BoxFuture<'a, ()> {
        Box::pin(async move {
            if !ok {
                if !held.is_empty() {
                    eprintln!(
                        "the batch failed: {} stay drained (`sagectl undrain` puts one back)",
                        held.join(", ")
                    );
                }
                return;
            }
            for h in held {
                let before = self.saw.lock().unwrap().remove(&h);
                if let Some(n) = before {
                    let started = std::time::Instant::now();
                    loop {
                        match super::drain::healthy_workers(p, &h).await {
                            Ok(now) if now >= n => {
                                eprintln!(
                                    "{h} sees {now} workers again ({:.1}s)",
                                    started.elapsed().as_secs_f64()
                                );
                                break;
                            }
                            Ok(now) if started.elapsed() > self.timeout => {
                                eprintln!(
                                    "{h} sees {now} of the {n} workers it saw before after {} s: put back anyway",
                                    self.timeout.as_secs()
                                );
                                break;
                            }
                            Err(e) if started.elapsed() > self.timeout => {
                                eprintln!("{h}: its workers not known ({e:#}): put back anyway");
                                break;
                            }
                            _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
                        }
                    }
                }
                if let Err(e) = super::drain::drain_host(p, &h, false, self.timeout).await {
                    eprintln!("{h}: could not put it back ({e:#}): run `sagectl undrain`");
                }
            }
        })
    }
}

fn rolling(
    inv: crate::inventory::Inventory,
    o: &Opts,
    serial: &str,
) -> anyhow::Result<(Recap, std::sync::Arc<pipeline::Pipeline>)> {
    let selected: Vec<String> = pipeline::select(&inv, &o.limit)?
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let batches = batches(&selected, serial)?;
    anyhow::ensure!(
        !o.check,
        "--serial and --check: a check changes nothing, so it has no batches to roll"
    );
    // Every host a drain touches (HAProxy hosts for backends) can be reached for sessions.
    let all: Vec<String> = inv.hosts.iter().map(|h| h.name.clone()).collect();
    let planner = pipeline::Pipeline::new(
        inv.clone(),
        &selected,
        Settings {
            check: true,
            quiet: true,
            ..o.settings()
        },
    )?;
    let p = pipeline::Pipeline::new(inv, &all, o.settings())?;
    let around = Rolling {
        planner,
        timeout: std::time::Duration::from_secs(o.drain_timeout),
        saw: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let recap = rt.block_on(p.run_around(&batches, &around));
    Ok((recap, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_by_count_and_share() {
        let hosts: Vec<String> = (1..=5).map(|i| format!("h{i}")).collect();
        let sizes =
            |s: &str| -> Vec<usize> { batches(&hosts, s).unwrap().iter().map(Vec::len).collect() };
        assert_eq!(sizes("2"), [2, 2, 1]);
        assert_eq!(sizes("40%"), [2, 2, 1]);
        assert_eq!(sizes("1%"), [1, 1, 1, 1, 1]);
        assert_eq!(sizes("100%"), [5]);
        for bad in ["0", "0%", "x", "150%", "-1"] {
            assert!(batches(&hosts, bad).is_err(), "{bad}");
        }
    }
}
