//! PostgreSQL for the agents: TLS connections verified against the deployment's CA (verify-full),
//! migrations applied under an advisory lock (agents starting together do not race), and a small
//! connection pool for the backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::Client;

/// Connection settings of an agent's database.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    pub host: String,
    /// The name in the server's certificate (its address works too: certificates carry both).
    pub server_name: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub password: String,
    /// Connections one process keeps at most (the backend's pool).
    #[serde(default = "default_pool")]
    pub pool: usize,
}

fn default_pool() -> usize {
    8
}

/// Connects with TLS verified against `roots` (verify-full).
pub async fn connect(
    db: &DbConfig,
    roots: Arc<rustls::RootCertStore>,
) -> Result<Client, tokio_postgres::Error> {
    let tls_cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_cfg);
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&db.host)
        .port(db.port)
        .dbname(&db.name)
        .user(&db.user)
        .password(&db.password);
    cfg.ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!("database connection ended: {e}");
        }
    });
    Ok(client)
}

/// Applies the migrations not applied yet, in one transaction holding advisory lock `lock`.
pub async fn migrate(
    c: &mut Client,
    lock: i64,
    migrations: &[&str],
) -> Result<(), tokio_postgres::Error> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version int PRIMARY KEY)")
        .await?;
    let done: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await?
        .get(0);
    for (i, m) in migrations.iter().enumerate().skip(done as usize) {
        tx.batch_execute(m).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
    }
    tx.commit().await
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the database is busy: no connection free within {0:?}")]
    Busy(Duration),
    #[error("the database is unreachable: {0}")]
    Connect(#[from] tokio_postgres::Error),
}

/// At most `pool` connections, reused; a broken one is dropped and replaced on the next `get`.
pub struct Pool {
    cfg: DbConfig,
    roots: Arc<rustls::RootCertStore>,
    idle: Mutex<Vec<Client>>,
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

/// A connection borrowed from the pool; goes back when dropped (unless it broke).
pub struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                self.pool.idle.lock().unwrap().push(c);
            }
        }
    }
}

impl Pool {
    pub fn new(cfg: DbConfig, roots: Arc<rustls::RootCertStore>) -> Pool {
        let n = cfg.pool.max(1);
        Pool {
            cfg,
            roots,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(n)),
            wait: Duration::from_secs(10),
        }
    }

    pub async fn get(&self) -> Result<Conn<'_>, PoolError> {
        let permit = tokio::time::timeout(self.wait, self.permits.acquire())
            .await
            .map_err(|_| PoolError::Busy(self.wait))?
            .expect("the semaphore is never closed");
        loop {
            let idle = self.idle.lock().unwrap().pop();
            match idle {
                Some(c) if c.is_closed() => continue,
                Some(c) => {
                    return Ok(Conn {
                        client: Some(c),
                        pool: self,
                        _permit: permit,
                    });
                }
                None => break,
            }
        }
        let c = connect(&self.cfg, self.roots.clone()).await?;
        Ok(Conn {
            client: Some(c),
            pool: self,
            _permit: permit,
        })
    }
}
