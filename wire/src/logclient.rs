//! The log client used by the backend and sagectl: `log` never blocks its caller; records go
//! to logd in batches over TLS and are kept until logd acknowledges them (after its commit).
//! While logd is unreachable, what is waiting spills to a disk spool (one JSON-lines file per
//! spill), which is sent first after every reconnect, and also after the client's own process
//! restarts. A resend after a lost ack is harmless: logd drops duplicates by record id.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::frame;
use crate::proto::{Level, LogRecord, LogReply, LogRequest};
use crate::tls::Identity;

/// Where logd is and how to reach it.
#[derive(Clone)]
pub struct Settings {
    pub address: String,
    pub server_name: String,
    pub identity: Identity,
    pub spool_dir: PathBuf,
    /// This host's name, written into every record.
    pub host: String,
    /// Records held in memory before `log` spills straight to the spool.
    pub queue: usize,
    pub batch: usize,
}

#[derive(Default)]
pub struct Counters {
    pub acked: AtomicU64,
    pub spilled: AtomicU64,
}

/// A handle to the client's background task.
#[derive(Clone)]
pub struct LogClient {
    tx: mpsc::Sender<LogRecord>,
    host: String,
    spool_dir: PathBuf,
    next_id: Arc<AtomicU64>,
    id_prefix: String,
    /// Records that found the queue full; written to the spool as one file when it fills up.
    overflow: Arc<std::sync::Mutex<Vec<LogRecord>>>,
    pub counters: Arc<Counters>,
}

/// Overflow records gathered before one spill to disk.
const SPILL_AT: usize = 5_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl LogClient {
    /// Starts the client's task on the current tokio runtime.
    pub fn start(s: Settings) -> std::io::Result<LogClient> {
        std::fs::create_dir_all(&s.spool_dir)?;
        let (tx, rx) = mpsc::channel(s.queue.max(1));
        let counters = Arc::new(Counters::default());
        let overflow = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = LogClient {
            tx,
            host: s.host.clone(),
            spool_dir: s.spool_dir.clone(),
            next_id: Arc::new(AtomicU64::new(0)),
            id_prefix: format!("{}-{}", s.host, random_hex()),
            overflow: overflow.clone(),
            counters: counters.clone(),
        };
        tokio::spawn(sender(s, rx, overflow, counters));
        Ok(c)
    }

    /// Queues a record; never waits. When the queue is full the record goes to the spool.
    pub fn log(
        &self,
        level: Level,
        target: &str,
        message: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let record = LogRecord {
            id: format!("{}-{n}", self.id_prefix),
            ts_ms: now_ms(),
            host: self.host.clone(),
            level,
            target: target.to_string(),
            message: message.to_string(),
            fields,
        };
        if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) =
            self.tx.try_send(record)
        {
            let full = {
                let mut o = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
                o.push(r);
                if o.len() >= SPILL_AT {
                    std::mem::take(&mut *o)
                } else {
                    Vec::new()
                }
            };
            if !full.is_empty() && spill(&self.spool_dir, &full).is_ok() {
                self.counters
                    .spilled
                    .fetch_add(full.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Appends records to a new spool file (written whole, then renamed into place).
fn spill(dir: &Path, records: &[LogRecord]) -> std::io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("records serialize"));
        text.push('\n');
    }
    let name = format!(
        "{:020}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        random_hex()
    );
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(format!("{name}.jsonl")))
}

/// Spool files, oldest first.
fn spooled(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(s: &Settings) -> anyhow::Result<Tls> {
    let cfg = s.identity.client_config(&["logd"])?;
    let tcp =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&s.address)).await??;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(s.server_name.clone())?;
    Ok(tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await??)
}

/// Sends `records` in batches and waits for every ack; Err means the connection failed and
/// nothing after the last ack is known to be stored.
async fn deliver(
    conn: &mut Tls,
    records: &[LogRecord],
    batch: usize,
    next: &mut u64,
) -> anyhow::Result<()> {
    let mut waiting = VecDeque::new();
    for chunk in records.chunks(batch.max(1)) {
        *next += 1;
        frame::write(
            conn,
            &LogRequest::Records {
                batch: *next,
                records: chunk.to_vec(),
            },
        )
        .await?;
        waiting.push_back(*next);
        // Keep a few batches in flight.
        while waiting.len() >= 4 {
            expect_ack(conn, &mut waiting).await?;
        }
    }
    while !waiting.is_empty() {
        expect_ack(conn, &mut waiting).await?;
    }
    Ok(())
}

async fn expect_ack(conn: &mut Tls, waiting: &mut VecDeque<u64>) -> anyhow::Result<()> {
    match frame::read::<LogReply, _>(conn, 1 << 20, Duration::from_secs(60)).await? {
        LogReply::Ack { batch, .. } if Some(&batch) == waiting.front() => {
            waiting.pop_front();
            Ok(())
        }
        other => anyhow::bail!("unexpected reply from logd: {other:?}"),
    }
}

async fn sender(
    s: Settings,
    mut rx: mpsc::Receiver<LogRecord>,
    overflow: Arc<std::sync::Mutex<Vec<LogRecord>>>,
    counters: Arc<Counters>,
) {
    let mut conn: Option<Tls> = None;
    let mut pending: Vec<LogRecord> = Vec::new();
    let mut next = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        if conn.is_none() {
            match connect(&s).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = Duration::from_millis(100);
                }
                Err(_) => {
                    // logd unreachable: what waits goes to disk, then retry later.
                    while let Ok(r) = rx.try_recv() {
                        pending.push(r);
                    }
                    if spill(&s.spool_dir, &pending).is_ok() {
                        counters
                            .spilled
                            .fetch_add(pending.len() as u64, Ordering::Relaxed);
                        pending.clear();
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        // The spool first, oldest file first; a file goes once all of it is acknowledged.
        let mut failed = false;
        for file in spooled(&s.spool_dir) {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let records: Vec<LogRecord> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            match deliver(c, &records, s.batch, &mut next).await {
                Ok(()) => {
                    counters
                        .acked
                        .fetch_add(records.len() as u64, Ordering::Relaxed);
                    let _ = std::fs::remove_file(&file);
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            conn = None;
            continue;
        }
        if pending.is_empty() {
            pending.append(&mut overflow.lock().unwrap_or_else(|e| e.into_inner()));
        }
        if pending.is_empty() {
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some(r)) => pending.push(r),
                Ok(None) => return,
                Err(_) => continue,
            }
            while pending.len() < s.batch {
                match rx.try_recv() {
                    Ok(r) => pending.push(r),
                    Err(_) => break,
                }
            }
        }
        match deliver(c, &pending, s.batch, &mut next).await {
            Ok(()) => {
                counters
                    .acked
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
            }
            Err(_) => conn = None, // kept in `pending`, resent (or spilled) next time round
        }
    }
}

impl LogClient {
    /// Waits until `n` records in all have been acknowledged, or `timeout`.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.counters.acked.load(Ordering::Relaxed) < n {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

/// Sends `records` (after anything already spooled) and waits for logd's acks; on any failure
/// they go to the spool, to be sent by the next client using the same spool directory. Returns
/// whether they were delivered now. For short-lived programs such as sagectl.
pub async fn deliver_or_spool(s: &Settings, records: Vec<LogRecord>) -> std::io::Result<bool> {
    std::fs::create_dir_all(&s.spool_dir)?;
    let sent = async {
        let mut conn = connect(s).await?;
        let mut next = 0u64;
        for file in spooled(&s.spool_dir) {
            let text = std::fs::read_to_string(&file)?;
            let old: Vec<LogRecord> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            deliver(&mut conn, &old, s.batch, &mut next).await?;
            std::fs::remove_file(&file)?;
        }
        deliver(&mut conn, &records, s.batch, &mut next).await
    };
    match tokio::time::timeout(Duration::from_secs(15), sent).await {
        Ok(Ok(())) => Ok(true),
        _ => spill(&s.spool_dir, &records).map(|()| false),
    }
}

/// A record stamped now, with a fresh unique id.
pub fn record(
    host: &str,
    level: Level,
    target: &str,
    message: &str,
    fields: serde_json::Map<String, serde_json::Value>,
) -> LogRecord {
    LogRecord {
        id: format!("{host}-{}", random_hex()),
        ts_ms: now_ms(),
        host: host.to_string(),
        level,
        target: target.to_string(),
        message: message.to_string(),
        fields,
    }
}
