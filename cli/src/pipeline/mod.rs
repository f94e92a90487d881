//! The converge pipeline that commands call: a [`Pipeline`] is set up once for an inventory
//! (state directory, secrets, lab machines, the sage-agent binary, pinned host keys, progress
//! display), then converges chosen hosts in batches: per host, in parallel up to
//! `Settings::parallel`, render, connect, facts, plan, apply, handlers ([`host`]); then the
//! health checks of the batch's hosts; and, for the run, the audit record and the recap. One
//! failed or unreachable host never stops the others of its batch.
//!
//! ```text
//!  Pipeline::new ── lab up, agent binary, ~/.ssh/config (connect)
//!     └─ run(batches) ─┬─ converge(batch) ── host::converge × N ── health::check_all
//!                      └─ audit ── Recap
//! ```

mod audit;
pub mod connect;
mod host;
pub mod recap;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::hostkeys::KnownHosts;
use crate::inventory::{Host, Inventory, Role};
use crate::lock::{Holder, LocalLock};
use crate::pki::{Secret, State};
use crate::roles::Catalog;
use crate::ssh::{HostKeyPolicy, Session};
use crate::ui::Ui;
pub use audit::record;

pub use recap::{HostRecap, Recap, Site};

/// How hosts are converged.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Only plan: gather facts and report what would change; change nothing (no lab machines
    /// are started, no health checks, no audit record).
    pub check: bool,
    /// Print a unified diff of every file that changes (secrets masked).
    pub diff: bool,
    /// Also print the steps that had nothing to do.
    pub verbose: bool,
    /// No progress display.
    pub quiet: bool,
    /// Hosts converged at once.
    pub parallel: usize,
    pub host_keys: HostKeyPolicy,
    /// How long to wait for the deploy lock (the state directory's, then each host's) when
    /// another run holds it (not taken with `check`).
    pub lock_timeout: Duration,
    /// The command converging (`up`, ...), as the audit record names it.
    pub command: &'static str,
    /// Start the lab's machines first (inventories with `lab:`); off for commands that must
    /// not bring back a machine that is down on purpose (`promote`).
    pub start_lab: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            check: false,
            diff: false,
            verbose: false,
            quiet: false,
            parallel: 16,
            host_keys: HostKeyPolicy::AcceptNew,
            lock_timeout: Duration::ZERO,
            command: "up",
            start_lab: true,
        }
    }
}

/// Hosts named by `limit` (host, role or group names), in inventory order; all of them when
/// empty.
pub fn select<'a>(inv: &'a Inventory, limit: &[String]) -> anyhow::Result<Vec<&'a Host>> {
    if limit.is_empty() {
        return Ok(inv.hosts.iter().collect());
    }
    let mut names = BTreeSet::new();
    for l in limit {
        if inv.host(l).is_some() {
            names.insert(l.clone());
        } else if let Some(role) = Role::from_name(l) {
            names.extend(
                inv.hosts
                    .iter()
                    .filter(|h| h.has(role) || role == Role::Firewall)
                    .map(|h| h.name.clone()),
            );
        } else if let Some(g) = inv.groups.get(l) {
            names.extend(g.iter().cloned());
        } else {
            let mut known: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
            known.extend(Role::DECLARABLE.iter().map(|r| r.name()));
            known.extend(inv.groups.keys().map(String::as_str));
            anyhow::bail!(
                "--limit {l}: no host, role or group of that name\n  hint: {}",
                crate::diag::suggest(l, &known)
            );
        }
    }
    Ok(inv
        .hosts
        .iter()
        .filter(|h| names.contains(&h.name))
        .collect())
}

/// The sage-agent binary to upload: beside sagectl, or `$SAGECTL_AGENT_BINARY`.
fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SAGECTL_AGENT_BINARY") {
        return Some(PathBuf::from(p));
    }
    let p = std::env::current_exe().ok()?.with_file_name("sage-agent");
    p.is_file().then_some(p)
}

/// Everything a run shares between its hosts.
pub struct Pipeline {
    pub inv: Inventory,
    catalog: &'static Catalog,
    state: State,
    secrets: BTreeMap<String, Secret>,
    known: Arc<KnownHosts>,
    agent: Option<Arc<Vec<u8>>>,
    settings: Settings,
    ui: Ui,
    lab_key: Option<PathBuf>,
    /// Who this run is, in the locks it takes.
    holder: Holder,
    /// The state directory's deploy lock, held for the pipeline's life (not with `check`).
    _local_lock: Option<Arc<LocalLock>>,
}

impl Pipeline {
    /// Sets up converging `hosts` (names) of `inv`: takes the state directory's deploy lock
    /// (unless `check`), opens the state directory, starts the lab machines (unless `check`),
    /// completes the hosts' SSH settings, reads the sage-agent binary when one of `hosts` runs
    /// an agent.
    pub fn new(
        mut inv: Inventory,
        hosts: &[String],
        settings: Settings,
    ) -> anyhow::Result<Arc<Self>> {
        let catalog = Catalog::embedded()?;
        let holder = Holder::me();
        let local_lock = if settings.check {
            None
        } else {
            Some(lock_inventory(&inv, &holder, &settings)?)
        };
        let state = crate::pki::open(&inv)?;
        let secrets = state.secrets()?;
        let mut lab_key = None;
        if inv.lab.is_some() {
            let lab = crate::lab::Lab::new(&inv)?;
            if !settings.check && settings.start_lab {
                lab.up()?;
            }
            lab_key = Some(lab.key_path());
        }
        connect::apply_ssh_config(&mut inv);
        let needs_agent = inv
            .hosts
            .iter()
            .filter(|h| hosts.contains(&h.name))
            .any(|h| h.has(Role::Worker) || h.has(Role::Backend) || h.has(Role::Logd));
        let agent = match (needs_agent, agent_binary()) {
            (false, _) => None,
            (true, Some(p)) => Some(Arc::new(
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            )),
            (true, None) => anyhow::bail!(
                "the inventory has agent hosts and no sage-agent binary was found beside {}\n  hint: build both (`cargo build --release`), or set SAGECTL_AGENT_BINARY",
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
        let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let ui = if settings.quiet {
            Ui::silent()
        } else {
            Ui::new(&names)
        };
        let known = Arc::new(KnownHosts::new(
            crate::pki::dir_for(&inv).join("known_hosts"),
        ));
        Ok(Arc::new(Pipeline {
            inv,
            catalog,
            state,
            secrets,
            known,
            agent,
            settings,
            ui,
            lab_key,
            holder,
            _local_lock: local_lock,
        }))
    }

    /// An SSH session to `name` (pinned host keys, the run's key policy), for commands that
    /// act on a host outside a converge (drain, remove-worker).
    pub async fn session(&self, name: &str) -> Result<Session, crate::ssh::SshError> {
        let host = self.inv.host(name).expect("a host of the inventory");
        let target = connect::target(host, self.lab_key.as_deref());
        Session::connect(&target, self.known.clone(), self.settings.host_keys).await
    }

    /// Converges `batch` (host names), then makes the health checks of those that succeeded
    /// (checks made from another host use hosts of this batch only). Recaps in inventory order.
    pub async fn converge(self: &Arc<Self>, batch: &[String]) -> Vec<HostRecap> {
        self.converge_timed(batch).await.0
    }

    /// [`Pipeline::converge`], and the seconds spent converging and in the health checks.
    async fn converge_timed(self: &Arc<Self>, batch: &[String]) -> (Vec<HostRecap>, f64, f64) {
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(self.settings.parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for name in batch {
            let (p, sem, name) = (self.clone(), sem.clone(), name.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore open");
                host::converge(&p, &name).await
            });
        }
        let mut recaps: BTreeMap<String, HostRecap> = BTreeMap::new();
        let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (recap, session) = r.expect("host task panicked");
            if let Some(s) = session {
                sessions.insert(recap.host.clone(), s);
            }
            recaps.insert(recap.host.clone(), recap);
        }
        let converged = started.elapsed().as_secs_f64();
        let started = Instant::now();
        if !self.settings.check {
            let healthy: Vec<&Host> = self
                .inv
                .hosts
                .iter()
                .filter(|h| recaps.get(&h.name).is_some_and(HostRecap::succeeded))
                .collect();
            self.ui.println("running health checks");
            let changed: BTreeMap<&str, usize> = recaps
                .values()
                .map(|r| (r.host.as_str(), r.changed))
                .collect();
            let checks = crate::health::check_all(
                &self.inv,
                self.catalog,
                &healthy,
                &sessions,
                &self.secrets,
                &changed,
            )
            .await;
            for c in checks {
                if let Some(r) = recaps.get_mut(&c.host) {
                    r.failed |= !c.ok;
                    r.checks.push(c);
                }
            }
        }
        let health = started.elapsed().as_secs_f64();
        for (_, s) in sessions {
            s.close().await;
        }
        let recaps = self
            .inv
            .hosts
            .iter()
            .filter_map(|h| recaps.remove(&h.name))
            .collect();
        (recaps, converged, health)
    }

    /// Converges `batches` in order, stopping after the first batch with a failed or
    /// unreachable host; then records the run in logd (unless `check`) and returns the recap.
    pub async fn run(self: &Arc<Self>, batches: &[Vec<String>]) -> Recap {
        self.run_around(batches, &Nothing).await
    }

    /// [`Pipeline::run`], with `around` called before and after each batch (a rolling
    /// upgrade drains what a batch restarts, and puts it back).
    pub async fn run_around(
        self: &Arc<Self>,
        batches: &[Vec<String>],
        around: &dyn Around,
    ) -> Recap {
        let started = Instant::now();
        let mut hosts = Vec::new();
        let (mut converging, mut checking) = (0.0, 0.0);
        for batch in batches {
            let held = around.before(self, batch).await;
            let (recaps, c, h) = self.converge_timed(batch).await;
            converging += c;
            checking += h;
            let failed = recaps.iter().any(|r| !r.succeeded());
            around.after(self, held, !failed).await;
            hosts.extend(recaps);
            if failed {
                break;
            }
        }
        let success = hosts.iter().all(HostRecap::succeeded)
            && hosts.len() == batches.iter().map(Vec::len).sum::<usize>();
        let mut recap = Recap {
            inventory: self.inv.name.clone(),
            check: self.settings.check,
            success,
            seconds: started.elapsed().as_secs_f64(),
            hosts,
            audit: None,
            phases: vec![("hosts", converging), ("health", checking)],
            site: None,
        };
        if !self.settings.check {
            let started = Instant::now();
            recap.audit = audit::audit(self, &recap).await;
            recap
                .phases
                .push(("audit", started.elapsed().as_secs_f64()));
            if success {
                recap.site = Site::of(&self.inv, &self.state);
            }
        }
        recap
    }
}

/// Takes the deploy lock of `inv`'s state directory for this process (shared with any other
/// pipeline of the process holding it), saying so when it waits or takes over a dead
/// holder's.
pub fn lock_inventory(
    inv: &Inventory,
    holder: &Holder,
    settings: &Settings,
) -> Result<Arc<LocalLock>, crate::lock::LockError> {
    let quiet = settings.quiet;
    let timeout = settings.lock_timeout;
    let l = crate::lock::for_process(&crate::pki::dir_for(inv), holder, timeout, |h| {
        if !quiet {
            eprintln!(
                "waiting up to {} s for the deploy lock, held by {h}",
                timeout.as_secs()
            );
        }
    })?;
    if let (Some(prev), false) = (&l.taken_over, quiet) {
        eprintln!(
            "took over the deploy lock left by {prev}: that process is gone (the kernel released its lock)"
        );
    }
    Ok(l)
}

/// A future borrowed from the caller, for [`Around`]'s methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a run does around each batch.
pub trait Around: Sync {
    /// Before `batch` is converged; returns what `after` gets back (hosts taken out of service).
    fn before<'a>(
        &'a self,
        p: &'a Arc<Pipeline>,
        batch: &'a [String],
    ) -> BoxFuture<'a, Vec<String>>;
    /// After the batch, `ok` when every host of it succeeded.
    fn after<'a>(&'a self, p: &'a Arc<Pipeline>, held: Vec<String>, ok: bool) -> BoxFuture<'a, ()>;
}

/// Nothing around batches (an ordinary run).
struct Nothing;

impl Around for Nothing {
    fn before<'a>(&'a self, _: &'a Arc<Pipeline>, _: &'a [String]) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async { Vec::new() })
    }

    fn after<'a>(&'a self, _: &'a Arc<Pipeline>, _: Vec<String>, _: bool) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Converges the hosts of `inv` chosen by `limit` in one batch (lab machines first when it
/// has a `lab:` section) on a runtime of its own, and returns the recap.
pub fn converge_inventory(
    inv: Inventory,
    limit: &[String],
    settings: Settings,
) -> anyhow::Result<(Recap, Arc<Pipeline>)> {
    let selected: Vec<String> = select(&inv, limit)?
        .iter()
        .map(|h| h.name.clone())
        .collect();
    let p = Pipeline::new(inv, &selected, settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let recap = rt.block_on(p.run(&[selected]));
    Ok((recap, p))
}
