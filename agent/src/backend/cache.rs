//! memcached in front of PostgreSQL, over TLS with this host's certificate (the deployment's
//! memcached accepts nothing else). The text protocol's get/set/delete are all the backend needs.
//! The cache may vanish at any time: every failure is a miss, a server that failed is left alone
//! for a while, and callers fall back to the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::Peer;

struct Slot {
    server: Peer,
    conn: tokio::sync::Mutex<Option<BufReader<TlsStream<TcpStream>>>>,
    /// After a failure, no new connection before this instant.
    retry_at: std::sync::Mutex<Option<Instant>>,
}

pub struct Cache {
    slots: Vec<Slot>,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

/// Keys are ours (hex and fixed prefixes) but checked anyway: the protocol forbids spaces,
/// control characters and more than 250 bytes.
fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 250 && k.bytes().all(|b| b.is_ascii_graphic())
}

impl Cache {
    pub fn new(servers: Vec<Peer>, identity: &crate::tls::Identity) -> anyhow::Result<Cache> {
        let tls = if servers.is_empty() {
            None
        } else {
            Some(identity.client_config(&["cache"])?)
        };
        Ok(Cache {
            slots: servers
                .into_iter()
                .map(|server| Slot {
                    server,
                    conn: tokio::sync::Mutex::new(None),
                    retry_at: std::sync::Mutex::new(None),
                })
                .collect(),
            tls,
            timeout: Duration::from_millis(500),
        })
    }

    fn slot(&self, key: &str) -> Option<&Slot> {
        if self.slots.is_empty() {
            return None;
        }
        let h = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        Some(&self.slots[(h % self.slots.len() as u64) as usize])
    }

    /// Runs `op` on the key's server; `None` on any failure (logged once per outage).
    async fn with<T>(
        &self,
        key: &str,
        op: impl AsyncFnOnce(&mut BufReader<TlsStream<TcpStream>>) -> std::io::Result<T>,
    ) -> Option<T> {
        if !valid_key(key) {
            return None;
        }
        let slot = self.slot(key)?;
        let tls = self.tls.clone()?;
        let mut guard = slot.conn.lock().await;
        if guard.is_none() {
            if slot
                .retry_at
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t)
            {
                return None;
            }
            match tokio::time::timeout(self.timeout, connect(&slot.server, tls)).await {
                Ok(Ok(c)) => {
                    if slot.retry_at.lock().unwrap().take().is_some() {
                        tracing::info!(server = %slot.server.name, "memcached is back");
                    }
                    *guard = Some(c);
                }
                Ok(Err(e)) => return fail(slot, e.to_string()),
                Err(_) => return fail(slot, "connect timed out".into()),
            }
        }
        let conn = guard.as_mut().expect("connected above");
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                *guard = None;
                fail(slot, e.to_string())
            }
            Err(_) => {
                *guard = None;
                fail(slot, "timed out".into())
            }
        }
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.with(key, async |c| {
            c.get_mut()
                .write_all(format!("get {key}\r\n").as_bytes())
                .await?;
            let mut line = String::new();
            c.read_line(&mut line).await?;
            if line == "END\r\n" {
                return Ok(None);
            }
            // VALUE <key> <flags> <bytes>
            let len: usize = line
                .split_whitespace()
                .nth(3)
                .and_then(|n| n.parse().ok())
                .filter(|_| line.starts_with("VALUE "))
                .ok_or_else(|| std::io::Error::other(format!("unexpected reply {line:?}")))?;
            if len > 1 << 20 {
                return Err(std::io::Error::other("value too large"));
            }
            let mut data = vec![0; len + 2];
            c.read_exact(&mut data).await?;
            data.truncate(len);
            line.clear();
            c.read_line(&mut line).await?;
            if line != "END\r\n" {
                return Err(std::io::Error::other(format!("unexpected reply {line:?}")));
            }
            Ok(Some(data))
        })
        .await
        .flatten()
    }

    /// Stores `value` for `ttl` (at most 30 days, memcached's relative limit).
    pub async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> bool {
        let ttl = ttl.as_secs().clamp(1, 30 * 86400);
        self.with(key, async |c| {
            let mut msg = format!("set {key} 0 {ttl} {}\r\n", value.len()).into_bytes();
            msg.extend_from_slice(value);
            msg.extend_from_slice(b"\r\n");
            c.get_mut().write_all(&msg).await?;
            let mut line = String::new();
            c.read_line(&mut line).await?;
            Ok(line == "STORED\r\n")
        })
        .await
        .unwrap_or(false)
    }

    pub async fn delete(&self, key: &str) {
        self.with(key, async |c| {
            c.get_mut()
                .write_all(format!("delete {key}\r\n").as_bytes())
                .await?;
            let mut line = String::new();
            c.read_line(&mut line).await?;
            Ok(())
        })
        .await;
    }
}

fn fail<T>(slot: &Slot, why: String) -> Option<T> {
    let mut r = slot.retry_at.lock().unwrap();
    if r.is_none() {
        tracing::warn!(server = %slot.server.name, "memcached unavailable, using the database: {why}");
    }
    *r = Some(Instant::now() + Duration::from_secs(2));
    None
}

async fn connect(
    s: &Peer,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<BufReader<TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(&s.address).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(s.name.clone()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    Ok(BufReader::new(tls))
}
