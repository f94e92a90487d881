//! The backend agent: HTTPS (TLS 1.3, HAProxy's certificate required) for browsers, with a SockJS
//! endpoint carrying JSON messages (`api`), REST routes for health, metrics and bundles, accounts
//! and workspaces in PostgreSQL with memcached in front, workspaces' code run on workers
//! (`workers`, `open`), publishing pushed to the static hosts (`publish`). See ARCHITECTURE.md §10.

pub mod accounts;
pub mod api;
pub mod cache;
mod drain;
pub mod fleet;
pub mod git;
pub mod msg;
pub mod open;
pub mod origin;
pub mod publish;
pub mod routes;
pub mod sockjs;
pub mod throttle;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::config::{HasTls, Peer, TlsPaths};
use crate::db::{DbConfig, Pool, PoolError};
use crate::logclient::LogClient;
use crate::proto::Level;
use crate::service::Service;
use crate::tls::Identity;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    pub signup: bool,
    pub max_workspaces: u32,
    /// Workspaces one account may have open at once, across backends and workers.
    #[serde(default = "default_max_open")]
    pub max_open_workspaces: u32,
    pub session_days: u32,
    pub min_password_length: u32,
    /// Failed sign-ins for one account within `limit_window_seconds` before it is refused.
    #[serde(default = "default_failed_per_account")]
    pub failed_signins_per_account: u32,
    /// Failed sign-ins from one client address within the window.
    #[serde(default = "default_failed_per_address")]
    pub failed_signins_per_address: u32,
    /// Accounts created from one client address within the window.
    #[serde(default = "default_signups_per_address")]
    pub signups_per_address: u32,
    #[serde(default = "default_limit_window")]
    pub limit_window_seconds: u32,
}

fn default_max_open() -> u32 {
    3
}
fn default_failed_per_account() -> u32 {
    10
}
fn default_failed_per_address() -> u32 {
    30
}
fn default_signups_per_address() -> u32 {
    20
}
fn default_limit_window() -> u32 {
    600
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogdRef {
    pub address: String,
    pub server_name: String,
    /// logd's query API (`host:port`), for the operators' page's audit records.
    #[serde(default)]
    pub query: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub inventory: String,
    pub host: String,
    pub public_name: String,
    pub listen: SocketAddr,
    pub worker_listen: SocketAddr,
    pub tls: TlsPaths,
    pub database: DbConfig,
    pub memcached: Vec<Peer>,
    /// Kept for configs rendered before session tokens were stored hashed; unused.
    #[serde(default)]
    pub cookie_key: Option<String>,
    /// Browser (SockJS) sessions this backend holds at once.
    pub max_sessions: u32,
    pub max_bundle_mb: u64,
    pub accounts: AccountsConfig,
    /// Accounts that see the operators' page and may drain workers from it (`fleet.rs`).
    #[serde(default)]
    pub admins: Vec<String>,
    /// The password an operator's account is created with when it does not exist yet (a
    /// generated secret of the deployment; operators cannot sign themselves up).
    #[serde(default)]
    pub admin_password: Option<String>,
    pub worker_port: u16,
    pub logd: Option<LogdRef>,
    /// Static hosts with their publishing address (nginx, WebDAV PUT).
    pub static_hosts: Vec<Peer>,
    /// A SockJS message larger than this is refused.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    #[serde(default = "default_max_worker_frame")]
    pub max_worker_frame_bytes: usize,
    /// The log client's spool.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// SockJS heartbeat period.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    /// A SockJS session with no transport attached is closed after this long.
    #[serde(default = "default_disconnect")]
    pub disconnect_seconds: u64,
    /// Origins allowed to use the site with a person's cookie (`https://<public_name>` when
    /// empty).
    #[serde(default)]
    pub origins: Vec<String>,
    /// A cell's output past this many bytes is dropped, and its viewers told (`truncated`).
    #[serde(default = "default_max_cell_output")]
    pub max_cell_output_bytes: usize,
    /// A browser session with more than this waiting to be sent is not reading: it is closed.
    #[serde(default = "default_max_queued")]
    pub max_queued_bytes: usize,
}

fn default_max_cell_output() -> usize {
    4 << 20
}
fn default_max_queued() -> usize {
    8 << 20
}

fn default_max_message() -> usize {
    1 << 20
}
fn default_max_worker_frame() -> usize {
    160 << 20
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/sage-backend")
}
fn default_heartbeat() -> u64 {
    25
}
fn default_disconnect() -> u64 {
    5
}

impl HasTls for Config {
    fn tls(&mut self) -> &mut TlsPaths {
        &mut self.tls
    }
}

impl Config {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Config> {
        crate::config::load(path)
    }

    pub fn max_bundle_bytes(&self) -> usize {
        (self.max_bundle_mb as usize) << 20
    }
}

/// An error a client gets: an HTTP status and a message meant for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// Seconds to wait before trying again (429), sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad(m: impl Into<String>) -> ApiError {
        ApiError::new(400, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(401, m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(403, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, m)
    }
    pub fn too_large(m: impl Into<String>) -> ApiError {
        ApiError::new(413, m)
    }
    pub fn busy(m: impl Into<String>) -> ApiError {
        ApiError::new(503, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        let m = m.into();
        tracing::error!("internal error: {m}");
        ApiError::new(500, m)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        tracing::error!("database: {e}");
        ApiError::new(503, "the database failed this request; try again")
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> ApiError {
        tracing::error!("database: {e}");
        ApiError::new(503, e.to_string())
    }
}

/// The backend's metrics (`sagews_backend_*`, `/api/metrics`), registered once; the gauges are
/// read at each scrape (`Backend::metrics_response`).
#[derive(Default)]
pub struct Metrics {
    pub signups: Counter,
    pub signins: Counter,
    pub signin_failures: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub sockjs_opened: Counter,
    pub sockjs_refused: Counter,
    pub messages: Counter,
    pub bad_messages: Counter,
    pub executes: Counter,
    pub workspaces_opened: Counter,
    pub worker_failovers: Counter,
    pub drain_moves: Counter,
    pub publishes: Counter,
    /// Not exported (HAProxy's and our own limits are told in logs).
    pub throttled: Counter,
    sockjs_sessions: Gauge,
    open_workspaces: Gauge,
    healthy_workers: Gauge,
    draining_workers: Gauge,
    registry: Registry,
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics::default();
        // Counters are named without `_total`: the encoder adds it. One line a metric.
        #[rustfmt::skip]
        let counters = [
            ("signups", "Accounts created", &m.signups),
            ("signins", "Successful sign-ins", &m.signins),
            ("signin_failures", "Refused sign-ins", &m.signin_failures),
            ("session_cache_hits", "Sign-in sessions found in memcached", &m.cache_hits),
            ("session_cache_misses", "Sign-in sessions read from PostgreSQL", &m.cache_misses),
            ("sockjs_sessions_opened", "SockJS sessions opened", &m.sockjs_opened),
            ("sockjs_sessions_refused", "SockJS sessions refused (backend full)", &m.sockjs_refused),
            ("messages", "Messages from browsers", &m.messages),
            ("bad_messages", "Messages refused (invalid or oversized)", &m.bad_messages),
            ("executes", "Executes sent to workers", &m.executes),
            ("workspaces_opened", "Workspaces opened on a worker", &m.workspaces_opened),
            ("worker_failovers", "Workspaces moved after losing their worker", &m.worker_failovers),
            ("drain_moves", "Workspaces moved off a draining worker", &m.drain_moves),
            ("publishes", "Workspaces published", &m.publishes),
        ];
        #[rustfmt::skip]
        let gauges = [
            ("sockjs_sessions", "SockJS sessions now", &m.sockjs_sessions),
            ("open_workspaces", "Workspaces open now", &m.open_workspaces),
            ("healthy_workers", "Workers heard from recently", &m.healthy_workers),
            ("draining_workers", "Healthy workers being drained (no new sessions; this backend moves its workspaces off them)", &m.draining_workers),
        ];
        let mut registry = Registry::with_prefix("sagews_backend");
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        for (name, help, g) in gauges {
            registry.register(name, help, g.clone());
        }
        Metrics { registry, ..m }
    }

    pub fn inc(&self, c: &Counter) {
        c.inc();
    }
}

/// Everything a request handler needs; one per process.
pub struct Backend {
    pub config: Config,
    /// The origins allowed to use the site with credentials (see `origin.rs`).
    pub origins: Vec<String>,
    pub identity: Identity,
    pub pool: Pool,
    pub cache: cache::Cache,
    pub metrics: Metrics,
    pub workers: workers::Registry,
    pub open: open::OpenWorkspaces,
    pub sockjs: sockjs::Sessions,
    pub log: Option<LogClient>,
    /// Set when the backend stops: requests are refused as `restarting` (see `hand_over`).
    pub stopping: std::sync::atomic::AtomicBool,
    /// Browser requests being handled now.
    pub handling: std::sync::atomic::AtomicUsize,
    /// When this process started (workers announce themselves within seconds of it).
    pub born: std::time::Instant,
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE sessions (
    token_hash bytea PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE,
    expires timestamptz NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires);
CREATE TABLE workspaces (
    id text PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts ON DELETE CASCADE,
    name text NOT NULL,
    bundle bytea,
    version bigint NOT NULL DEFAULT 0,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now(),
    published timestamptz,
    UNIQUE (account_id, name)
);
CREATE TABLE workers (
    host text PRIMARY KEY,
    address text NOT NULL,
    capacity int NOT NULL,
    engines text[] NOT NULL,
    sessions int NOT NULL,
    load float8 NOT NULL,
    last_seen timestamptz NOT NULL,
    seen_by text NOT NULL
);
"#,
    r#"
CREATE TABLE auth_events (
    key text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_events_key_at ON auth_events (key, at);
"#,
    // Workspaces open on workers, per account, across backends (fair shares).
    r#"
CREATE TABLE open_sessions (
    workspace text PRIMARY KEY REFERENCES workspaces ON DELETE CASCADE,
    account_id bigint NOT NULL,
    backend text NOT NULL,
    worker text NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX open_sessions_account ON open_sessions (account_id);
"#,
    // A sign-in attempt is counted before its password is checked, and uncounted if it was
    // right (throttle.rs `reserve`): rows need an identity.
    r#"
ALTER TABLE auth_events ADD COLUMN id bigserial;
"#,
    // The operators' page (fleet.rs): whether a worker is draining, and the backends.
    r#"
ALTER TABLE workers ADD COLUMN draining boolean NOT NULL DEFAULT false;
CREATE TABLE backends (
    host text PRIMARY KEY,
    sockjs_sessions int NOT NULL,
    open_workspaces int NOT NULL,
    stopping boolean NOT NULL,
    last_seen timestamptz NOT NULL
);
"#,
];

/// The advisory lock serialising migrations of the backend's database.
const MIGRATION_LOCK: i64 = 727_275;

impl Backend {
    /// `/api/metrics`: the gauges read now, then the registry.
    pub fn metrics_response(&self) -> axum::response::Response {
        let m = &self.metrics;
        m.sockjs_sessions.set(self.sockjs.count() as i64);
        m.open_workspaces.set(self.open.count() as i64);
        m.healthy_workers.set(self.workers.healthy() as i64);
        m.draining_workers.set(self.workers.draining() as i64);
        crate::service::metrics_response(&m.registry)
    }

    pub async fn db(&self) -> Result<crate::db::Conn<'_>, ApiError> {
        Ok(self.pool.get().await?)
    }

    /// A record of the fleet as this backend sees it (a worker registered), when there is a
    /// logd: what `sagectl add-worker` waits for.
    pub fn fleet_event(&self, what: &str, fields: serde_json::Value) {
        let Some(log) = &self.log else { return };
        if let serde_json::Value::Object(m) = fields {
            log.log(Level::Info, "backend.fleet", what, m);
        }
    }

    /// An audit record not tied to a signed-in account (refusals), when there is a logd.
    pub fn audit_event(&self, what: &str, fields: serde_json::Value) {
        let Some(log) = &self.log else { return };
        if let serde_json::Value::Object(m) = fields {
            log.log(Level::Warn, "backend.audit", what, m);
        }
    }

    /// An audit record (account and workspace events) to logd, when there is one.
    pub fn audit(&self, what: &str, account: &accounts::Account, mut fields: serde_json::Value) {
        let Some(log) = &self.log else { return };
        if let Some(m) = fields.as_object_mut() {
            m.insert("account".into(), account.name.clone().into());
            m.insert("account_id".into(), account.id.into());
            log.log(Level::Info, "backend.audit", what, m.clone());
        }
    }
}

/// Runs the backend until `shutdown` completes: migrations, then the HTTPS and worker listeners.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let identity = config.tls.identity()?;
    let pool = Pool::new(config.database.clone(), identity.roots.clone());
    // Migrations first; the database may still be starting: retry for a while.
    let mut tries = 0;
    loop {
        let r = async {
            let mut c = pool.get().await?;
            crate::db::migrate(&mut c, MIGRATION_LOCK, MIGRATIONS)
                .await
                .map_err(anyhow::Error::from)
        }
        .await;
        match r {
            Ok(()) => break,
            Err(e) if tries < 30 => {
                tries += 1;
                tracing::warn!("database not ready ({e:#}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.context("migrating the backend's database")),
        }
    }
    let log = match &config.logd {
        Some(l) => Some(LogClient::start(crate::logclient::Settings {
            address: l.address.clone(),
            server_name: l.server_name.clone(),
            identity: identity.clone(),
            spool_dir: config.state_dir.join("log-spool"),
            host: config.host.clone(),
            queue: 10_000,
            batch: 500,
        })?),
        None => None,
    };
    let cache = cache::Cache::new(config.memcached.clone(), &identity)?;
    let worker_listener = TcpListener::bind(config.worker_listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.worker_listen))?;
    let backend = Arc::new(Backend {
        pool,
        cache,
        metrics: Metrics::new(),
        workers: workers::Registry::default(),
        open: open::OpenWorkspaces::default(),
        sockjs: sockjs::Sessions::default(),
        log,
        identity,
        origins: origin::allowed(&config),
        config,
        stopping: Default::default(),
        handling: Default::default(),
        born: std::time::Instant::now(),
    });
    let service = Service::new();
    let announcing = Announcing(backend.clone());
    let workers_tls = backend.identity.server_config(&["worker"])?;
    service.accept_tls("worker port", worker_listener, workers_tls, announcing);
    service.spawn(sockjs::reaper(backend.clone()));
    // What this backend held open before a crash (or a stop whose saves failed) is not open
    // through it any more, but its sessions may still run on their workers with work newer
    // than the last save: marked, they are taken over when their workspaces open again (see
    // `place`), and forgotten after the workers' idle timeout.
    backend
        .db()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))?
        .execute(
            "UPDATE open_sessions SET backend = backend || ' (before restart)' WHERE backend = $1",
            &[&backend.config.host],
        )
        .await?;
    service.spawn(expire_sessions(backend.clone()));
    backend.ensure_admins().await?;
    service.spawn(fleet::record_self(backend.clone()));
    let https = backend.identity.server_config(&["loadbalancer"])?;
    let mut https = Arc::unwrap_or_clone(https);
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The listener is a part of its own: on stop it closes first (see `hand_over`).
    let edge = service.part();
    let tls = edge.tls_listener("https", listener, Arc::new(https))?;
    tracing::info!(listen = %backend.config.listen, workers = %backend.config.worker_listen, "backend ready");
    // Connections stay open until `hand_over` has told their browsers to reconnect; any left a
    // second after that are closed.
    service.serve_http(
        "https",
        tls,
        routes::router(backend.clone()),
        Duration::from_secs(1),
    );
    shutdown.await;
    backend.hand_over(&edge).await;
    service.stop(Duration::from_millis(1500)).await;
    Ok(())
}

/// How long running cells get to end when the backend stops, before their workspaces are saved
/// and closed anyway (the unit's TimeoutStopSec is 20 s: this, the saves, the stop).
const QUIESCE: Duration = Duration::from_secs(5);
/// The close code that tells browsers the server is restarting: reconnect now (WebSocket's
/// "Service Restart"; static/sagews.js reconnects at once on it).
pub const RESTARTING: u16 = 1012;
/// How long closed browser sessions get for their close frame to be taken (a poll comes back
/// at once; a browser that stopped polling is closed anyway a little later).
const TAKEN: Duration = Duration::from_secs(2);

impl Backend {
    /// Hands the browsers over to another backend when this one stops (a rolling upgrade
    /// restarts each in turn). From the stop on: HAProxy's check fails (no new browsers);
    /// a new browser session is refused with [`RESTARTING`] and the browser's persistence
    /// cookie expired, so it goes elsewhere; a request is refused as `restarting`, which the
    /// client sends again once reconnected. Running cells get [`QUIESCE`] to end; every open
    /// workspace is saved and closed, so another backend reopens it with everything typed; then
    /// every browser session is closed with [`RESTARTING`] and clients reconnect at once. The
    /// listener stays open until those close frames are taken (a polling browser's next poll
    /// must still reach this backend to read what was queued for it), at most [`TAKEN`].
    async fn hand_over(self: &Arc<Self>, edge: &Service) {
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        self.stopping.store(true, Ordering::SeqCst);
        let busy = || {
            self.handling.load(Ordering::SeqCst)
                + self.open.all().iter().map(|w| w.running()).sum::<usize>()
        };
        while busy() > 0 && started.elapsed() < QUIESCE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = busy();
        if left > 0 {
            tracing::warn!(
                left,
                "requests and cells still running {QUIESCE:?} after the stop: their workspaces are saved and closed anyway"
            );
        }
        // Save what browsers left open, so nothing typed since the last save is lost.
        if tokio::time::timeout(Duration::from_secs(10), self.close_all())
            .await
            .is_err()
        {
            tracing::error!("saving the open workspaces took over 10 s: stopped");
        }
        let sessions = self
            .sockjs
            .close_all(RESTARTING, "the server is restarting: reconnect");
        let closing = std::time::Instant::now();
        while self.sockjs.count() > 0 && closing.elapsed() < TAKEN {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        edge.token().cancel();
        tracing::info!(
            sessions,
            untaken = self.sockjs.count(),
            ms = started.elapsed().as_millis() as u64,
            "handed the browsers over"
        );
    }
}

/// Deletes expired sign-in sessions every hour, a thousand rows at a time (short transactions;
/// several backends doing it at once only share the work).
async fn expire_sessions(backend: Arc<Backend>) {
    let window = f64::from(backend.config.accounts.limit_window_seconds);
    loop {
        // Small batches, so no statement holds locks for long.
        delete_in_batches(
            &backend,
            "expired sign-in sessions",
            "DELETE FROM sessions WHERE token_hash IN
             (SELECT token_hash FROM sessions WHERE expires < now() LIMIT 1000)",
            &[],
        )
        .await;
        // Sessions left by a backend's previous life and not taken over: their workers have
        // closed them at their idle timeout.
        delete_in_batches(
            &backend,
            "open-session records left before a restart",
            "DELETE FROM open_sessions WHERE workspace IN (SELECT workspace FROM open_sessions
             WHERE backend LIKE '% (before restart)' AND since < now() - interval '35 minutes' LIMIT 1000)",
            &[],
        )
        .await;
        // Open sessions a backend recorded and never cleared (it died and did not come back):
        // no session outlives a day.
        delete_in_batches(
            &backend,
            "open-session records older than a day",
            "DELETE FROM open_sessions WHERE workspace IN (SELECT workspace FROM open_sessions
             WHERE since < now() - interval '1 day' LIMIT 1000)",
            &[],
        )
        .await;
        delete_in_batches(
            &backend,
            "sign-in attempts older than the limits' window",
            "DELETE FROM auth_events WHERE ctid IN (SELECT ctid FROM auth_events
             WHERE at < now() - make_interval(secs => $1) LIMIT 1000)",
            &[&window],
        )
        .await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn delete_in_batches(
    backend: &Backend,
    what: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    loop {
        let r = async { Ok::<_, ApiError>(backend.db().await?.execute(sql, params).await?) }.await;
        match r {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "{what}"),
            _ => break,
        }
    }
}

/// Workers' connections to the worker port (their `register` and heartbeats).
struct Announcing(Arc<Backend>);

impl crate::service::Handler for Announcing {
    type Permit = ();

    fn admit(&self, _: SocketAddr) -> Option<()> {
        Some(())
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        tracing::warn!(%peer, "worker port: TLS refused: {why}");
    }

    async fn serve(
        &self,
        tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        peer: SocketAddr,
        _: (),
    ) {
        self.0.clone().announcements(tls, peer).await;
    }
}
