//! A whole backend stack on loopback for the backend tests and benchmark (as root): a test CA,
//! PostgreSQL (`pg_harness`), memcached with TLS and client certificates, nginx accepting
//! publishes (WebDAV over TLS, backends only) and serving them, workers and backends as real
//! `sage-agent` processes. Clients speak to a backend as HAProxy does (its certificate): SockJS
//! over websocket or xhr-polling, and plain HTTPS requests.
//!
//! Needs `mod harness` (worker_harness.rs) and `mod pg` (pg_harness.rs) beside it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sage_agent::http1;
use sage_agent::tls::Identity;
use sagectl::pki::State;
use serde_json::{Value, json};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::harness::{creds, require_root};
use super::pg::Pg;

pub const DB_PASSWORD: &str = "backend-pw-123";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (5 s at most) until something listens on 127.0.0.1:`port`.
fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server program (quiet) and waits until it listens on `port`.
fn serve(program: &str, args: &[&str], port: u16) -> Child {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (./test installs it)"));
    wait_port(port, program);
    child
}

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sage-agent"))
}

pub struct Proc {
    pub name: String,
    pub addr: SocketAddr,
    pub config: PathBuf,
    child: Option<Child>,
    kind: &'static str,
    killed: bool,
}

impl Proc {
    fn spawn(
        kind: &'static str,
        name: &str,
        addr: SocketAddr,
        config: PathBuf,
        log: &Path,
    ) -> Proc {
        let mut p = Proc {
            name: name.to_string(),
            addr,
            config,
            child: None,
            kind,
            killed: false,
        };
        p.start(log);
        p
    }

    fn start(&mut self, log: &Path) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(agent_bin());
        let child = cmd
            .args([self.kind, "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn signal(&mut self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.killed = true;
    }

    /// SIGTERM and wait (workers close their sessions and remove their users): how long it
    /// took the process to exit, and whether it exited cleanly.
    pub fn stop(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        self.signal("-TERM");
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Some(status) = c.try_wait().unwrap() {
                    return (started.elapsed(), status.success());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        (started.elapsed(), false)
    }
}

pub struct Stack {
    pub tmp: tempfile::TempDir,
    pub state: State,
    pub pg: Pg,
    memcached: Option<Child>,
    memcached_args: Option<(PathBuf, PathBuf, PathBuf)>,
    pub memcached_port: u16,
    nginx: Option<Child>,
    haproxy: Option<Child>,
    /// nginx serving /pub/ to readers.
    pub nginx_port: u16,
    pub workers: Vec<Proc>,
    pub backends: Vec<Proc>,
    client: Identity,
}

pub struct Options {
    pub workers: usize,
    pub backends: usize,
    /// First uid of the workers' ranges (20 each); distinct per test.
    pub uid_base: u32,
    /// Extra fields for every backend's config.
    pub backend_extra: Value,
    /// Run a logd (in this process) and point the backends at it.
    pub logd: bool,
}

impl Stack {
    pub async fn start(o: Options) -> Stack {
        require_root();
        // Outside /tmp: the workers' homes live here (see `state_tempdir`).
        let tmp = super::harness::state_tempdir();
        let state = State::open_at(&tmp.path().join("pki"), "btest").unwrap();
        let pg = Pg::for_ca(&state, false).await;
        pg.create_db("sagews", DB_PASSWORD);

        // memcached, TLS only, client certificates required (as the cache role renders it).
        let (ca, mcrt, mkey) = creds(&state, &tmp.path().join("cache"), "cache1", &["cache"]);
        let memcached_port = free_port();
        let mut s = Stack {
            pg,
            memcached: None,
            memcached_args: None,
            memcached_port,
            nginx: None,
            haproxy: None,
            nginx_port: free_port(),
            workers: Vec::new(),
            backends: Vec::new(),
            client: {
                let (ca, c, k) = creds(&state, &tmp.path().join("lb"), "lb1", &["loadbalancer"]);
                Identity::load(&ca, &c, &k).unwrap()
            },
            state,
            tmp,
        };
        s.memcached_args = Some((ca.clone(), mcrt, mkey));
        s.start_memcached();
        let publish_port = free_port();
        s.start_nginx(publish_port, o.backends);

        let logd = if o.logd {
            Some(s.start_logd().await)
        } else {
            None
        };
        let backend_names: Vec<String> = (1..=o.backends).map(|i| format!("backend{i}")).collect();
        let mut backend_refs = Vec::new();
        for name in &backend_names {
            let (ca, crt, key) = creds(&s.state, &s.tmp.path().join(name), name, &["backend"]);
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let wl = format!("127.0.0.1:{}", free_port());
            backend_refs.push(json!({"name": name, "address": wl}));
            let mut config = json!({
                "inventory": "btest", "host": name, "public_name": "sagews.test",
                "origins": ["https://sagews.test"],
                "listen": addr.to_string(), "worker_listen": wl,
                "tls": {"ca": ca, "cert": crt, "key": key},
                "database": {"host": "127.0.0.1", "server_name": "db", "port": s.pg.port,
                    "name": "sagews", "user": "sagews", "password": DB_PASSWORD, "pool": 8},
                "memcached": [{"name": "cache1", "address": format!("127.0.0.1:{memcached_port}")}],
                "max_sessions": 1000, "max_bundle_mb": 2,
                "accounts": {"signup": true, "max_workspaces": 5, "session_days": 7, "min_password_length": 8},
                "worker_port": 0,
                "logd": logd.map(|a| json!({"address": a.to_string(), "server_name": "logs1"})),
                "static_hosts": [{"name": "static1", "address": format!("127.0.0.1:{publish_port}")}],
                "state_dir": s.tmp.path().join(name).join("state"),
            });
            for (k, v) in o.backend_extra.as_object().unwrap() {
                config[k] = v.clone();
            }
            let path = s.tmp.path().join(format!("{name}.json"));
            std::fs::write(&path, config.to_string()).unwrap();
            let log = s.tmp.path().join(format!("{name}.log"));
            s.backends
                .push(Proc::spawn("backend", name, addr, path, &log));
        }
        for b in 0..s.backends.len() {
            s.wait_health(b).await;
        }
        for i in 0..o.workers {
            let name = format!("worker{}", i + 1);
            let (ca, crt, key) = creds(&s.state, &s.tmp.path().join(&name), &name, &["worker"]);
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let uid_min = o.uid_base + 20 * i as u32;
            // Files up to 4 MB, so a file over the editor's 1 MiB can be made.
            let limits = sagectl_limits_with_files(4);
            let config = json!({
                "inventory": "btest", "host": name, "listen": addr.to_string(),
                "tls": {"ca": ca, "cert": crt, "key": key},
                "engine": "python3", "max_sessions": 8, "uid_min": uid_min, "uid_max": uid_min + 19,
                "backend_timeout_seconds": 600, "limits": limits,
                "backends": backend_refs,
                "state_dir": s.tmp.path().join(&name).join("state"), "metrics_listen": null,
                "heartbeat_seconds": 1,
            });
            let path = s.tmp.path().join(format!("{name}.json"));
            std::fs::write(&path, config.to_string()).unwrap();
            let log = s.tmp.path().join(format!("{name}.log"));
            s.workers
                .push(Proc::spawn("worker", &name, addr, path, &log));
        }
        for b in 0..s.backends.len() {
            s.wait_workers(b, o.workers).await;
        }
        s
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn start_memcached(&mut self) {
        let (ca, crt, key) = self.memcached_args.clone().unwrap();
        let port = self.memcached_port.to_string();
        let tls = format!(
            "ssl_chain_cert={},ssl_key={},ssl_ca_cert={},ssl_verify_mode=2",
            crt.display(),
            key.display(),
            ca.display()
        );
        let args = [
            "-u",
            "memcache",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "0",
            "-Z",
            "-o",
            &tls,
        ];
        self.memcached = Some(serve("memcached", &args, self.memcached_port));
    }

    pub fn stop_memcached(&mut self) {
        if let Some(mut c) = self.memcached.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// HAProxy in front of the backends as the loadbalancer role renders it (TLS for browsers,
    /// HTTPS with its certificate to the backends, a stickiness cookie); returns its port. Its
    /// certificate is valid for 127.0.0.1.
    pub fn start_haproxy(&mut self) -> u16 {
        let dir = self.tmp.path().join("haproxy");
        let (ca, crt, key) = creds(&self.state, &dir, "lb1", &["loadbalancer"]);
        let pem = dir.join("lb1.pem");
        let mut both = std::fs::read_to_string(&crt).unwrap();
        both.push_str(&std::fs::read_to_string(&key).unwrap());
        std::fs::write(&pem, both).unwrap();
        let port = free_port();
        let servers: String = self
            .backends
            .iter()
            .map(|b| {
                format!(
                    "    server {n} {a} cookie {n} check ssl verify required ca-file {ca} crt {pem} verifyhost {n} sni str({n})\n",
                    n = b.name,
                    a = b.addr,
                    ca = ca.display(),
                    pem = pem.display()
                )
            })
            .collect();
        let conf = format!(
            "global\n    maxconn 4096\ndefaults\n    mode http\n    option abortonclose\n    timeout connect 5s\n    timeout client 60s\n    timeout server 90s\n    timeout tunnel 1h\n\
             frontend https\n    bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1\n    http-request set-header X-Sagews-Client %[src]\n    default_backend backends\n\
             backend backends\n    balance leastconn\n    cookie SAGEWS_BACKEND insert indirect nocache secure httponly\n{servers}",
            pem = pem.display()
        );
        std::fs::write(dir.join("haproxy.cfg"), conf).unwrap();
        let conf = dir.join("haproxy.cfg");
        self.haproxy = Some(serve(
            "haproxy",
            &["-db", "-f", conf.to_str().unwrap()],
            port,
        ));
        port
    }

    /// logd in this process, on its own database of the same PostgreSQL; returns its address.
    async fn start_logd(&mut self) -> SocketAddr {
        self.pg.create_db("sagews_logs", "logs-pw-123");
        let dir = self.tmp.path().join("logd");
        let (ca, crt, key) = creds(&self.state, &dir, "logs1", &["logd"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = json!({
            "inventory": "btest", "host": "logs1", "listen": addr.to_string(), "http_listen": "127.0.0.1:0",
            "tls": {"ca": ca, "cert": crt, "key": key},
            "database": {"host": "127.0.0.1", "server_name": "db", "port": self.pg.port, "name": "sagews_logs",
                "user": "sagews_logs", "password": "logs-pw-123"},
            "allow": ["127.0.0.1"], "batch_size": 1000, "retention_days": 30, "alerts": [], "replica": null,
        });
        let path = dir.join("logd.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let config = sage_agent::logd::Config::load(&path).unwrap();
        tokio::spawn(sage_agent::logd::run(
            config,
            listener,
            std::future::pending(),
        ));
        addr
    }

    /// Messages logd stored from `target`, oldest first (waits up to 10 s for `want` of them).
    pub async fn logged(&self, target: &str, want: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.pg.query(
                "sagews_logs",
                &format!("SELECT message || ' ' || fields::text FROM records WHERE target = '{target}' ORDER BY ts"),
            );
            let lines: Vec<String> = out.lines().map(str::to_string).collect();
            if lines.len() >= want || Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.tmp.path().join("haproxy/ca.crt")
    }

    fn start_nginx(&mut self, publish_port: u16, backends: usize) {
        let dir = self.tmp.path().join("nginx");
        std::fs::create_dir_all(dir.join("root/pub")).unwrap();
        let (ca, crt, key) = creds(&self.state, &dir, "static1", &["static"]);
        let publishers: String = (1..=backends)
            .map(|i| format!("        \"~(^|,)CN=backend{i}(,|$)\" 1;\n"))
            .collect();
        // The publishing server mirrors templates/nginx.conf.j2 (the lab test runs the real one).
        let conf = format!(
            r#"user root root;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    ssl_protocols TLSv1.3;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    map $ssl_client_s_dn $publisher {{
        default 0;
{publishers}    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        location /pub/ {{ alias {d}/root/pub/; autoindex on; }}
    }}
    server {{
        listen 127.0.0.1:{publish_port} ssl;
        client_max_body_size 2m;
        if ($publisher = 0) {{ return 403; }}
        location /pub/ {{
            alias {d}/root/pub/;
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            limit_except PUT DELETE {{ deny all; }}
        }}
        location / {{ return 404; }}
    }}
}}
"#,
            d = dir.display(),
            crt = crt.display(),
            key = key.display(),
            ca = ca.display(),
            port = self.nginx_port,
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let conf = dir.join("nginx.conf");
        self.nginx = Some(serve(
            "nginx",
            &["-c", conf.to_str().unwrap()],
            publish_port,
        ));
    }

    async fn wait_health(&self, b: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.try_https(b, "GET", "/api/health", &[], b"").await {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "backend {b} not healthy:\n{}",
                self.log(&self.backends[b].name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metric(&self, b: usize, name: &str) -> u64 {
        let r = self.https(b, "GET", "/api/metrics", &[], b"").await;
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("sagews_backend_{name} ")))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    pub async fn wait_workers(&self, b: usize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(b, "healthy_workers").await as usize != n {
            assert!(
                Instant::now() < deadline,
                "backend {b} does not see {n} workers"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The identity HAProxy presents (loadbalancer role).
    pub fn client_identity(&self) -> &Identity {
        &self.client
    }

    /// A TLS connection to backend `b`, presenting HAProxy's certificate.
    pub async fn tls(&self, b: usize) -> std::io::Result<TlsStream<TcpStream>> {
        let mut cfg = Arc::unwrap_or_clone(self.client.client_config(&["backend"]).unwrap());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(self.backends[b].addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(self.backends[b].name.clone()).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
    }

    pub async fn try_https(
        &self,
        b: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<http1::Response> {
        let mut s = BufReader::new(self.tls(b).await?);
        http1::request(&mut s, method, "sagews.test", path, headers, body, 64 << 20).await
    }

    pub async fn https(
        &self,
        b: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> http1::Response {
        self.try_https(b, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// GET from the nginx that serves published workspaces (as HAProxy would).
    pub async fn get_published(&self, path: &str) -> http1::Response {
        let cfg = self.client.client_config(&["static"]).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.nginx_port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("static1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut s = BufReader::new(tls);
        http1::request(&mut s, "GET", "sagews.test", path, &[], b"", 1 << 20)
            .await
            .unwrap()
    }

    /// Signs in over HTTPS; returns the Cookie header value.
    pub async fn cookie(&self, b: usize, name: &str, password: &str) -> String {
        let body = json!({"name": name, "password": password}).to_string();
        let r = self
            .https(
                b,
                "POST",
                "/api/signin",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let set = r
            .header("set-cookie")
            .expect("a session cookie")
            .to_string();
        for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
            assert!(set.contains(attr), "{set}");
        }
        set.split(';').next().unwrap().to_string()
    }

    pub async fn sock(&self, b: usize, transport: Transport, cookie: Option<&str>) -> Sock {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("Cookie", *c)).collect();
        self.sock_with(b, transport, &headers)
            .await
            .unwrap_or_else(|e| panic!("opening a SockJS session: {e}"))
    }

    /// A SockJS session sending `headers` with each request (an `Origin`, a cookie); a refused
    /// websocket upgrade is an error.
    pub async fn sock_with(
        &self,
        b: usize,
        transport: Transport,
        headers: &[(&str, &str)],
    ) -> Result<Sock, String> {
        let session = format!("s{}", rand_hex());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let t = match transport {
            Transport::Websocket => {
                let tls = self.tls(b).await.unwrap();
                let url = format!("wss://sagews.test/sockjs/000/{session}/websocket");
                let mut req =
                    tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                        url,
                    )
                    .unwrap();
                for (k, v) in &headers {
                    req.headers_mut().insert(
                        axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        v.parse().unwrap(),
                    );
                }
                let (ws, _) =
                    tokio_tungstenite::client_async(req, tls)
                        .await
                        .map_err(|e| match e {
                            tokio_tungstenite::tungstenite::Error::Http(r) => {
                                format!("HTTP {}", r.status().as_u16())
                            }
                            e => e.to_string(),
                        })?;
                T::Ws(Box::new(ws))
            }
            Transport::XhrPolling => T::Xhr {
                poll: None,
                send: None,
            },
        };
        let mut s = Sock {
            t,
            stack_addr: self.backends[b].addr,
            tls: {
                let mut cfg =
                    Arc::unwrap_or_clone(self.client.client_config(&["backend"]).unwrap());
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(cfg)
            },
            server_name: self.backends[b].name.clone(),
            base: format!("/sockjs/000/{session}"),
            headers,
            pending: VecDeque::new(),
            next_id: 1,
            closed: None,
        };
        let first = s.frame().await;
        assert_eq!(first, "o", "the open frame");
        Ok(s)
    }

    /// A TLS connection to the harness's HAProxy (started by `start_haproxy`), as a browser
    /// that trusts the test CA.
    pub async fn via_haproxy(&self, port: u16) -> BufReader<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        let ca =
            rustls::pki_types::CertificateDer::from_pem_slice(self.state.ca_cert_pem().as_bytes())
                .unwrap();
        roots.add(ca).unwrap();
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("lb1").unwrap();
        BufReader::new(
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap(),
        )
    }

    /// One HTTPS request through HAProxy.
    pub async fn haproxy_https(
        &self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> http1::Response {
        let mut c = self.via_haproxy(port).await;
        http1::request(&mut c, method, "sagews.test", path, headers, body, 64 << 20)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} through HAProxy: {e}"))
    }

    /// Resident memory of backend `b`, in KiB.
    pub fn backend_rss_kib(&self, b: usize) -> u64 {
        let pid = self.backends[b].pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for b in &mut self.backends {
            b.stop();
        }
        let log = self.tmp.path().join("cleanup.log");
        for w in &mut self.workers {
            if w.killed {
                // A restarted worker removes the users its killed self left behind.
                w.start(&log);
                std::thread::sleep(Duration::from_millis(1500));
            }
            w.stop();
        }
        self.stop_memcached();
        for mut c in [self.nginx.take(), self.haproxy.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The worker harness's limits with files up to `mb` MB.
fn sagectl_limits_with_files(mb: u64) -> sage_agent::proto::Limits {
    let mut l = super::harness::limits();
    l.file_size_mb = mb;
    l
}

fn rand_hex() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", n, std::process::id())
}

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Websocket,
    XhrPolling,
}

enum T {
    Ws(Box<WebSocketStream<TlsStream<TcpStream>>>),
    Xhr {
        poll: Option<Box<BufReader<TlsStream<TcpStream>>>>,
        send: Option<Box<BufReader<TlsStream<TcpStream>>>>,
    },
}

/// A SockJS client (the protocol as sockjs-client speaks it).
pub struct Sock {
    t: T,
    stack_addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: String,
    base: String,
    headers: Vec<(String, String)>,
    /// Messages received and not yet taken.
    pub pending: VecDeque<Value>,
    next_id: u64,
    /// The close frame, once received.
    pub closed: Option<Value>,
}

impl Sock {
    async fn connect(&self) -> BufReader<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.stack_addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone()).unwrap();
        BufReader::new(
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .unwrap(),
        )
    }

    async fn post(&mut self, which: &str, body: &[u8]) -> http1::Response {
        let path = format!("{}/{which}", self.base);
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut conn = match (&mut self.t, which) {
            (T::Xhr { poll, .. }, "xhr") => poll.take(),
            (T::Xhr { send, .. }, _) => send.take(),
            _ => unreachable!(),
        };
        if conn.is_none() {
            conn = Some(Box::new(self.connect().await));
        }
        let mut c = conn.unwrap();
        let r = http1::request(
            &mut c,
            "POST",
            "sagews.test",
            &path,
            &headers,
            body,
            64 << 20,
        )
        .await
        .unwrap();
        match (&mut self.t, which) {
            (T::Xhr { poll, .. }, "xhr") => *poll = Some(c),
            (T::Xhr { send, .. }, _) => *send = Some(c),
            _ => unreachable!(),
        }
        r
    }

    /// Sends raw text as one client frame (tests of broken framing use this).
    pub async fn send_raw(&mut self, frame: &str) -> u16 {
        match &mut self.t {
            T::Ws(ws) => {
                ws.send(Message::Text(frame.to_string().into()))
                    .await
                    .unwrap();
                0
            }
            T::Xhr { .. } => self.post("xhr_send", frame.as_bytes()).await.status,
        }
    }

    pub async fn send_text(&mut self, msg: &str) {
        let frame = serde_json::to_string(&[msg]).unwrap();
        let status = self.send_raw(&frame).await;
        assert!(status == 0 || status == 204, "xhr_send answered {status}");
    }

    /// The next SockJS frame, skipping heartbeats; array frames are split into `pending`.
    pub async fn frame(&mut self) -> String {
        loop {
            let text = match &mut self.t {
                T::Ws(ws) => match tokio::time::timeout(Duration::from_secs(120), ws.next())
                    .await
                    .expect("a frame within 120 s")
                {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Close(_))) | None => "c[0,\"socket closed\"]".to_string(),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => format!("c[0,{:?}]", e.to_string()),
                },
                T::Xhr { .. } => {
                    let r = self.post("xhr", b"").await;
                    assert_eq!(r.status, 200);
                    assert_eq!(
                        r.header("content-type"),
                        Some("application/javascript; charset=UTF-8")
                    );
                    String::from_utf8(r.body)
                        .unwrap()
                        .trim_end_matches('\n')
                        .to_string()
                }
            };
            match text.as_bytes().first() {
                Some(b'h') => continue,
                Some(b'a') => {
                    let msgs: Vec<String> = serde_json::from_str(&text[1..]).unwrap();
                    for m in msgs {
                        self.pending.push_back(serde_json::from_str(&m).unwrap());
                    }
                    return "a".into();
                }
                Some(b'c') => {
                    self.closed = Some(serde_json::from_str(&text[1..]).unwrap());
                    return "c".into();
                }
                _ => return text,
            }
        }
    }

    /// The next message (reply or event).
    pub async fn next(&mut self) -> Value {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return v;
            }
            if self.frame().await == "c" {
                panic!("the session closed: {:?}", self.closed);
            }
        }
    }

    /// The next message matching `f`; others stay queued in order.
    pub async fn until(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        let mut skipped = VecDeque::new();
        let found = loop {
            let v = self.next().await;
            if f(&v) {
                break v;
            }
            skipped.push_back(v);
        };
        while let Some(v) = skipped.pop_back() {
            self.pending.push_front(v);
        }
        found
    }

    /// Sends a request and returns its reply (events arriving meanwhile stay queued).
    pub async fn call(&mut self, mut req: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        req["id"] = id.into();
        self.send_text(&req.to_string()).await;
        self.until(|v| v.get("ok").is_some() && v["id"] == id).await
    }

    /// Like `call`, asserting success.
    pub async fn ok(&mut self, req: Value) -> Value {
        let r = self.call(req.clone()).await;
        assert_eq!(r["ok"], true, "{req} failed: {r}");
        r
    }

    /// Executes code; returns (stdout, stderr, status) once it is done.
    pub async fn run(&mut self, ws: &str, code: &str) -> (String, String, String) {
        let r = self
            .ok(json!({"op": "execute", "workspace": ws, "code": code}))
            .await;
        let id = r["id"].clone();
        let (mut out, mut err) = (String::new(), String::new());
        loop {
            let v = self
                .until(|v| v["id"] == id && v.get("event").is_some())
                .await;
            match v["event"].as_str().unwrap() {
                "stdout" => out.push_str(v["data"].as_str().unwrap()),
                "stderr" => err.push_str(v["data"].as_str().unwrap()),
                "done" => return (out, err, v["status"].as_str().unwrap().to_string()),
                other => panic!("unexpected event {other}: {v}"),
            }
        }
    }

    /// The next event named `name` (for this workspace), skipping other messages.
    pub async fn event(&mut self, name: &str) -> Value {
        self.until(|v| v["event"] == name).await
    }

    pub async fn close(mut self) {
        if let T::Ws(ws) = &mut self.t {
            let _ = WebSocketStream::close(&mut **ws, None).await;
        }
    }
}
