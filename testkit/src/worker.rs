//! A worker started in this process with a test CA, and a backend-side client for it: shared
//! by the worker tests and the worker benchmark.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sagews_wire::frame;
use sagews_wire::proto::{Event, Limits, Request, Status};
use sagews_wire::tls::Identity;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::pki::State;
pub use crate::pki::creds;
pub use crate::require_root;

/// A scratch directory for a worker's state, outside /tmp: sessions get a /tmp (and /var/tmp,
/// /dev/shm, /run) of their own, so homes under /tmp would vanish from their view (the worker
/// refuses such a state directory). Readable by all, as /var/lib/sage-worker is.
pub fn state_tempdir() -> tempfile::TempDir {
    let base = std::path::Path::new("/var/lib/sagectl-tests");
    std::fs::create_dir_all(base).unwrap();
    let d = tempfile::Builder::new()
        .prefix("worker")
        .tempdir_in(base)
        .unwrap();
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

pub fn limits() -> Limits {
    Limits {
        cpu_seconds: 3,
        memory_mb: 512,
        processes: 40,
        open_files: 64,
        file_size_mb: 1,
        wall_clock_seconds: 600,
        idle_timeout_seconds: 600,
        cpu_percent: 100,
    }
}

/// Writes a worker's config (and its certificate) under `dir`: the test defaults with `extra`'s
/// fields on top; its path.
pub fn write_config(
    dir: &Path,
    state: &State,
    addr: SocketAddr,
    uid_min: u32,
    limits: Limits,
    backend_timeout: u64,
    extra: serde_json::Value,
) -> PathBuf {
    let (ca, crt, key) = creds(state, &dir.join("worker"), "worker1", &["worker"]);
    let mut config = serde_json::json!({
        "inventory": "wtest", "host": "worker1", "listen": addr.to_string(),
        "tls": {"ca": ca, "cert": crt, "key": key},
        "engine": "python3", "max_sessions": 8, "uid_min": uid_min, "uid_max": uid_min + 20,
        "backend_timeout_seconds": backend_timeout, "limits": limits, "backends": [],
        "state_dir": dir.join("state"), "metrics_listen": null, "first_frame_seconds": 2
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let path = dir.join("worker.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// A `sage-agent worker` process with a test CA and a config from [`write_config`]; stopped
/// with SIGTERM (and checked to exit cleanly) by [`Worker::stop`], killed when dropped.
pub struct Worker {
    pub addr: SocketAddr,
    pub tmp: tempfile::TempDir,
    pub state: State,
    child: Option<std::process::Child>,
}

impl Worker {
    pub async fn start(uid_min: u32, limits: Limits, backend_timeout: u64) -> Worker {
        require_root();
        let tmp = state_tempdir();
        let state = State::open_at(&tmp.path().join("pki"), "wtest").unwrap();
        Worker::start_with(
            uid_min,
            limits,
            backend_timeout,
            tmp,
            state,
            serde_json::json!({}),
        )
        .await
    }

    /// Starts a worker whose config gets `extra`'s fields on top of the test defaults; returns
    /// once it accepts connections (and, with the engine server, once sessions are forked).
    pub async fn start_with(
        uid_min: u32,
        limits: Limits,
        backend_timeout: u64,
        tmp: tempfile::TempDir,
        state: State,
        extra: serde_json::Value,
    ) -> Worker {
        require_root();
        let addr = free_addr();
        let fresh = extra.get("engine_server").and_then(|v| v.as_str()) == Some("fresh");
        let path = write_config(
            tmp.path(),
            &state,
            addr,
            uid_min,
            limits,
            backend_timeout,
            extra,
        );
        let log = std::fs::File::create(tmp.path().join("worker.log")).unwrap();
        let child = std::process::Command::new(crate::bin("sage-agent"))
            .args(["worker", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut w = Worker {
            addr,
            tmp,
            state,
            child: Some(child),
        };
        w.wait_listening().await;
        if !fresh {
            w.wait_for_engine_server().await;
        }
        w
    }

    /// The worker process's pid (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("worker.log")).unwrap_or_default()
    }

    async fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.addr).await.is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the worker exited ({status}):\n{}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker did not listen within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until sessions are forked from the engine server (it imports its modules first).
    pub async fn wait_for_engine_server(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut c = self.client().await;
        loop {
            c.open("engine-server-probe", None).await;
            c.close("engine-server-probe").await;
            if c.last_forked {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the engine server did not start within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn backend_identity(&self, name: &str, roles: &[&str]) -> Identity {
        let (ca, crt, key) = creds(&self.state, &self.tmp.path().join("clients"), name, roles);
        Identity::load(&ca, &crt, &key).unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, &self.backend_identity("backend1", &["backend"]))
            .await
            .expect("a backend is accepted")
    }

    /// SIGTERM, then waits for a clean exit (sessions closed, users' files removed).
    pub async fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let (_, status) = sigterm_and_wait(&mut child).await;
        assert!(
            status.success(),
            "the worker exited {status}:\n{}",
            self.log()
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback address with a port free a moment ago (the process started next binds it).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub struct Client {
    pub rd: ReadHalf<TlsStream<TcpStream>>,
    pub wr: WriteHalf<TlsStream<TcpStream>>,
    /// Whether the last session opened was forked from the engine server.
    pub last_forked: bool,
}

#[derive(Debug, Default)]
pub struct Cell {
    pub stdout: String,
    pub stderr: String,
    pub status: Option<Status>,
    pub message: Option<String>,
    pub chunks: usize,
}

impl Client {
    pub async fn connect(addr: SocketAddr, id: &Identity) -> std::io::Result<Client> {
        let cfg = id.client_config(&["worker"]).unwrap();
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("worker1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        // TLS 1.3 reports a refused client certificate on the first read: ping to find out.
        frame::write(&mut tls, &Request::Ping)
            .await
            .map_err(std::io::Error::other)?;
        let pong: Event = frame::read(&mut tls, 1 << 20, Duration::from_secs(10))
            .await
            .map_err(std::io::Error::other)?;
        assert!(matches!(pong, Event::Pong { .. }), "{pong:?}");
        let (rd, wr) = tokio::io::split(tls);
        Ok(Client {
            rd,
            wr,
            last_forked: false,
        })
    }

    pub async fn send(&mut self, r: Request) {
        frame::write(&mut self.wr, &r).await.unwrap();
    }

    pub async fn next(&mut self) -> Event {
        frame::read(&mut self.rd, 128 << 20, Duration::from_secs(60))
            .await
            .expect("an event")
    }

    pub async fn open(&mut self, s: &str, bundle: Option<String>) -> u64 {
        self.send(Request::Open {
            session: s.into(),
            bundle,
            limits: None,
        })
        .await;
        match self.next().await {
            Event::Opened {
                session,
                ready_ms,
                engine,
                forked,
            } => {
                assert_eq!(session.as_str(), s);
                assert!(["python3", "sage"].contains(&engine.as_str()), "{engine}");
                self.last_forked = forked;
                ready_ms
            }
            e => panic!("open {s}: {e:?}"),
        }
    }

    pub async fn run(&mut self, s: &str, id: u64, code: &str) -> Cell {
        self.send(Request::Execute {
            session: s.into(),
            id,
            code: code.into(),
        })
        .await;
        self.collect(s, id).await
    }

    pub async fn collect(&mut self, s: &str, id: u64) -> Cell {
        let mut c = Cell::default();
        loop {
            match self.next().await {
                Event::Stdout {
                    session,
                    id: i,
                    data,
                } if session == s && i == id => {
                    c.stdout.push_str(&data);
                    c.chunks += 1;
                }
                Event::Stderr {
                    session,
                    id: i,
                    data,
                } if session == s && i == id => c.stderr.push_str(&data),
                Event::Done {
                    session,
                    id: i,
                    status,
                    message,
                } if session == s && i == id => {
                    c.status = Some(status);
                    c.message = message;
                    return c;
                }
                Event::Closed { .. } => {}
                e => panic!("unexpected while running {s}/{id}: {e:?}"),
            }
        }
    }

    pub async fn close(&mut self, s: &str) -> String {
        self.send(Request::Close { session: s.into() }).await;
        loop {
            if let Event::Closed { session, reason } = self.next().await {
                if session == s {
                    return reason;
                }
            }
        }
    }
}

impl Client {
    /// The next event, or None when the worker closed the connection.
    pub async fn next_or_end(&mut self) -> Option<Event> {
        match frame::read(&mut self.rd, 1 << 20, Duration::from_secs(30)).await {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("connection ended: {e}");
                None
            }
        }
    }
}

/// Sends SIGTERM to `child` and waits for it (at most 5 s, then the test fails): how long it
/// took and how it ended.
pub async fn sigterm_and_wait(
    child: &mut std::process::Child,
) -> (Duration, std::process::ExitStatus) {
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (started.elapsed(), s);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
