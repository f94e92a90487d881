//! The engine server ("zygote"): one process per worker that imports the engine's heavy
//! modules once (Sage's `sage.all` and preparser; for python3 a preload list) and forks each
//! session's engine from itself, so a session starts in milliseconds with those pages shared.
//!
//! It is `engine.py` + `zygote.py` run as root with a clean environment and one descriptor, a
//! SOCK_SEQPACKET socket to the worker (fd 3): it never sees the worker's key, config or other
//! descriptors, and never runs users' code (its children drop to the session's uid first).
//! Per session the worker sends `sandbox::zygote_spec` (the same view, limits, uid, seccomp
//! filter and environment as a fresh process gets) with the session's pipes and cgroup
//! descriptors (SCM_RIGHTS); the answer is the pid of the session's init (PID 1 of its PID
//! namespace, forked straight from the server); its wait status follows when it ends. When the server dies its sessions end with it (each of their processes has a parent-death
//! signal up to the server) and the worker starts a new one; meanwhile sessions start as fresh
//! processes, and the metrics say which way each started.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use tokio::sync::oneshot;

const DRIVER: &str = include_str!("engine.py");
const SERVER: &str = include_str!("zygote.py");

/// What a fork request is answered with: the session init's pid.
type Reply = Result<i32, String>;

/// Requests waiting for their pid, each with the sender of its init's wait status.
type Pending = Mutex<HashMap<u64, (oneshot::Sender<Reply>, oneshot::Sender<i32>)>>;

/// A running server.
struct Live {
    sock: Arc<OwnedFd>,
    pending: Arc<Pending>,
    pid: i32,
    generation: u64,
}

/// The engine server of one engine kind, restarted when it dies.
pub struct Zygote {
    kind: String,
    preload: Vec<String>,
    home: PathBuf,
    live: Mutex<Option<Arc<Live>>>,
    starting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    generation: AtomicU64,
    pub forks: AtomicU64,
    pub restarts: prometheus_client::metrics::counter::Counter,
}

impl Zygote {
    /// `home`: a directory of the worker's own (the server's caches: matplotlib's font list).
    pub fn new(kind: &str, preload: Vec<String>, home: PathBuf) -> Zygote {
        Zygote {
            kind: kind.to_string(),
            preload,
            home,
            live: Mutex::new(None),
            starting: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            forks: AtomicU64::new(0),
            restarts: Default::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.live.lock().unwrap().is_some()
    }

    /// The running server's pid.
    pub fn pid(&self) -> Option<i32> {
        self.live.lock().unwrap().as_ref().map(|l| l.pid)
    }

    /// Keeps a server running: starts one, waits for it to end, starts the next (after a
    /// pause that grows while it keeps failing).
    pub async fn supervise(self: Arc<Self>) {
        let mut pause = Duration::from_millis(500);
        loop {
            match self.start().await {
                Ok(exited) => {
                    pause = Duration::from_millis(500);
                    let _ = exited.await;
                    tracing::warn!(engine = %self.kind, "the engine server stopped: its sessions end; starting a new one");
                    self.restarts.inc();
                }
                Err(e) => {
                    tracing::error!(engine = %self.kind, "the engine server did not start: {e}");
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Starts a server and waits until it is ready; the receiver completes when it ends.
    async fn start(self: &Arc<Self>) -> Result<oneshot::Receiver<()>, String> {
        let _one = self.starting.lock().await;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        std::fs::create_dir_all(&self.home).map_err(|e| format!("{}: {e}", self.home.display()))?;
        let code = format!("{DRIVER}\n{SERVER}");
        let (program, mut args): (&str, Vec<&str>) = match self.kind.as_str() {
            "sage" => ("sage", vec!["-python", "-u", "-c"]),
            _ => ("python3", vec!["-I", "-u", "-c"]),
        };
        args.push(&code);
        let mut cmd = std::process::Command::new(program);
        cmd.args(&args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("HOME", &self.home)
            .env("SAGEWS_ENGINE", &self.kind)
            .env("SAGEWS_ZYGOTE", "1")
            .env("SAGEWS_PRELOAD", self.preload.join(","))
            .env("MPLBACKEND", "Agg")
            .env("MPLCONFIGDIR", self.home.join("matplotlib"))
            // One thread: a process that forks must not have others (BLAS pools).
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("OMP_NUM_THREADS", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let fd = theirs.as_raw_fd();
        // SAFETY: only dup2 and setsid between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if nix::libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
        drop(theirs);
        for (stream, name) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "stdout",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "stderr",
            ),
        ] {
            if let Some(s) = stream {
                let kind = self.kind.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        tracing::warn!(engine = %kind, "engine server {name}: {line}");
                    }
                });
            }
        }
        let sock = Arc::new(ours);
        // Ready, or the reason it is not (Sage takes seconds to import).
        let ready = {
            let sock = sock.clone();
            tokio::task::spawn_blocking(move || recv(sock.as_raw_fd(), Duration::from_secs(300)))
        };
        let pid = match ready.await.map_err(|e| e.to_string())? {
            Ok((msg, _)) => serde_json::from_slice::<serde_json::Value>(&msg)
                .ok()
                .and_then(|v| v["ready"].as_i64())
                .ok_or_else(|| {
                    format!("unexpected first message {}", String::from_utf8_lossy(&msg))
                })? as i32,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} did not get ready: {e}"));
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let live = Arc::new(Live {
            sock: sock.clone(),
            pending: Arc::default(),
            pid,
            generation,
        });
        *self.live.lock().unwrap() = Some(live.clone());
        tracing::info!(engine = %self.kind, pid, preload = %self.preload.join(","), "engine server ready");
        let (ended_tx, ended_rx) = oneshot::channel();
        let me = self.clone();
        std::thread::spawn(move || {
            me.read_events(&live);
            // Gone: forget it, fail what waits, reap it.
            {
                let mut slot = me.live.lock().unwrap();
                if slot
                    .as_ref()
                    .is_some_and(|l| l.generation == live.generation)
                {
                    *slot = None;
                }
            }
            live.pending.lock().unwrap().clear();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            let _ = ended_tx.send(());
        });
        Ok(ended_rx)
    }

    /// The server's messages until its socket ends: pids for requests, wait statuses of
    /// sessions' inits.
    fn read_events(&self, live: &Live) {
        let mut exits: HashMap<i32, oneshot::Sender<i32>> = HashMap::new();
        loop {
            let msg = match recv(live.sock.as_raw_fd(), Duration::from_secs(3600 * 24 * 365)) {
                Ok((m, _)) if !m.is_empty() => m,
                _ => return,
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg) else {
                tracing::error!(engine = %self.kind, "a bad message from the engine server");
                return;
            };
            if let (Some(pid), Some(status)) = (v["exit"].as_i64(), v["status"].as_i64()) {
                if let Some(tx) = exits.remove(&(pid as i32)) {
                    let _ = tx.send(status as i32);
                }
                continue;
            }
            let Some(id) = v["id"].as_u64() else { continue };
            let Some((reply, exit)) = live.pending.lock().unwrap().remove(&id) else {
                continue;
            };
            if let Some(pid) = v["pid"].as_i64() {
                // Its wait status goes to the session through the sender it gave.
                exits.insert(pid as i32, exit);
                let _ = reply.send(Ok(pid as i32));
            } else {
                let error = v["error"].as_str().unwrap_or("the fork failed").to_string();
                let _ = reply.send(Err(error));
            }
        }
    }

    /// Forks a session from the server: `fds` are the session's ctrl (read end), status (write
    /// end), stdout and stderr (write ends) and its cgroup descriptors. The init's pid, and
    /// its wait status when it ends (an error there: the server died first).
    pub async fn fork(
        &self,
        spec: serde_json::Value,
        fds: Vec<OwnedFd>,
    ) -> Result<(i32, oneshot::Receiver<i32>), String> {
        let live = self
            .live
            .lock()
            .unwrap()
            .clone()
            .ok_or("the engine server is not running")?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        live.pending.lock().unwrap().insert(id, (reply_tx, exit_tx));
        let msg = serde_json::to_vec(&serde_json::json!({"id": id, "spec": spec}))
            .map_err(|e| e.to_string())?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = sendmsg::<()>(
            live.sock.as_raw_fd(),
            &[std::io::IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        drop(fds);
        if let Err(e) = sent {
            live.pending.lock().unwrap().remove(&id);
            return Err(format!("sending to the engine server: {e}"));
        }
        match tokio::time::timeout(Duration::from_secs(10), reply_rx).await {
            Ok(Ok(Ok(pid))) => {
                self.forks.fetch_add(1, Ordering::Relaxed);
                Ok((pid, exit_rx))
            }
            Ok(Ok(Err(e))) => Err(format!("the engine server could not fork: {e}")),
            Ok(Err(_)) => Err("the engine server stopped".into()),
            Err(_) => {
                live.pending.lock().unwrap().remove(&id);
                Err("the engine server did not answer within 10 s".into())
            }
        }
    }
}

/// One message from a SOCK_SEQPACKET socket, waiting at most `timeout`.
fn recv(fd: RawFd, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    use std::os::fd::BorrowedFd;
    // SAFETY: `fd` stays open for the call (its owner is alive in the caller).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut pfd = [nix::poll::PollFd::new(
        borrowed,
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    match nix::poll::poll(
        &mut pfd,
        nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
    ) {
        Ok(0) => return Err("timed out".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("poll: {e}")),
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let m = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| format!("recvmsg: {e}"))?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = m.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(r) = c {
                for f in r {
                    // SAFETY: the kernel just gave us this descriptor.
                    fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f) });
                }
            }
        }
    }
    let n = m.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}
