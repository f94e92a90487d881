//! A session's engine: python3 (or Sage's python) running `engine.py` as the workspace user.
//! Code goes in on a pipe; stdout and stderr come back on their own pipes, streamed in chunks
//! (flushed at 4 KiB or 50 ms); a random marker closes both streams after each cell, so output
//! is never cut short nor mixed into the next cell; the cell's status comes on a fourth pipe.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};

use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::process::Child;
use tokio::sync::oneshot;

use super::sandbox::{self, Account};
use super::zygote::Zygote;
use crate::proto::{Limits, Status};

const DRIVER: &str = include_str!("engine.py");
const CHUNK: usize = 4096;
const FLUSH: Duration = Duration::from_millis(50);
/// The largest picture a cell may show (PNG bytes).
pub const MAX_IMAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("starting the engine: {0}")]
    Start(String),
    #[error("the engine stopped: {0}")]
    Died(String),
}

/// Which stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Where a cell's output chunks go.
pub trait Emit: Send {
    fn emit(
        &mut self,
        stream: Stream,
        text: String,
    ) -> impl std::future::Future<Output = ()> + Send;

    /// A picture the cell made (`data` in base64).
    fn image(&mut self, mime: String, data: String)
    -> impl std::future::Future<Output = ()> + Send;
}

/// The longest line the engine may write on its status pipe: an image of `max_image` bytes
/// in base64, and its header.
fn max_status_line(max_image: usize) -> u64 {
    (max_image as u64).div_ceil(3) * 4 + 256
}

/// The engine's process: a child of the worker, or forked by the engine server (which sends
/// its wait status when it ends).
enum Proc {
    Fresh(Child),
    Forked {
        exit: Option<oneshot::Receiver<i32>>,
        /// Once ended: its status, or `None` when the server died before telling.
        status: Option<Option<std::process::ExitStatus>>,
    },
}

impl Proc {
    /// Waits for the end (cancel-safe); `None`: the engine server died before telling.
    async fn wait(&mut self) -> Option<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Proc::Fresh(c) => c.wait().await.ok(),
            Proc::Forked { exit, status } => {
                if status.is_none()
                    && let Some(rx) = exit.as_mut()
                {
                    let r = rx.await;
                    *exit = None;
                    *status = Some(r.ok().map(std::process::ExitStatus::from_raw));
                }
                status.flatten()
            }
        }
    }
}

pub struct Engine {
    proc: Proc,
    ctrl: pipe::Sender,
    status: BufReader<pipe::Receiver>,
    out: pipe::Receiver,
    err: pipe::Receiver,
    marker: Vec<u8>,
    pub pid: i32,
    pub kind: String,
    /// Forked from the engine server (else a fresh process).
    pub forked: bool,
}

/// The engine's four pipes: (ours, the engine's) for ctrl (fd 3), status (fd 4), stdout,
/// stderr.
struct Pipes {
    ctrl: (OwnedFd, OwnedFd),
    status: (OwnedFd, OwnedFd),
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
}

impl Pipes {
    fn new() -> Result<Pipes, EngineError> {
        let (ctrl_r, ctrl_w) = pipe_pair()?;
        let (status_r, status_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        Ok(Pipes {
            ctrl: (ctrl_w, ctrl_r),
            status: (status_r, status_w),
            out: (out_r, out_w),
            err: (err_r, err_w),
        })
    }
}

fn random_marker() -> Vec<u8> {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    // No NUL: it travels in an environment variable.
    format!("\x01\x02sagews-end-{hex}\x03").into_bytes()
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), EngineError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| EngineError::Start(format!("pipe: {e}")))
}

/// Why a process ended, in words for the user.
pub fn describe_exit(status: std::process::ExitStatus, limits: &Limits) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(s) if s == Signal::SIGXCPU as i32 => format!(
            "CPU time limit reached ({} s of CPU): the session was stopped",
            limits.cpu_seconds
        ),
        Some(s) if s == Signal::SIGKILL as i32 => {
            "the engine was killed (SIGKILL): a limit was reached or the session was stopped"
                .to_string()
        }
        Some(s) if s == Signal::SIGXFSZ as i32 => {
            format!("file size limit reached ({} MB)", limits.file_size_mb)
        }
        Some(s) => format!("the engine died of signal {s}"),
        None => format!("the engine exited ({status})"),
    }
}

impl Engine {
    /// Starts the engine as `acct` and waits until it is ready: forked from the engine server
    /// when there is one running, else as a fresh process.
    pub async fn start(
        acct: &Account,
        limits: &Limits,
        kind: &str,
        zygote: Option<&Zygote>,
    ) -> Result<Engine, EngineError> {
        let marker = random_marker();
        let env = [
            (
                "SAGEWS_MARKER",
                String::from_utf8_lossy(&marker).into_owned(),
            ),
            ("SAGEWS_ENGINE", kind.to_string()),
            ("SAGEWS_MAX_IMAGE", MAX_IMAGE.to_string()),
            // Pictures are drawn to PNG, never to a screen.
            ("MPLBACKEND", "Agg".to_string()),
        ];
        if let Some(z) = zygote.filter(|z| z.is_up()) {
            let p = Pipes::new()?;
            let mut spec = sandbox::zygote_spec(acct, limits);
            for (k, v) in &env {
                spec["env"][*k] = serde_json::Value::from(v.as_str());
            }
            let mut fds = vec![p.ctrl.1, p.status.1, p.out.1, p.err.1];
            if let Some(cg) = &acct.cgroup {
                fds.extend(
                    cg.join_fds()
                        .map_err(|e| EngineError::Start(format!("the session's cgroup: {e}")))?,
                );
            }
            match z.fork(spec, fds).await {
                Ok((pid, exit)) => {
                    let proc = Proc::Forked {
                        exit: Some(exit),
                        status: None,
                    };
                    return Engine::ready(
                        proc,
                        pid,
                        (p.ctrl.0, p.status.0, p.out.0, p.err.0),
                        marker,
                        kind,
                        true,
                    )
                    .await;
                }
                Err(e) => tracing::warn!("{e}: starting a fresh engine process instead"),
            }
        }
        let p = Pipes::new()?;
        let fds = vec![
            (p.ctrl.1.as_raw_fd(), 3),
            (p.status.1.as_raw_fd(), 4),
            (p.out.1.as_raw_fd(), 1),
            (p.err.1.as_raw_fd(), 2),
        ];
        let (program, args): (&str, Vec<&str>) = match kind {
            "sage" => ("sage", vec!["-python", "-u", "-c", DRIVER]),
            _ => ("python3", vec!["-I", "-u", "-c", DRIVER]),
        };
        let mut cmd = sandbox::command(acct, limits, program, &args, fds);
        cmd.envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| EngineError::Start(format!("{program}: {e}")))?;
        drop((p.ctrl.1, p.status.1, p.out.1, p.err.1));
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        Engine::ready(
            Proc::Fresh(child),
            pid,
            (p.ctrl.0, p.status.0, p.out.0, p.err.0),
            marker,
            kind,
            false,
        )
        .await
    }

    /// Waits for the engine's `ready`.
    async fn ready(
        proc: Proc,
        pid: i32,
        (ctrl, status, out, err): (OwnedFd, OwnedFd, OwnedFd, OwnedFd),
        marker: Vec<u8>,
        kind: &str,
        forked: bool,
    ) -> Result<Engine, EngineError> {
        let start = |e: std::io::Error| EngineError::Start(e.to_string());
        let mut e = Engine {
            proc,
            ctrl: pipe::Sender::from_owned_fd(ctrl).map_err(start)?,
            status: BufReader::new(pipe::Receiver::from_owned_fd(status).map_err(start)?),
            out: pipe::Receiver::from_owned_fd(out).map_err(start)?,
            err: pipe::Receiver::from_owned_fd(err).map_err(start)?,
            marker,
            pid,
            kind: kind.to_string(),
            forked,
        };
        let mut line = String::new();
        let ready =
            tokio::time::timeout(Duration::from_secs(120), e.status.read_line(&mut line)).await;
        if !matches!(ready, Ok(Ok(_))) || line.trim() != "ready" {
            let mut stderr = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(1), e.err.read_to_end(&mut stderr)).await;
            let how = match tokio::time::timeout(Duration::from_millis(500), e.proc.wait()).await {
                Ok(Some(s)) => format!(" ({s})"),
                _ => String::new(),
            };
            e.stop(Duration::from_secs(2)).await;
            return Err(EngineError::Start(format!(
                "the {kind} engine did not start{how}: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(e)
    }

    /// Runs one cell, handing each output chunk to `emit`. An error means the engine died; the
    /// message says why.
    pub async fn execute(
        &mut self,
        code: &str,
        limits: &Limits,
        emit: &mut impl Emit,
    ) -> Result<Status, EngineError> {
        let mut msg = format!("{}\n", code.len()).into_bytes();
        msg.extend_from_slice(code.as_bytes());
        if self.ctrl.write_all(&msg).await.is_err() {
            return Err(self.died(limits).await);
        }
        let mut outs = [Splitter::new(&self.marker), Splitter::new(&self.marker)];
        let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut first_pending: Option<Instant> = None;
        let mut buf_o = vec![0u8; 8192];
        let mut buf_e = vec![0u8; 8192];
        while !(outs[0].done && outs[1].done) {
            let wait = first_pending.map_or(Duration::from_secs(3600), |t| {
                FLUSH.saturating_sub(t.elapsed())
            });
            tokio::select! {
                r = self.out.read(&mut buf_o), if !outs[0].done => match r {
                    Ok(0) | Err(_) => return Err(self.died(limits).await),
                    Ok(n) => { pending[0].extend(outs[0].push(&buf_o[..n])); first_pending.get_or_insert_with(Instant::now); }
                },
                r = self.err.read(&mut buf_e), if !outs[1].done => match r {
                    Ok(0) | Err(_) => return Err(self.died(limits).await),
                    Ok(n) => { pending[1].extend(outs[1].push(&buf_e[..n])); first_pending.get_or_insert_with(Instant::now); }
                },
                _ = tokio::time::sleep(wait) => {}
            }
            let due = first_pending.is_some_and(|t| t.elapsed() >= FLUSH);
            for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                if !pending[i].is_empty() && (due || pending[i].len() >= CHUNK || outs[i].done) {
                    let text = take_utf8(&mut pending[i], outs[i].done);
                    if !text.is_empty() {
                        emit.emit(stream, text).await;
                    }
                }
            }
            if pending.iter().all(Vec::is_empty) {
                first_pending = None;
            } else if due {
                first_pending = Some(Instant::now());
            }
        }
        // Pictures, then the status. The engine runs users' code, so a line is bounded.
        let max = max_status_line(MAX_IMAGE);
        loop {
            let mut line = String::new();
            match (&mut self.status).take(max).read_line(&mut line).await {
                Ok(n) if n > 0 && line.ends_with('\n') => {}
                Ok(n) if n > 0 => {
                    return Err(EngineError::Died(format!(
                        "the engine wrote a status line over {max} bytes"
                    )));
                }
                _ => return Err(self.died(limits).await),
            }
            if let Some(rest) = line.trim_end().strip_prefix("image ") {
                if let Some((mime, data)) = rest.split_once(' ') {
                    if mime.starts_with("image/") && mime.len() < 64 {
                        emit.image(mime.to_string(), data.to_string()).await;
                    }
                }
                continue;
            }
            return Ok(match line.trim() {
                "ok" => Status::Ok,
                "interrupted" => Status::Interrupted,
                _ => Status::Error,
            });
        }
    }

    /// Completes when the engine's process ends by itself (between cells), saying why.
    pub async fn ended(&mut self, limits: &Limits) -> String {
        match self.proc.wait().await {
            Some(s) => describe_exit(s, limits),
            None => "the engine server stopped, and this session with it".to_string(),
        }
    }

    async fn died(&mut self, limits: &Limits) -> EngineError {
        let status = tokio::time::timeout(Duration::from_secs(10), self.proc.wait()).await;
        EngineError::Died(match status {
            Ok(Some(s)) => describe_exit(s, limits),
            Ok(None) => "the engine server stopped, and this session with it".to_string(),
            Err(_) => "the engine stopped answering".to_string(),
        })
    }

    /// Stops the engine (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&mut self, grace: Duration) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        if tokio::time::timeout(grace, self.proc.wait()).await.is_err() {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            if let Proc::Fresh(c) = &mut self.proc {
                let _ = c.kill().await;
            }
        }
    }
}

/// The longest valid UTF-8 prefix of `buf` as text (all of it, lossily, at the end of a cell),
/// leaving an incomplete character for the next chunk.
fn take_utf8(buf: &mut Vec<u8>, end: bool) -> String {
    let cut = match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() && !end => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    let rest = buf.split_off(cut);
    let text = String::from_utf8_lossy(buf).into_owned();
    *buf = rest;
    text
}

/// Finds the end marker in a stream; passes through everything before it.
struct Splitter {
    marker: Vec<u8>,
    held: Vec<u8>,
    done: bool,
}

impl Splitter {
    fn new(marker: &[u8]) -> Splitter {
        Splitter {
            marker: marker.to_vec(),
            held: Vec::new(),
            done: false,
        }
    }

    /// Bytes safe to emit; sets `done` when the marker has been seen (bytes after it, which a
    /// background process may have written, belong to no cell and are dropped).
    fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(data);
        if let Some(at) = self
            .held
            .windows(self.marker.len())
            .position(|w| w == self.marker.as_slice())
        {
            self.done = true;
            let out = self.held[..at].to_vec();
            self.held.clear();
            return out;
        }
        // Keep what could be the start of a marker.
        let keep = (1..self.marker.len().min(self.held.len() + 1))
            .rev()
            .find(|&k| self.held.ends_with(&self.marker[..k]))
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_vec();
        self.held.drain(..self.held.len() - keep);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_finds_markers_across_chunks() {
        let mut s = Splitter::new(b"<END>");
        assert_eq!(s.push(b"hello <E"), b"hello ");
        assert_eq!(s.push(b"N"), b"");
        assert_eq!(s.push(b"D>tail"), b"");
        assert!(s.done);
        let mut s = Splitter::new(b"<END>");
        assert_eq!(s.push(b"a<Eb"), b"a<Eb");
        assert!(!s.done);
    }

    #[test]
    fn utf8_is_never_cut() {
        let mut b = "é".as_bytes().to_vec();
        b.insert(0, b'x');
        let last = b.pop().unwrap();
        assert_eq!(take_utf8(&mut b, false), "x");
        b.push(last);
        assert_eq!(take_utf8(&mut b, false), "é");
        let mut bad = vec![0xff, b'a'];
        assert_eq!(take_utf8(&mut bad, true), "\u{fffd}a");
    }
}
