//! `sage-agent logd`: records from backends and sagectl into PostgreSQL, alert rules,
//! retention, replication to a peer, and queries (`query`). A TLS 1.3 listener that first checks the
//! peer's IP address against the allow-list (the address alone: the 2012 server compared the
//! (address, port) pair and so refused everyone), then requires a certificate of the deployment
//! with the backend, logd or admin role (never worker). Records are batched into PostgreSQL and
//! acknowledged only after commit; while the database is away nothing is acknowledged and the
//! bounded queue pushes back on the senders.

pub use sagews_wire::alerts;
pub mod query;
pub mod store;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

pub use crate::config::TlsPaths;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::frame::{self, FrameError};
use crate::proto::{LogReply, LogRequest};
use crate::service::Service;
use store::Incoming;
use tokio_rustls::server::TlsStream;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub address: String,
    pub server_name: String,
}

/// logd's configuration (`logd.json`, rendered by sagectl).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub inventory: String,
    pub host: String,
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub tls: TlsPaths,
    pub database: store::DbConfig,
    /// Addresses and CIDR blocks that may send records.
    pub allow: Vec<String>,
    pub batch_size: usize,
    pub retention_days: u32,
    pub alerts: serde_json::Value,
    pub replica: Option<Peer>,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    #[serde(default = "default_frame_seconds")]
    pub frame_seconds: u64,
    /// How often old records are deleted.
    #[serde(default = "default_retention_check")]
    pub retention_check_seconds: u64,
}

fn default_retention_check() -> u64 {
    3600
}

fn default_max_frame() -> usize {
    16 << 20
}
fn default_frame_seconds() -> u64 {
    10
}

impl crate::config::HasTls for Config {
    fn tls(&mut self) -> &mut TlsPaths {
        &mut self.tls
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let c: Config = crate::config::load(path)?;
        for a in &c.allow {
            anyhow::ensure!(
                parse_block(a).is_some(),
                "{}: allow: `{a}` is not an address or CIDR block",
                path.display()
            );
        }
        anyhow::ensure!(
            c.batch_size > 0,
            "{}: batch_size must be positive",
            path.display()
        );
        c.rules()
            .map_err(|e| anyhow::anyhow!("{}: alerts: {e}", path.display()))?;
        Ok(c)
    }

    /// The alert rules, checked.
    pub fn rules(&self) -> Result<alerts::Alerts, String> {
        let rules: Vec<alerts::Rule> =
            serde_json::from_value(self.alerts.clone()).map_err(|e| e.to_string())?;
        alerts::Alerts::new(rules)
    }
}

/// An allow-list entry: an address, or a CIDR block.
fn parse_block(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    let ip: IpAddr = a.parse().ok()?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => p.parse::<u8>().ok().filter(|n| *n <= bits)?,
        None => bits,
    };
    Some((ip, prefix))
}

fn as_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether `ip` (the peer's address, whatever its port) is on the allow-list.
pub fn allowed(ip: IpAddr, allow: &[String]) -> bool {
    allow
        .iter()
        .filter_map(|s| parse_block(s))
        .any(|(net, prefix)| {
            let bits = if net.is_ipv4() { 32 } else { 128 };
            if net.is_ipv4() != ip.is_ipv4() {
                return false;
            }
            let shift = u32::from(bits - prefix);
            as_u128(net).checked_shr(shift).unwrap_or(0)
                == as_u128(ip).checked_shr(shift).unwrap_or(0)
        })
}

#[derive(Default)]
pub struct Metrics {
    pub refused_addresses: AtomicU64,
    pub refused_handshakes: AtomicU64,
    pub records_stored: AtomicU64,
    pub duplicates: AtomicU64,
}

/// A client batch waiting for its commit.
struct Job {
    records: Vec<Incoming>,
    done: oneshot::Sender<(u64, u64)>,
}

/// Runs logd until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Arc<Metrics>> {
    let identity = crate::tls::Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let server = identity.server_config(&["backend", "logd", "admin"])?;
    let metrics = Arc::new(Metrics::default());
    let service = Service::new();
    let (jobs, rx) = mpsc::channel::<Job>(64);
    let rules = config.rules().map_err(|e| anyhow::anyhow!("alerts: {e}"))?;
    let (committed, committed_rx) = mpsc::channel(4);
    service.spawn(alerting(service.clone(), rules, committed_rx));
    service.spawn(writer(
        config.database.clone(),
        identity.roots.clone(),
        config.batch_size,
        rx,
        metrics.clone(),
        committed,
    ));
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.http_listen))?;
    let pool = crate::db::Pool::new(config.database.clone(), identity.roots.clone());
    query::serve(
        &service,
        http,
        identity.server_config(&["admin", "backend"])?,
        pool,
    )?;
    if let Some(peer) = config.replica.clone() {
        service.spawn(replicate(config.database.clone(), identity.clone(), peer));
    }
    service.spawn(retention(
        config.database.clone(),
        identity.roots.clone(),
        config.retention_days,
        config.retention_check_seconds,
    ));
    tracing::info!(listen = %listener.local_addr()?, "logd ready");
    let senders = Senders {
        config: Arc::new(config),
        jobs,
        metrics: metrics.clone(),
    };
    service.accept_tls("logd", listener, server, senders);
    shutdown.await;
    // Batches not committed yet are not acknowledged: their senders send them again.
    service.stop(Duration::from_secs(1)).await;
    Ok(metrics)
}

/// Connections from record senders, for the service's accept loop: the address is checked
/// against the allow-list before the handshake.
struct Senders {
    config: Arc<Config>,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl crate::service::Handler for Senders {
    type Permit = ();

    fn admit(&self, peer: SocketAddr) -> Option<()> {
        let ok = allowed(peer.ip(), &self.config.allow);
        if !ok {
            self.metrics
                .refused_addresses
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "refused: address not on the allow-list");
        }
        ok.then_some(())
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        self.metrics
            .refused_handshakes
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "refused at the TLS handshake: {why}");
    }

    async fn serve(&self, tls: TlsStream<TcpStream>, peer: SocketAddr, _: ()) {
        serve(tls, peer, &self.config, self.jobs.clone()).await;
    }
}

async fn serve(
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    config: &Config,
    jobs: mpsc::Sender<Job>,
) {
    // A peer logd replicating to us may say where a record first came from; nobody else may.
    let from_logd = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::role_of(c, &["logd".to_string()]))
        .is_some();
    let (mut rd, mut wr) = tokio::io::split(tls);
    // Acks go out in the order batches came in, each once its commit is done.
    let (pending_tx, mut pending) = mpsc::channel::<(u64, oneshot::Receiver<(u64, u64)>)>(64);
    let acker = tokio::spawn(async move {
        while let Some((batch, rx)) = pending.recv().await {
            let Ok((stored, duplicates)) = rx.await else {
                break;
            };
            if frame::write(
                &mut wr,
                &LogReply::Ack {
                    batch,
                    stored,
                    duplicates,
                },
            )
            .await
            .is_err()
            {
                break;
            }
        }
        wr
    });
    let body = Duration::from_secs(config.frame_seconds);
    let mut idle = body;
    let mut error = None;
    loop {
        match frame::read_in::<LogRequest, _>(&mut rd, config.max_frame_bytes, idle, body).await {
            Ok(LogRequest::Records { batch, records }) => {
                idle = Duration::from_secs(3600);
                let records = records
                    .into_iter()
                    .map(|mut record| {
                        store::sanitize(&mut record);
                        let claimed = record
                            .fields
                            .remove("_source")
                            .and_then(|v| v.as_str().and_then(|s| s.parse::<IpAddr>().ok()));
                        let source = if from_logd {
                            claimed.unwrap_or(peer.ip())
                        } else {
                            peer.ip()
                        };
                        Incoming { record, source }
                    })
                    .collect();
                let (done, rx) = oneshot::channel();
                if jobs.send(Job { records, done }).await.is_err()
                    || pending_tx.send((batch, rx)).await.is_err()
                {
                    break;
                }
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                tracing::warn!(%peer, "closing the connection: {e}");
                error = Some(e.to_string());
                break;
            }
        }
    }
    drop(pending_tx);
    if let Ok(mut wr) = acker.await {
        if let Some(message) = error {
            let _ = frame::write(
                &mut wr,
                &LogReply::Error {
                    message: format!("closing the connection: {message}"),
                },
            )
            .await;
        }
    }
}

/// Collects jobs into batches of up to `batch_size` records and commits them; retries (without
/// acknowledging anything) until the database takes them.
async fn writer(
    db: store::DbConfig,
    roots: Arc<rustls::RootCertStore>,
    batch_size: usize,
    mut rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    committed: mpsc::Sender<(Vec<Incoming>, store::Stored)>,
) {
    let mut client = None;
    let mut backoff = Duration::from_millis(100);
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut n = jobs[0].records.len();
        while n < batch_size {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.records.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut all: Vec<Incoming> = Vec::with_capacity(n);
        for j in &mut jobs {
            all.append(&mut j.records);
        }
        loop {
            if client.is_none() {
                match store::connect(&db, roots.clone()).await {
                    Ok(mut c) => match store::migrate(&mut c).await {
                        Ok(()) => {
                            client = Some(c);
                            backoff = Duration::from_millis(100);
                        }
                        Err(e) => tracing::warn!("database migration failed: {e}"),
                    },
                    Err(e) => tracing::warn!("database unreachable: {e}"),
                }
            }
            if let Some(c) = client.as_mut() {
                match store::write(c, &all).await {
                    Ok(new) => {
                        let stored = new.count(all.len()) as u64;
                        let total = all.len() as u64;
                        metrics.records_stored.fetch_add(stored, Ordering::Relaxed);
                        metrics
                            .duplicates
                            .fetch_add(total - stored, Ordering::Relaxed);
                        // Per-batch counts are not kept apart within one transaction: each job
                        // learns it is committed, with the transaction's totals.
                        for j in jobs {
                            let _ = j.done.send((stored, total - stored));
                        }
                        // The rest (alerts, freeing the records) is done off the database's
                        // critical path, while it takes the next batch.
                        let _ = committed.send((all, new)).await;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "writing records failed (will retry, nothing acknowledged): {e}"
                        );
                        client = None;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Looks at the committed records, each once (not at resent duplicates), in commit order, and
/// fires the alerts they raise.
async fn alerting(
    service: Service,
    mut rules: alerts::Alerts,
    mut committed: mpsc::Receiver<(Vec<Incoming>, store::Stored)>,
) {
    while let Some((all, new)) = committed.recv().await {
        let fresh: Vec<&crate::proto::LogRecord> = all
            .iter()
            .map(|i| &i.record)
            .filter(|r| new.is_new(&r.id))
            .collect();
        for alert in rules.observe(&fresh) {
            if let Some(action) = rules.action(&alert.rule).cloned() {
                service.spawn(alerts::fire(action, alert));
            }
        }
    }
}

/// Streams committed records to the peer, in commit order (one writer task commits, so `seq`
/// order is commit order), each batch marked done only once the peer acknowledged it; after an
/// outage of either side it goes on from the last acknowledged record: no gap, and a resend is
/// dropped by id.
async fn replicate(db: store::DbConfig, identity: crate::tls::Identity, peer: Peer) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let r: anyhow::Result<()> = async {
            let c = store::connect(&db, identity.roots.clone()).await?;
            let cfg = identity.client_config(&["logd"])?;
            let tcp =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&peer.address))
                    .await??;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(peer.server_name.clone())?;
            let mut s = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await??;
            let mut batch = 0u64;
            loop {
                let last = store::replicated(&c, &peer.address).await?;
                let rows = store::since(&c, last, 5000).await?;
                let Some(&(top, _)) = rows.last() else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                };
                batch += 1;
                let records = rows.into_iter().map(|(_, r)| r).collect();
                frame::write(&mut s, &LogRequest::Records { batch, records }).await?;
                match frame::read::<LogReply, _>(&mut s, 1 << 20, Duration::from_secs(60)).await? {
                    LogReply::Ack { batch: b, .. } if b == batch => {
                        store::set_replicated(&c, &peer.address, top).await?
                    }
                    other => anyhow::bail!("unexpected reply from the replica: {other:?}"),
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(peer = %peer.address, "replication paused: {e:#}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Deletes records past the retention, at start and then every `every` seconds.
async fn retention(db: store::DbConfig, roots: Arc<rustls::RootCertStore>, days: u32, every: u64) {
    loop {
        let mut wait = Duration::from_secs(every.max(1));
        match store::connect(&db, roots.clone()).await {
            Ok(mut c) => {
                let r = async {
                    store::migrate(&mut c).await?;
                    store::expire(&c, days).await
                }
                .await;
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!("retention: deleted {n} records older than {days} days")
                    }
                    Err(e) => tracing::warn!("retention: {e}"),
                }
            }
            Err(e) => {
                // The database may still be starting: try again soon, not in an hour.
                tracing::warn!("retention: database unreachable: {e}");
                wait = wait.min(Duration::from_secs(10));
            }
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn allow_list_checks_the_address_not_the_port() {
        let allow = vec!["10.77.0.13".to_string(), "198.51.100.64/26".to_string()];
        assert!(allowed("10.77.0.13".parse().unwrap(), &allow));
        assert!(allowed("198.51.100.70".parse().unwrap(), &allow));
        assert!(!allowed("198.51.100.130".parse().unwrap(), &allow));
        assert!(!allowed("127.0.0.2".parse().unwrap(), &allow));
        assert!(!allowed("::1".parse().unwrap(), &allow));
        assert!(allowed(
            "fd00::5".parse().unwrap(),
            &["fd00::/8".to_string()]
        ));
    }
}
