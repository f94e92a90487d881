//! A browser's view of a deployed lab, for the lab tests: HTTPS to its HAProxy trusting the
//! deployment's CA, and the client's protocol over SockJS xhr-polling (requests, replies,
//! events), as static/sagews.js speaks it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A deployed site: its public name, HAProxy's address, the deployment's CA.
pub struct Site {
    pub name: String,
    pub addr: SocketAddr,
    pub ca: PathBuf,
}

impl Site {
    /// One HTTPS request with `headers`.
    pub async fn https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> sagews_wire::http1::Response {
        self.try_https(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One HTTPS request with `headers`, its failure returned (a connection refused or cut).
    pub async fn try_https(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<sagews_wire::http1::Response> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_file_iter(&self.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        sagews_wire::tls::init();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from(self.name.clone()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let mut s = tokio::io::BufReader::new(tls);
        sagews_wire::http1::request(&mut s, method, &self.name, path, headers, body, 1 << 20).await
    }

    /// A JSON request with a cookie (none when empty).
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        cookie: &str,
        body: &[u8],
    ) -> sagews_wire::http1::Response {
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        if !cookie.is_empty() {
            headers.push(("Cookie", cookie));
        }
        self.https(method, path, &headers, body).await
    }

    /// Signs up; the cookies to send afterwards (the session's and HAProxy's stickiness).
    pub async fn sign_up(&self, name: &str, password: &str) -> String {
        let creds = serde_json::json!({"name": name, "password": password}).to_string();
        let r = self.json("POST", "/api/signup", "", creds.as_bytes()).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let set: Vec<String> = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.split(';').next().unwrap().to_string())
            .collect();
        let cookie = set.join("; ");
        assert!(cookie.contains("sagews_session="), "{set:?}");
        cookie
    }
}

/// The client's protocol over SockJS xhr-polling.
pub struct Sockjs<'a> {
    site: &'a Site,
    base: String,
    cookie: String,
    /// Messages received and not yet taken.
    pub inbox: Vec<Value>,
}

impl<'a> Sockjs<'a> {
    pub async fn open(site: &'a Site, cookie: &str, session: &str) -> Sockjs<'a> {
        let base = format!("/sockjs/000/{session}");
        let r = site.json("POST", &format!("{base}/xhr"), cookie, b"").await;
        assert_eq!(String::from_utf8_lossy(&r.body), "o\n");
        Sockjs {
            site,
            base,
            cookie: cookie.to_string(),
            inbox: Vec::new(),
        }
    }

    /// One poll: what arrived goes to the inbox.
    pub async fn poll(&mut self) {
        let r = self
            .site
            .json("POST", &format!("{}/xhr", self.base), &self.cookie, b"")
            .await;
        let body = String::from_utf8_lossy(&r.body).to_string();
        if let Some(a) = body.trim_end().strip_prefix('a') {
            let msgs: Vec<String> = serde_json::from_str(a).unwrap();
            self.inbox.extend(
                msgs.iter()
                    .map(|m| serde_json::from_str::<Value>(m).unwrap()),
            );
        }
    }

    /// Sends request `req` as `id` and waits for its reply (which must be ok).
    pub async fn call(&mut self, id: u64, req: Value) -> Value {
        let mut req = req;
        req["id"] = id.into();
        let frame = serde_json::to_string(&[req.to_string()]).unwrap();
        let r = self
            .site
            .json(
                "POST",
                &format!("{}/xhr_send", self.base),
                &self.cookie,
                frame.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 204);
        let v = self
            .take(|v| v["id"] == id && v.get("ok").is_some(), "a reply")
            .await;
        assert_eq!(v["ok"], true, "{v}");
        v
    }

    /// The first message matching `want`, polling for up to 2 minutes.
    pub async fn take(&mut self, want: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(i) = self.inbox.iter().position(&want) {
                return self.inbox.remove(i);
            }
            assert!(Instant::now() < deadline, "no {what} within 2 minutes");
            self.poll().await;
        }
    }

    /// Creates a workspace named `name` and opens it (requests `id` and `id + 1`): its id.
    pub async fn create_and_open(&mut self, id: u64, name: &str) -> String {
        let ws = self
            .call(id, serde_json::json!({"op": "create", "name": name}))
            .await["workspace"]
            .as_str()
            .unwrap()
            .to_string();
        self.call(id + 1, serde_json::json!({"op": "open", "workspace": ws}))
            .await;
        ws
    }

    /// Runs `code` in `workspace` as request `id`: its stdout and its status.
    pub async fn execute(&mut self, id: u64, workspace: &str, code: &str) -> (String, String) {
        self.call(
            id,
            serde_json::json!({"op": "execute", "workspace": workspace, "code": code}),
        )
        .await;
        let done = self
            .take(|v| v["event"] == "done" && v["id"] == id, "done event")
            .await;
        let out = take_stdout(&mut self.inbox, id);
        (out, done["status"].as_str().unwrap_or("").to_string())
    }
}

/// Takes execute `id`'s stdout events out of `inbox`: their text, in order.
pub fn take_stdout(inbox: &mut Vec<Value>, id: u64) -> String {
    let mut out = String::new();
    inbox.retain(|v| {
        let mine = v["event"] == "stdout" && v["id"] == id;
        if mine {
            out.push_str(v["data"].as_str().unwrap_or(""));
        }
        !mine
    });
    out
}
