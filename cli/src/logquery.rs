//! The query client of the deployment's logd: HTTPS on logd's query port with sagectl's admin
//! certificate (the port takes no other). Used by `sagectl logs` and the health checks.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::inventory::{Inventory, Role};

/// Which records to ask for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only records newer than this: 30s, 15m, 2h, 7d.
    pub since: String,
    /// Least level: trace, debug, info, warn, error.
    pub level: Option<String>,
    pub host: Option<String>,
    pub target: Option<String>,
    /// Only records whose message contains this text.
    pub text: Option<String>,
    pub limit: u32,
}

/// `30s`, `15m`, `2h`, `7d` in milliseconds.
pub fn parse_age(s: &str) -> Option<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * ms)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A query client for the inventory's logd.
pub struct Client {
    cfg: Arc<rustls::ClientConfig>,
    addr: String,
    name: ServerName<'static>,
    query: String,
}

impl Client {
    pub fn new(inv: &Inventory, query: impl Into<Query>) -> anyhow::Result<Client> {
        let o = query.into();
        let Some(logd) = inv
            .with_role(Role::Logd)
            .find(|h| Some(&h.name) != inv.logd.replica.as_ref())
        else {
            anyhow::bail!("{} has no logd host", inv.file.display());
        };
        let age = parse_age(&o.since).with_context(|| {
            format!(
                "--since {}: give a number and s, m, h or d, like 1h",
                o.since
            )
        })?;
        let state = crate::pki::open(inv)?;
        let admin = state.admin()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(
            state.ca_cert_pem().as_bytes(),
        )?)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(admin.chain_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(admin.key_pem.expose().as_bytes())?;
        let cfg = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)?,
        );
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        let mut query = format!("since={}&limit={}", now - age, o.limit);
        for (k, v) in [
            ("level", &o.level),
            ("host", &o.host),
            ("target", &o.target),
            ("text", &o.text),
        ] {
            if let Some(v) = v {
                query.push_str(&format!("&{k}={}", encode(v)));
            }
        }
        Ok(Client {
            cfg,
            addr: format!("{}:{}", logd.address, inv.logd.http_port),
            name: ServerName::try_from(logd.name.clone())?,
            query,
        })
    }

    /// Records matching the options, after `after` (a seq; 0 for all), oldest first.
    pub async fn records(&self, after: i64) -> anyhow::Result<Vec<serde_json::Value>> {
        let q = if after > 0 {
            format!("{}&after={after}", self.query)
        } else {
            self.query.clone()
        };
        let body = get(
            &self.cfg,
            &self.addr,
            self.name.clone(),
            &format!("/api/records?{q}"),
        )
        .await?;
        serde_json::from_str(&body).with_context(|| format!("logd answered: {body}"))
    }
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn format_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = sagews_wire::civil::from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

async fn get(
    cfg: &Arc<rustls::ClientConfig>,
    addr: &str,
    name: ServerName<'static>,
    path: &str,
) -> anyhow::Result<String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("connecting to logd at {addr}"))??;
    let mut s = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with logd at {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: logd\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("logd's answer has no body")?;
    let status = head.lines().next().unwrap_or("");
    anyhow::ensure!(status.contains(" 200 "), "logd answered {status}: {body}");
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_times() {
        assert_eq!(parse_age("90s"), Some(90_000));
        assert_eq!(parse_age("2h"), Some(7_200_000));
        assert_eq!(parse_age("h"), None);
        assert_eq!(parse_age("5y"), None);
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_795_800_000_123), "2026-11-27T17:20:00.123Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
