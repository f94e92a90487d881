//! HTTPS to the deployment's HAProxy as a browser makes it: TLS trusting the deployment's CA
//! for the site's public name (ALPN http/1.1), from a chosen local address when given, a
//! cookie jar kept as a browser keeps it (the sign-in's cookie, HAProxy's `SAGEWS_BACKEND`
//! set again when HAProxy sends the browser elsewhere and expired by a stopping backend), and
//! kept-alive connections for the polling transport.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagews_wire::http1::{self, Response};
use tokio::io::BufReader;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// How long a connection (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A kept-alive connection idle longer than this is replaced before a request: HAProxy closes
/// idle client connections after `timeout http-keep-alive` (10 s), and a request written on a
/// connection it has just closed may or may not have reached it.
const KEEP_IDLE: Duration = Duration::from_secs(4);

/// The deployed site: where HAProxy listens, its public name, the TLS settings trusting the
/// deployment's CA.
pub struct Site {
    pub name: String,
    pub addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

/// One TLS connection to the site.
pub type Tls = TlsStream<TcpStream>;

impl Site {
    /// The site `name` at `addr`, trusting the CA certificate(s) in `ca` (PEM).
    pub fn new(name: &str, addr: SocketAddr, ca: &Path) -> anyhow::Result<Site> {
        use anyhow::Context;
        use rustls::pki_types::pem::PemObject;
        sagews_wire::tls::init();
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading the deployment's CA {}", ca.display()))?;
        for c in certs {
            let c = c.with_context(|| format!("reading {}", ca.display()))?;
            roots
                .add(c)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // HAProxy offers h2 too; a browser's websocket and our HTTP/1.1 client want 1.1.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        rustls::pki_types::ServerName::try_from(name.to_string())
            .with_context(|| format!("{name:?} is not a server name"))?;
        Ok(Site {
            name: name.to_string(),
            addr,
            tls: Arc::new(cfg),
        })
    }

    /// A new TLS connection, from `source` when given.
    pub async fn connect(&self, source: Option<IpAddr>) -> std::io::Result<Tls> {
        let work = async {
            let sock = if self.addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(ip) = source {
                sock.bind(SocketAddr::new(ip, 0))?;
            }
            let tcp = sock.connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(self.name.clone())
                .expect("checked in Site::new");
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection to {} within {CONNECT_TIMEOUT:?}", self.addr),
            )),
        }
    }
}

/// Cookies as a browser keeps them for one site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jar(Vec<(String, String)>);

impl Jar {
    /// The `Cookie` header's value (empty when there is none).
    pub fn header(&self) -> String {
        let all: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        all.join("; ")
    }

    /// Keeps what `Set-Cookie` values say: a new value replaces the old one; an empty value or
    /// `Max-Age=0` (or an `Expires` in the past, which is how HAProxy expires its cookie)
    /// removes the cookie.
    pub fn keep<'a>(&mut self, set_cookies: impl IntoIterator<Item = &'a str>) {
        for v in set_cookies {
            let mut parts = v.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
                continue;
            };
            let expired = value.is_empty()
                || parts.any(|a| {
                    a.eq_ignore_ascii_case("max-age=0")
                        || a.to_ascii_lowercase()
                            .starts_with("expires=thu, 01 jan 1970")
                        || a.to_ascii_lowercase()
                            .starts_with("expires=thu, 01-jan-1970")
                });
            self.0.retain(|(n, _)| n != name);
            if !expired {
                self.0.push((name.to_string(), value.to_string()));
            }
        }
    }

    /// Keeps the `Set-Cookie` headers of a response.
    pub fn keep_response(&mut self, r: &Response) {
        self.keep(
            r.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                .map(|(_, v)| v.as_str()),
        );
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What an HTTP request came to, when it did not give a response to read.
#[derive(Debug)]
pub enum Failure {
    /// No connection, or it broke before a response (refused, reset, TLS, timeout).
    Io(std::io::Error),
    /// A 5xx (HAProxy's own 502/503/504 when no backend answers, or a backend's).
    Status(u16, String),
}

impl Failure {
    /// How the report counts it.
    pub fn kind(&self) -> super::stats::Kind {
        match self {
            Failure::Io(_) => super::stats::Kind::Refused,
            Failure::Status(..) => super::stats::Kind::Http5xx,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Status(s, body) => write!(f, "HTTP {s}: {body}"),
        }
    }
}

/// One connection to the site kept alive between requests (one request at a time).
pub struct KeepAlive {
    site: Arc<Site>,
    source: Option<IpAddr>,
    /// The connection and when it was last used.
    conn: Option<Box<(BufReader<Tls>, Instant)>>,
}

impl KeepAlive {
    /// No connection yet: the first request makes one, from `source` when given.
    pub fn new(site: Arc<Site>, source: Option<IpAddr>) -> KeepAlive {
        KeepAlive {
            site,
            source,
            conn: None,
        }
    }

    /// One request with `headers` within `timeout`; 5xx answers are failures, other statuses
    /// are for the caller.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<Response, Failure> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.1.elapsed() > KEEP_IDLE)
        {
            self.conn = None;
        }
        let work = async {
            let mut conn = match self.conn.take() {
                Some(c) => c.0,
                None => BufReader::with_capacity(4096, self.site.connect(self.source).await?),
            };
            let name = &self.site.name;
            let r = http1::request(&mut conn, method, name, path, headers, body, 4 << 20).await?;
            let close = r
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"));
            if !close {
                self.conn = Some(Box::new((conn, Instant::now())));
            }
            Ok::<_, std::io::Error>(r)
        };
        let r = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Failure::Io(e)),
            Err(_) => {
                self.conn = None;
                return Err(Failure::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{method} {path}: no response within {timeout:?}"),
                )));
            }
        };
        if r.status >= 500 {
            self.conn = None;
            let body = String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                .trim()
                .to_string();
            return Err(Failure::Status(r.status, body));
        }
        Ok(r)
    }

    /// Drops the connection.
    pub fn close(&mut self) {
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jar_keeps_cookies_as_a_browser_does() {
        let mut j = Jar::default();
        j.keep([
            "sagews_session=abc; Path=/; Secure; HttpOnly; SameSite=Strict",
            "SAGEWS_BACKEND=backend1; path=/; secure; HttpOnly; SameSite=Strict",
        ]);
        assert_eq!(j.header(), "sagews_session=abc; SAGEWS_BACKEND=backend1");
        // HAProxy sends the browser elsewhere.
        j.keep(["SAGEWS_BACKEND=backend2; path=/"]);
        assert_eq!(j.get("SAGEWS_BACKEND"), Some("backend2"));
        // A stopping backend expires the persistence cookie.
        j.keep(["SAGEWS_BACKEND=; Expires=Thu, 01-Jan-1970 00:00:01 GMT; path=/"]);
        assert_eq!(j.get("SAGEWS_BACKEND"), None);
        j.keep(["sagews_session=x; Max-Age=0"]);
        assert_eq!(j.header(), "");
        j.keep(["garbage without an equals sign"]);
        assert_eq!(j, Jar::default());
    }
}
