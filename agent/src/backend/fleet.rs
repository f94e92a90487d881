//! The operators' page's server side (issue 16): accounts the inventory names as admins
//! (`backend.admins`) see the workers (as every backend records them in PostgreSQL), the
//! backends (each records itself every few seconds) and the latest audit records (from logd's
//! query API with this backend's certificate, which logd limits to audit records), and may
//! drain or undrain a worker: the backend asks the worker over its own link (the worker sets
//! the same flag file `sage-agent drain` sets) and waits for its heartbeat to say so. Every
//! check is made here, on the server; every action is an audit record in logd.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::accounts::Account;
use super::{ApiError, Backend};
use crate::proto::Request;

/// How often a backend records itself for the page.
const RECORD_EVERY: Duration = Duration::from_secs(5);
/// Audit records the page shows.
const AUDIT_SHOWN: usize = 20;

/// A worker as the page shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetWorker {
    pub host: String,
    pub address: String,
    pub capacity: i32,
    pub sessions: i32,
    pub load: f64,
    /// Seconds since its last heartbeat reached a backend.
    pub heard_seconds_ago: f64,
    pub seen_by: String,
    pub draining: bool,
}

/// A backend as the page shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetBackend {
    pub host: String,
    pub sockjs_sessions: i32,
    pub open_workspaces: i32,
    pub stopping: bool,
    /// Seconds since it last recorded itself.
    pub heard_seconds_ago: f64,
}

/// An audit record (logd's row, the fields the page shows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub ts_ms: i64,
    pub host: String,
    pub target: String,
    pub message: String,
    pub fields: serde_json::Value,
}

impl Backend {
    /// Whether `account` is an operator (the inventory's `backend.admins`).
    pub fn is_admin(&self, account: &Account) -> bool {
        self.config.admins.contains(&account.name)
    }

    fn admin_only(&self, account: &Account, what: &str) -> Result<(), ApiError> {
        if self.is_admin(account) {
            return Ok(());
        }
        self.audit(
            "refused an operator's action to a non-operator",
            account,
            serde_json::json!({"action": what}),
        );
        Err(ApiError::forbidden(
            "only the deployment's operators (backend.admins in the inventory) may do this",
        ))
    }

    /// The operators' page: workers, backends, the latest audit records (an empty list and the
    /// reason when logd cannot be asked).
    pub async fn fleet(
        &self,
        account: &Account,
    ) -> Result<
        (
            Vec<FleetWorker>,
            Vec<FleetBackend>,
            Vec<AuditEntry>,
            Option<String>,
        ),
        ApiError,
    > {
        self.admin_only(account, "fleet")?;
        let db = self.db().await?;
        let workers = db
            .query(
                "SELECT host, address, capacity, sessions, load,
                        extract(epoch from now() - last_seen)::float8, seen_by, draining
                 FROM workers ORDER BY host",
                &[],
            )
            .await?
            .iter()
            .map(|r| FleetWorker {
                host: r.get(0),
                address: r.get(1),
                capacity: r.get(2),
                sessions: r.get(3),
                load: r.get(4),
                heard_seconds_ago: r.get(5),
                seen_by: r.get(6),
                draining: r.get(7),
            })
            .collect();
        let backends = db
            .query(
                "SELECT host, sockjs_sessions, open_workspaces, stopping,
                        extract(epoch from now() - last_seen)::float8
                 FROM backends ORDER BY host",
                &[],
            )
            .await?
            .iter()
            .map(|r| FleetBackend {
                host: r.get(0),
                sockjs_sessions: r.get(1),
                open_workspaces: r.get(2),
                stopping: r.get(3),
                heard_seconds_ago: r.get(4),
            })
            .collect();
        drop(db);
        let (audit, audit_error) = match self.latest_audit().await {
            Ok(a) => (a, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Ok((workers, backends, audit, audit_error))
    }

    /// The latest audit records, from logd's query API (this backend's certificate: logd
    /// answers it with audit records only).
    async fn latest_audit(&self) -> Result<Vec<AuditEntry>, String> {
        let Some(l) = &self.config.logd else {
            return Err("this deployment has no logd".into());
        };
        let Some(query) = &l.query else {
            return Err("logd's query address is not configured".into());
        };
        let cfg = self
            .identity
            .client_config(&["logd"])
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(l.server_name.clone())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let tcp = tokio::net::TcpStream::connect(query.as_str()).await?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            let mut s = tokio::io::BufReader::new(tls);
            crate::http1::request(
                &mut s,
                "GET",
                &l.server_name,
                &format!("/api/records?limit={AUDIT_SHOWN}"),
                &[],
                b"",
                4 << 20,
            )
            .await
        };
        let r = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| "logd did not answer within 5 s".to_string())?
            .map_err(|e| format!("asking logd: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "logd answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        let mut rows: Vec<serde_json::Value> =
            serde_json::from_slice(&r.body).map_err(|e| format!("logd's answer: {e}"))?;
        rows.reverse(); // newest first
        Ok(rows
            .into_iter()
            .map(|v| AuditEntry {
                ts_ms: v["ts_ms"].as_i64().unwrap_or(0),
                host: v["host"].as_str().unwrap_or("").to_string(),
                target: v["target"].as_str().unwrap_or("").to_string(),
                message: v["message"].as_str().unwrap_or("").to_string(),
                fields: v["fields"].clone(),
            })
            .collect())
    }

    /// Drains (`on`) or undrains worker `host` for an operator: the worker is asked over this
    /// backend's link, then its next heartbeat must say so (within 15 s). Recorded in logd.
    pub async fn drain_worker(
        self: &Arc<Self>,
        account: &Account,
        host: &str,
        on: bool,
    ) -> Result<bool, ApiError> {
        let what = if on { "drain" } else { "undrain" };
        self.admin_only(account, what)?;
        let address = self
            .workers
            .entries
            .lock()
            .unwrap()
            .get(host)
            .filter(|e| e.announcing)
            .map(|e| e.address.clone());
        let Some(address) = address else {
            return Err(ApiError::not_found(format!(
                "no worker {host} is registered with this backend"
            )));
        };
        let link = self.link(host, &address).await.map_err(ApiError::busy)?;
        link.send(Request::Drain { on })
            .await
            .map_err(ApiError::busy)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = self
                .workers
                .entries
                .lock()
                .unwrap()
                .get(host)
                .map(|e| e.draining);
            if now == Some(on) {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(ApiError::busy(format!(
                    "worker {host} was asked to {what} but its heartbeats do not say so yet: try again shortly"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.audit(
            &format!("operator {} {what}ed worker {host}", account.name),
            account,
            serde_json::json!({"worker": host, "draining": on}),
        );
        Ok(on)
    }

    /// Creates the operators' accounts that do not exist yet, with the deployment's generated
    /// admin password (an existing account keeps its own).
    pub async fn ensure_admins(&self) -> anyhow::Result<()> {
        let Some(password) = &self.config.admin_password else {
            return Ok(());
        };
        for name in &self.config.admins {
            let exists = self
                .db()
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
                .query_opt("SELECT 1 FROM accounts WHERE name = $1", &[name])
                .await?
                .is_some();
            if exists {
                continue;
            }
            let hash = super::accounts::hash_password(password.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            self.db()
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
                .execute(
                    "INSERT INTO accounts (name, password_hash) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING",
                    &[name, &hash],
                )
                .await?;
            tracing::info!(account = %name, "made the operator's account");
        }
        Ok(())
    }
}

/// Records this backend for the operators' page every few seconds until the service stops.
pub async fn record_self(backend: Arc<Backend>) {
    loop {
        let stopping = backend.stopping.load(std::sync::atomic::Ordering::SeqCst);
        if let Ok(db) = backend.db().await {
            let r = db
                .execute(
                    "INSERT INTO backends (host, sockjs_sessions, open_workspaces, stopping, last_seen)
                     VALUES ($1, $2, $3, $4, now())
                     ON CONFLICT (host) DO UPDATE SET sockjs_sessions = $2, open_workspaces = $3,
                       stopping = $4, last_seen = now()",
                    &[
                        &backend.config.host,
                        &(backend.sockjs.count() as i32),
                        &(backend.open.count() as i32),
                        &stopping,
                    ],
                )
                .await;
            if let Err(e) = r {
                tracing::warn!("recording this backend for the operators' page: {e}");
            }
        }
        tokio::time::sleep(RECORD_EVERY).await;
    }
}
