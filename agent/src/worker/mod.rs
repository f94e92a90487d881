//! `sage-agent worker`: runs workspaces' code in sandboxed sessions for backends. Layered as
//! mini-redis: a listener (TLS 1.3, backend certificates only), a connection per backend
//! (frames in, events out), shared state (sessions, uids, metrics), and shutdown.

pub mod cgroup;
mod conn;
pub mod drain;
mod engine;
mod register;
pub mod sandbox;
mod seccomp;
mod session;
pub mod zygote;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

pub use crate::config::TlsPaths;
use tokio::net::TcpListener;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::proto::Limits;
use crate::service::Service;

/// The worker's configuration (`worker.json`, rendered by sagectl).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub inventory: String,
    pub host: String,
    pub listen: SocketAddr,
    pub tls: TlsPaths,
    pub engine: String,
    pub max_sessions: u32,
    pub uid_min: u32,
    pub uid_max: u32,
    pub backend_timeout_seconds: u64,
    pub limits: Limits,
    pub backends: Vec<crate::config::Peer>,
    /// Where homes live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Prometheus metrics over plain HTTP, on a local address.
    #[serde(default = "default_metrics")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    /// A new connection must send its first frame within this many seconds.
    #[serde(default = "default_first_frame")]
    pub first_frame_seconds: u64,
    /// Refuse to start without cgroup controllers for sessions (false: rlimits only).
    #[serde(default = "default_true")]
    pub require_cgroups: bool,
    /// How engines start: `zygote` (forked from the engine server, fresh processes while it is
    /// down) or `fresh` (a new process each).
    #[serde(default = "default_engine_server")]
    pub engine_server: String,
    /// Modules the engine server imports once for every session (python3).
    #[serde(default = "default_preload")]
    pub preload: Vec<String>,
}

fn default_engine_server() -> String {
    "zygote".into()
}

fn default_preload() -> Vec<String> {
    ["numpy", "matplotlib", "matplotlib.pyplot"]
        .map(String::from)
        .to_vec()
}

fn default_true() -> bool {
    true
}

fn default_first_frame() -> u64 {
    10
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sage-worker")
}
fn default_metrics() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 7001)))
}
fn default_max_frame() -> usize {
    96 << 20
}
fn default_heartbeat() -> u64 {
    5
}

impl crate::config::HasTls for Config {
    fn tls(&mut self) -> &mut TlsPaths {
        &mut self.tls
    }
}

impl Config {
    /// Reads a config file; relative TLS paths are relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let c: Config = crate::config::load(path)?;
        anyhow::ensure!(
            c.uid_min >= 1000 && c.uid_min <= c.uid_max,
            "{}: uid_min..uid_max must be a range at or above 1000",
            path.display()
        );
        anyhow::ensure!(
            ["python3", "sage"].contains(&c.engine.as_str()),
            "{}: engine must be python3 or sage",
            path.display()
        );
        anyhow::ensure!(
            ["zygote", "fresh"].contains(&c.engine_server.as_str()),
            "{}: engine_server must be zygote or fresh",
            path.display()
        );
        let private = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/proc"];
        anyhow::ensure!(
            c.state_dir.is_absolute() && !private.iter().any(|p| c.state_dir.starts_with(p)),
            "{}: state_dir {} must be an absolute path outside {}: sessions get their own of those, so homes there would vanish from their view (use /var/lib/sage-worker)",
            path.display(),
            c.state_dir.display(),
            private.join(", ")
        );
        Ok(c)
    }

    pub fn max_bundle_bytes(&self) -> usize {
        self.max_frame_bytes / 4 * 3
    }
}

/// The worker's metrics (`sagews_worker_*`), registered once; counters count as things happen,
/// the gauges are read at each scrape.
pub struct Metrics {
    pub sessions_opened: Counter,
    pub engines_forked: Counter,
    pub engines_fresh: Counter,
    pub executes: Counter,
    pub limit_kills: Counter,
    pub refused_connections: Counter,
    pub bad_frames: Counter,
    sessions_open: Gauge,
    uids_held: Gauge,
    draining: Gauge,
    engine_server_up: Gauge,
    registry: Registry,
}

impl Metrics {
    /// `limits`: the cgroup mode's label; `zygote`: the engine server's restarts, when there is
    /// one (`engine_server{mode}` says fresh or zygote).
    fn new(limits: &'static str, zygote: Option<&zygote::Zygote>) -> Metrics {
        let mut registry = Registry::with_prefix("sagews_worker");
        let engine_server = Family::<Vec<(&str, &str)>, Gauge>::default();
        registry.register(
            "engine_server",
            "How engines start: fresh (configured), or zygote (forked from the engine server; up 0 while it is being restarted)",
            engine_server.clone(),
        );
        let mode = if zygote.is_some() { "zygote" } else { "fresh" };
        let engine_server_up = engine_server.get_or_create(&vec![("mode", mode)]).clone();
        engine_server_up.set(1);
        if let Some(z) = zygote {
            registry.register(
                "engine_server_restarts",
                "Engine server restarts",
                z.restarts.clone(),
            );
        }
        let started = Family::<Vec<(&str, &str)>, Counter>::default();
        registry.register(
            "engines_started",
            "Engines started, by how",
            started.clone(),
        );
        let limits_family = Family::<Vec<(&str, &str)>, Gauge>::default();
        registry.register(
            "limits",
            "How sessions are limited: cgroup2, cgroup1 (a cgroup per session) or rlimits (per process only)",
            limits_family.clone(),
        );
        limits_family.get_or_create(&vec![("mode", limits)]).set(1);
        // One statement each: `get_or_create` holds the family's lock until the statement ends.
        let engines_forked = started.get_or_create(&vec![("how", "forked")]).clone();
        let engines_fresh = started.get_or_create(&vec![("how", "fresh")]).clone();
        let m = Metrics {
            engines_forked,
            engines_fresh,
            sessions_opened: Counter::default(),
            executes: Counter::default(),
            limit_kills: Counter::default(),
            refused_connections: Counter::default(),
            bad_frames: Counter::default(),
            sessions_open: Gauge::default(),
            uids_held: Gauge::default(),
            draining: Gauge::default(),
            engine_server_up,
            registry: Registry::default(),
        };
        let gauges = [
            (
                "uids_held",
                "Uids not given out again (their session left something behind)",
                &m.uids_held,
            ),
            ("sessions_open", "Sessions open now", &m.sessions_open),
            (
                "draining",
                "1 while the worker is drained (sage-agent drain): no new sessions, open ones moved away",
                &m.draining,
            ),
        ];
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
        let counters = [
            ("sessions_opened", "Sessions opened", &m.sessions_opened),
            ("executes", "Cells run", &m.executes),
            ("limit_kills", "Sessions killed at a limit", &m.limit_kills),
            (
                "refused_connections",
                "Connections refused at the TLS handshake",
                &m.refused_connections,
            ),
            (
                "bad_frames",
                "Connections closed on a bad frame",
                &m.bad_frames,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        Metrics { registry, ..m }
    }
}

/// State shared by every connection and session.
pub struct Shared {
    pub config: Config,
    pub sessions: Mutex<HashMap<String, Arc<session::Handle>>>,
    uids: Mutex<BTreeSet<u32>>,
    /// Uids whose last session left something behind: never given out again by this run.
    held: Mutex<BTreeSet<u32>>,
    pub cgroups: cgroup::Cgroups,
    /// Set when the worker stops: sessions end with a short grace.
    pub stopping: std::sync::atomic::AtomicBool,
    /// The engine server, when the configuration asks for one.
    pub zygote: Option<Arc<zygote::Zygote>>,
    pub metrics: Metrics,
    /// When a backend was last heard from (a request, or an answer to a heartbeat).
    pub last_backend: Mutex<Instant>,
    /// The drain flag as last read (`drain.rs`), to log its changes.
    draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new(config: Config, cgroups: cgroup::Cgroups) -> Shared {
        let zygote = (config.engine_server == "zygote").then(|| {
            Arc::new(zygote::Zygote::new(
                &config.engine,
                config.preload.clone(),
                config.state_dir.join("engine-server"),
            ))
        });
        let metrics = Metrics::new(cgroups.mode().label(), zygote.as_deref());
        Shared {
            stopping: Default::default(),
            zygote,
            config,
            sessions: Mutex::default(),
            uids: Mutex::default(),
            held: Mutex::default(),
            cgroups,
            metrics,
            last_backend: Mutex::new(Instant::now()),
            draining: Default::default(),
        }
    }

    /// Whether the operator is draining this worker: the flag file, read anew at each call
    /// (one `stat`, before each heartbeat), so `sage-agent drain` needs no signal or connection.
    pub fn draining(&self) -> bool {
        let now = drain::is_draining(&self.config.state_dir);
        if self.draining.swap(now, Ordering::Relaxed) != now {
            if now {
                tracing::warn!(
                    "draining: backends place no new session here and move the open ones away"
                );
            } else {
                tracing::info!("no longer draining: backends place sessions here again");
            }
        }
        now
    }

    /// How long a session's processes get between SIGTERM and SIGKILL: 2 s, or 300 ms once the
    /// worker is stopping (systemd waits for it; it exits within 2 s of SIGTERM).
    pub fn grace(&self) -> Duration {
        if self.stopping.load(Ordering::Relaxed) {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        }
    }

    pub fn heard_from_backend(&self) {
        *self.last_backend.lock().unwrap() = Instant::now();
    }

    /// A free uid of the range: used by no session, not held, and no account of the machine's.
    pub fn allocate_uid(&self) -> Option<u32> {
        let mut used = self.uids.lock().unwrap();
        let held = self.held.lock().unwrap();
        let uid = (self.config.uid_min..=self.config.uid_max).find(|u| {
            !used.contains(u) && !held.contains(u) && sandbox::check_uid_is_ours(*u).is_ok()
        })?;
        used.insert(uid);
        Some(uid)
    }

    pub fn release_uid(&self, uid: u32) {
        self.uids.lock().unwrap().remove(&uid);
    }

    /// The session of `uid` could not be removed whole: the uid is not given out again.
    pub fn hold_uid(&self, uid: u32) {
        self.held.lock().unwrap().insert(uid);
        self.uids.lock().unwrap().remove(&uid);
    }

    pub fn forget(&self, session: &str) {
        self.sessions.lock().unwrap().remove(session);
    }

    pub fn session_count(&self) -> u32 {
        self.sessions.lock().unwrap().len() as u32
    }

    /// The metrics endpoint's answer: the gauges read now, then the registry.
    fn metrics_response(&self) -> axum::response::Response {
        let m = &self.metrics;
        m.sessions_open.set(i64::from(self.session_count()));
        m.uids_held.set(self.held.lock().unwrap().len() as i64);
        m.draining.set(i64::from(self.draining()));
        if let Some(z) = &self.zygote {
            m.engine_server_up.set(i64::from(z.is_up()));
        }
        crate::service::metrics_response(&m.registry)
    }

    /// The engine server's pid, when one is running.
    pub fn engine_server_pid(&self) -> Option<i32> {
        self.zygote.as_ref().and_then(|z| z.pid())
    }

    /// Closes every session (autostop, shutdown).
    pub async fn close_all(&self, reason: &str) {
        let handles: Vec<Arc<session::Handle>> =
            self.sessions.lock().unwrap().values().cloned().collect();
        for h in handles {
            // A running cell ends at once; the close waits behind it in the queue.
            h.stop.notify_one();
            let _ =
                h.tx.send(session::Cmd::Close {
                    reason: reason.to_string(),
                })
                .await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.session_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Ends what an earlier run that did not end cleanly left: processes of the uid range and
/// homes (its session cgroups are removed by `Cgroups::discover`).
fn clean_stale_sessions(config: &Config) {
    for uid in sandbox::uids_running(config.uid_min..=config.uid_max) {
        let n = sandbox::kill_user(uid, Duration::from_secs(1));
        tracing::warn!(
            uid,
            "ended the processes of a session left by an earlier run ({n} needed SIGKILL)"
        );
    }
    let Ok(entries) = std::fs::read_dir(config.state_dir.join("homes")) else {
        return;
    };
    for e in entries.flatten() {
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => {
                tracing::warn!(path = %e.path().display(), "removed a home left by an earlier run")
            }
            Err(err) => {
                tracing::error!(path = %e.path().display(), "could not remove a stale home: {err}")
            }
        }
    }
}

/// Runs the worker until `shutdown` completes; then closes every session.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = crate::tls::Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let server = identity.server_config(&["backend"])?;
    std::fs::create_dir_all(config.state_dir.join("homes"))?;
    std::fs::set_permissions(
        config.state_dir.join("homes"),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    clean_stale_sessions(&config);
    let cgroups =
        cgroup::Cgroups::discover(config.require_cgroups, config.uid_min..=config.uid_max)?;
    tracing::info!(mode = cgroups.mode().label(), "session limits");
    let shared = Arc::new(Shared::new(config, cgroups));
    let service = Service::new();
    // Logs it when the worker starts drained (the flag outlives restarts).
    shared.draining();
    if let Some(z) = &shared.zygote {
        service.spawn(z.clone().supervise());
    }
    if let Some(addr) = shared.config.metrics_listen {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                // Any path answers (Prometheus asks for /metrics, the health check too).
                let s = shared.clone();
                let app = axum::Router::new().fallback(move || async move { s.metrics_response() });
                service.serve_http("metrics", l, app, Duration::ZERO);
            }
            Err(e) => tracing::warn!("metrics on {addr}: {e}"),
        }
    }
    for b in shared.config.backends.clone() {
        service.spawn(register::announce(shared.clone(), identity.clone(), b));
    }
    service.spawn(autostop(shared.clone()));
    tracing::info!(listen = %listener.local_addr()?, engine = %shared.config.engine, "worker ready");
    let backends = conn::Backends {
        shared: shared.clone(),
        limit: Arc::new(tokio::sync::Semaphore::new(256)),
    };
    service.accept_tls("worker", listener, server, backends);
    shutdown.await;
    // Sessions close first, while the backends' connections still carry their last events.
    tracing::info!("shutting down: closing sessions");
    shared.stopping.store(true, Ordering::Relaxed);
    shared.close_all("the worker is shutting down").await;
    service.stop(Duration::from_millis(500)).await;
    Ok(())
}

/// Closes every session when no backend has been heard from for `backend_timeout_seconds`.
async fn autostop(shared: Arc<Shared>) {
    let timeout = Duration::from_secs(shared.config.backend_timeout_seconds);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let silent = shared.last_backend.lock().unwrap().elapsed();
        if silent > timeout && shared.session_count() > 0 {
            tracing::warn!(
                "no backend heard from for {} s: closing every session",
                silent.as_secs()
            );
            shared
                .close_all(&format!("no backend heard from for {} s", silent.as_secs()))
                .await;
        }
    }
}
