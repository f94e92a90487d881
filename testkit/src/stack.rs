//! A whole backend stack on loopback for the backend tests and benchmark (as root): a test CA,
//! PostgreSQL (`pg_harness`), memcached with TLS and client certificates, nginx accepting
//! publishes (WebDAV over TLS, backends only) and serving them, workers and backends as real
//! `sage-agent` processes. Clients speak to a backend as HAProxy does (its certificate): SockJS
//! over websocket or xhr-polling, and plain HTTPS requests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sagews_wire::http1;
use sagews_wire::tls::Identity;
use serde_json::{Value, json};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::pg::Pg;
use crate::pki::{State, creds};
use crate::require_root;

/// The loopback network of one stack, `127.K.N.0/24`: K from this process's id and N counted, so
/// the stacks of parallel tests (and of another test process) never share an address, and every
/// service listens on its role's own port as deployed.
fn stack_net() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 250 + 1;
    format!("127.{}.{n}", 100 + std::process::id() % 100)
}

/// Waits (10 s at most) until something listens on `addr`.
fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server program (its output in `log`) and waits until it listens on `addr`.
fn serve(program: &str, args: &[String], addr: SocketAddr, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} (./test installs it)"));
    wait_listening(addr, program);
    child
}

/// A rendered config file of `host`, with each `(from, to)` replaced: the one place where the
/// production configs are adapted to many services on one machine's loopback.
fn relocated(out: &Path, host: &str, file: &str, subst: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(out.join(host).join(file.trim_start_matches('/')))
        .unwrap_or_else(|e| panic!("{host}: rendered {file}: {e}"));
    for (from, to) in subst {
        assert!(text.contains(from), "{host}:{file} no longer has {from:?}");
        text = text.replace(from, to);
    }
    text
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
        let mut cmd = Command::new(crate::bin("sage-agent"));
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

/// A whole deployment on loopback, configured by `sagectl render` from an inventory of the
/// stack's own (one host per service, each on its own address of [`stack_net`]): the agents'
/// JSON, HAProxy's, nginx's and memcached's configs are the rendered ones, with only what
/// [`relocated`] and [`agent_config`] change so that they run side by side on one machine.
/// PostgreSQL is the test cluster of [`Pg`] (the rendered PostgreSQL config is tested in
/// tests/tools.rs), with the roles and passwords the rendered configs name.
pub struct Stack {
    pub tmp: tempfile::TempDir,
    pub state: State,
    pub pg: Pg,
    /// What `sagectl render` made, one directory per host.
    pub rendered: PathBuf,
    net: String,
    memcached: Option<Child>,
    nginx: Option<Child>,
    haproxy: Option<Child>,
    pub workers: Vec<Proc>,
    pub backends: Vec<Proc>,
    pub logd: Option<Proc>,
    client: Identity,
}

pub struct Options {
    pub workers: usize,
    pub backends: usize,
    /// First uid of the workers' ranges (20 each); distinct per test.
    pub uid_base: u32,
    /// Extra fields for every backend's config.
    pub backend_extra: Value,
    /// Run a logd and point the backends at it.
    pub logd: bool,
}

/// The stack's inventory: the settings the tests rely on, in the inventory's own words.
fn inventory(net: &str, pg_port: u16, o: &Options) -> String {
    let mut hosts = format!(
        "  lb1: {{address: {net}.10, roles: [loadbalancer]}}\n  static1: {{address: {net}.11, roles: [static]}}\n  cache1: {{address: {net}.12, roles: [cache]}}\n  db: {{address: 127.0.0.1, roles: [database], vars: {{postgres_port: {pg_port}}}}}\n"
    );
    if o.logd {
        hosts.push_str(&format!("  logs1: {{address: {net}.13, roles: [logd]}}\n"));
    }
    for i in 1..=o.backends {
        hosts.push_str(&format!(
            "  backend{i}: {{address: {net}.{}, roles: [backend]}}\n",
            20 + i
        ));
    }
    for i in 1..=o.workers {
        hosts.push_str(&format!(
            "  worker{i}: {{address: {net}.{}, roles: [worker]}}\n",
            40 + i
        ));
    }
    let l = crate::worker::limits();
    format!(
        "name: btest
tls: {{public_name: sagews.test, certificate: site.crt, key: site.key}}
worker:
  engine: python3
  max_sessions: 8
  uid_min: {uid}
  uid_max: {uid_max}
  backend_timeout_seconds: 600
  preload: []
  # Files up to 4 MB, so a file over the editor's 1 MiB can be made.
  limits: {{cpu_seconds: {cpu}, memory_mb: {mem}, processes: {procs}, open_files: {files}, file_size_mb: 4, wall_clock_seconds: {wall}, idle_timeout_seconds: {idle}, cpu_percent: {pct}}}
backend:
  max_sessions: 1000
  max_bundle_mb: 2
  accounts: {{signup: true, max_workspaces: 5, max_open_workspaces: 3, session_days: 7, min_password_length: 8}}
logd:
  # Every process of the stack connects from 127.0.0.1.
  allow: [127.0.0.1]
hosts:
{hosts}",
        uid = o.uid_base,
        uid_max = o.uid_base + 20 * o.workers.max(1) as u32 - 1,
        cpu = l.cpu_seconds,
        mem = l.memory_mb,
        procs = l.processes,
        files = l.open_files,
        wall = l.wall_clock_seconds,
        idle = l.idle_timeout_seconds,
        pct = l.cpu_percent,
    )
}

/// An agent's rendered JSON config made runnable beside the others: its certificate files and
/// state directory in the stack's directory for the host (as `sagectl up` installs them),
/// `extra`'s fields on top; written to `<host>.json`.
fn agent_config(tmp: &Path, out: &Path, host: &str, file: &str, extra: &Value) -> (PathBuf, Value) {
    let dir = tmp.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    let etc = out.join(host).join("etc/sage-agent");
    let mut tls = serde_json::Map::new();
    for (key, name) in [("ca", "ca.crt"), ("cert", "host.crt"), ("key", "host.key")] {
        std::fs::copy(etc.join(name), dir.join(name)).unwrap();
        tls.insert(key.into(), json!(dir.join(name)));
    }
    let text = std::fs::read_to_string(etc.join(file)).unwrap();
    let mut config: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{host}: rendered {file}: {e}"));
    config["tls"] = Value::Object(tls);
    if config.get("state_dir").is_some() {
        config["state_dir"] = json!(dir.join("state"));
    }
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let path = tmp.join(format!("{host}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    (path, config)
}

fn addr_of(config: &Value, key: &str) -> SocketAddr {
    config[key].as_str().unwrap().parse().unwrap()
}

impl Stack {
    pub async fn start(o: Options) -> Stack {
        require_root();
        // Outside /tmp: the workers' homes live here (see `state_tempdir`).
        let tmp = crate::worker::state_tempdir();
        let net = stack_net();
        // The inventory's state directory (as sagectl keeps it beside the inventory): its CA
        // signs everything, the site certificate included (valid for the HAProxy address too,
        // so clients can verify it without a DNS name).
        let state = State::open_at(&tmp.path().join(".sagectl/btest"), "btest").unwrap();
        let site = state
            .issue(
                "t-site",
                "sagews.test",
                vec!["sagews.test".into()],
                vec![format!("{net}.10").parse().unwrap()],
            )
            .unwrap();
        std::fs::write(tmp.path().join("site.crt"), &site.chain_pem).unwrap();
        std::fs::write(tmp.path().join("site.key"), site.key_pem.expose()).unwrap();
        let pg = Pg::for_ca(&state, false).await;
        let inv = tmp.path().join("btest.yaml");
        std::fs::write(&inv, inventory(&net, pg.port, &o)).unwrap();
        let rendered = tmp.path().join("rendered");
        let r = crate::lab::sagectl()
            .arg("render")
            .arg(&inv)
            .arg("--out")
            .arg(&rendered)
            .output()
            .unwrap();
        let (stdout, stderr) = crate::lab::text(&r);
        assert!(r.status.success(), "sagectl render:\n{stdout}\n{stderr}");
        for host in std::fs::read_dir(&rendered).unwrap() {
            crate::lab::apply_manifest(&host.unwrap().path());
        }

        let client = {
            let (ca, c, k) = creds(&state, &tmp.path().join("lb"), "lb1", &["loadbalancer"]);
            Identity::load(&ca, &c, &k).unwrap()
        };
        let mut s = Stack {
            pg,
            rendered,
            net,
            memcached: None,
            nginx: None,
            haproxy: None,
            workers: Vec::new(),
            backends: Vec::new(),
            logd: None,
            client,
            state,
            tmp,
        };
        s.start_memcached();
        s.start_nginx();
        let first = format!("backend{}", 1.min(o.backends));
        let (_, b1) = agent_config(
            s.tmp.path(),
            &s.rendered,
            &first,
            "backend.json",
            &json!({}),
        );
        let db = &b1["database"];
        s.pg.create_db_owned(
            "sagews",
            db["user"].as_str().unwrap(),
            db["password"].as_str().unwrap(),
        );
        if o.logd {
            s.start_logd();
        }
        for i in 1..=o.backends {
            let name = format!("backend{i}");
            let (path, config) = agent_config(
                s.tmp.path(),
                &s.rendered,
                &name,
                "backend.json",
                &o.backend_extra,
            );
            let log = s.tmp.path().join(format!("{name}.log"));
            let addr = addr_of(&config, "listen");
            s.backends
                .push(Proc::spawn("backend", &name, addr, path, &log));
        }
        for b in 0..s.backends.len() {
            s.wait_health(b).await;
        }
        for i in 0..o.workers {
            let name = format!("worker{}", i + 1);
            // All on one machine: a uid range each (20), a state directory each (the rendered
            // config leaves the default, /var/lib/sage-worker, which every stack on the box
            // would share: its homes, and its drain flag), no metrics page (one port for all),
            // heartbeats every second so the backends see them at once.
            let uid_min = o.uid_base + 20 * i as u32;
            let extra = json!({"uid_min": uid_min, "uid_max": uid_min + 19,
                "state_dir": s.tmp.path().join(&name).join("state"),
                "metrics_listen": null, "heartbeat_seconds": 1});
            let (path, config) =
                agent_config(s.tmp.path(), &s.rendered, &name, "worker.json", &extra);
            let log = s.tmp.path().join(format!("{name}.log"));
            let addr = addr_of(&config, "listen");
            s.workers
                .push(Proc::spawn("worker", &name, addr, path, &log));
        }
        for b in 0..s.backends.len() {
            s.wait_workers(b, o.workers).await;
        }
        s
    }

    /// A host's address in the stack.
    fn address(&self, last: u8) -> std::net::IpAddr {
        format!("{}.{last}", self.net).parse().unwrap()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// memcached from the cache host's rendered /etc/memcached.conf (TLS only, client
    /// certificates required), in the foreground.
    pub fn start_memcached(&mut self) {
        let tls = self.rendered.join("cache1/etc/memcached/tls/");
        let conf = relocated(
            &self.rendered,
            "cache1",
            "/etc/memcached.conf",
            &[("/etc/memcached/tls/", tls.display().to_string())],
        );
        let args: Vec<String> = conf
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            // Daemon mode, its log file and pid file are systemd's business on a host.
            .filter(|l| *l != "-d" && !l.starts_with("logfile") && !l.starts_with("-P"))
            .flat_map(|l| match l.split_once(' ') {
                Some((flag, value)) => vec![flag.to_string(), value.to_string()],
                None => vec![l.to_string()],
            })
            .collect();
        let addr = SocketAddr::new(self.address(12), 11211);
        let log = self.tmp.path().join("memcached.log");
        self.memcached = Some(serve("memcached", &args, addr, &log));
    }

    pub fn stop_memcached(&mut self) {
        if let Some(mut c) = self.memcached.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// HAProxy in front of the backends from the loadbalancer's rendered haproxy.cfg, in the
    /// foreground, bound to its host's address instead of every address (many stacks share
    /// this machine); returns the HTTPS port.
    pub fn start_haproxy(&mut self) -> u16 {
        let lb = self.address(10);
        let certs = self.rendered.join("lb1/etc/haproxy/certs");
        let conf = relocated(
            &self.rendered,
            "lb1",
            "/etc/haproxy/haproxy.cfg",
            &[
                ("    chroot /var/lib/haproxy\n", String::new()),
                ("    daemon\n", String::new()),
                (
                    "    stats socket /run/haproxy/admin.sock",
                    format!(
                        "    stats socket {}/haproxy.sock",
                        self.tmp.path().display()
                    ),
                ),
                ("    bind :::80 v6only\n", String::new()),
                (
                    "    bind :::443 v6only ssl crt site.pem alpn h2,http/1.1\n",
                    String::new(),
                ),
                ("bind :80", format!("bind {lb}:80")),
                ("bind :443", format!("bind {lb}:443")),
                (
                    "ca-base /etc/haproxy/certs",
                    format!("ca-base {}", certs.display()),
                ),
                (
                    "crt-base /etc/haproxy/certs",
                    format!("crt-base {}", certs.display()),
                ),
            ],
        );
        let path = self.tmp.path().join("haproxy.cfg");
        std::fs::write(&path, conf).unwrap();
        let args = [
            "-db".to_string(),
            "-f".to_string(),
            path.display().to_string(),
        ];
        let log = self.tmp.path().join("haproxy.log");
        self.haproxy = Some(serve("haproxy", &args, SocketAddr::new(lb, 443), &log));
        443
    }

    /// logd from its rendered config, on its own database of the same PostgreSQL.
    fn start_logd(&mut self) {
        let (path, config) = agent_config(
            self.tmp.path(),
            &self.rendered,
            "logs1",
            "logd.json",
            &json!({}),
        );
        let db = &config["database"];
        self.pg.create_db_owned(
            db["name"].as_str().unwrap(),
            db["user"].as_str().unwrap(),
            db["password"].as_str().unwrap(),
        );
        let log = self.tmp.path().join("logs1.log");
        let addr = addr_of(&config, "listen");
        self.logd = Some(Proc::spawn("logd", "logs1", addr, path, &log));
        wait_listening(addr, "logd");
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

    /// HAProxy's HTTPS address (once `start_haproxy` ran).
    pub fn haproxy_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address(10), 443)
    }

    /// The deployment's CA certificate (browsers here trust it).
    pub fn ca_file(&self) -> PathBuf {
        self.tmp.path().join(".sagectl/btest/ca.crt")
    }

    /// nginx from the static host's rendered nginx.conf (the site, published files, and the
    /// publishing server for backends), in the foreground, its files in the stack's directory.
    fn start_nginx(&mut self) {
        let dir = self.tmp.path().join("nginx");
        let www = self.rendered.join("static1/var/www/sagews");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(www.join("pub")).unwrap();
        // nginx's workers (www-data) write what backends publish.
        let www_data = nix::unistd::User::from_name("www-data").unwrap().unwrap();
        let (uid, gid) = (www_data.uid.as_raw(), www_data.gid.as_raw());
        std::os::unix::fs::chown(www.join("pub"), Some(uid), Some(gid)).unwrap();
        let conf = relocated(
            &self.rendered,
            "static1",
            "/etc/nginx/nginx.conf",
            &[
                (
                    "pid /run/nginx.pid;",
                    format!("pid {}/nginx.pid;", dir.display()),
                ),
                ("/var/log/nginx/", format!("{}/", dir.display())),
                (
                    "/etc/nginx/tls/",
                    self.rendered
                        .join("static1/etc/nginx/tls/")
                        .display()
                        .to_string(),
                ),
                ("/var/www/sagews/", format!("{}/", www.display())),
            ],
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let args = [
            "-c".to_string(),
            path.display().to_string(),
            "-g".into(),
            "daemon off;".into(),
        ];
        let log = self.tmp.path().join("nginx.log");
        let addr = SocketAddr::new(self.address(11), 8082);
        self.nginx = Some(serve("nginx", &args, addr, &log));
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
                "backend {b} does not see {n} workers:\n{}\n{}",
                self.log(&self.backends[b].name),
                self.workers
                    .iter()
                    .map(|w| self.log(&w.name))
                    .collect::<Vec<_>>()
                    .join("\n")
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
        let tcp = TcpStream::connect((self.address(11), 8081)).await.unwrap();
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
                        tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                            .unwrap(),
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
        let tcp = TcpStream::connect((self.address(10), port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("sagews.test").unwrap();
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
        if let Some(l) = &mut self.logd {
            l.stop();
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
