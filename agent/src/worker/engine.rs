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
use tokio::process::{Child, ChildStderr, ChildStdout};

use super::sandbox::{self, Account};
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

pub struct Engine {
    child: Child,
    ctrl: pipe::Sender,
    status: BufReader<pipe::Receiver>,
    out: ChildStdout,
    err: ChildStderr,
    marker: Vec<u8>,
    pub pid: i32,
    pub kind: String,
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
    /// Starts the engine as `acct` and waits until it is ready.
    pub async fn start(acct: &Account, limits: &Limits, kind: &str) -> Result<Engine, EngineError> {
        let (ctrl_r, ctrl_w) = pipe_pair()?;
        let (status_r, status_w) = pipe_pair()?;
        let fds = vec![(ctrl_r.as_raw_fd(), 3), (status_w.as_raw_fd(), 4)];
        let (program, args): (&str, Vec<&str>) = match kind {
            "sage" => ("sage", vec!["-python", "-u", "-c", DRIVER]),
            _ => ("python3", vec!["-I", "-u", "-c", DRIVER]),
        };
        let marker = random_marker();
        let mut cmd = sandbox::command(acct, limits, program, &args, fds);
        cmd.env(
            "SAGEWS_MARKER",
            String::from_utf8_lossy(&marker).into_owned(),
        )
        .env("SAGEWS_ENGINE", kind)
        .env("SAGEWS_MAX_IMAGE", MAX_IMAGE.to_string())
        // Pictures are drawn to PNG, never to a screen.
        .env("MPLBACKEND", "Agg")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| EngineError::Start(format!("{program}: {e}")))?;
        drop(ctrl_r);
        drop(status_w);
        let ctrl =
            pipe::Sender::from_owned_fd(ctrl_w).map_err(|e| EngineError::Start(e.to_string()))?;
        let status = BufReader::new(
            pipe::Receiver::from_owned_fd(status_r)
                .map_err(|e| EngineError::Start(e.to_string()))?,
        );
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let mut e = Engine {
            child,
            ctrl,
            status,
            out,
            err,
            marker,
            pid,
            kind: kind.to_string(),
        };
        let mut line = String::new();
        let ready =
            tokio::time::timeout(Duration::from_secs(120), e.status.read_line(&mut line)).await;
        if !matches!(ready, Ok(Ok(_))) || line.trim() != "ready" {
            let mut stderr = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(1), e.err.read_to_end(&mut stderr)).await;
            let _ = e.child.start_kill();
            return Err(EngineError::Start(format!(
                "{program} did not start: {}",
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

    async fn died(&mut self, limits: &Limits) -> EngineError {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        EngineError::Died(match status {
            Ok(Ok(s)) => describe_exit(s, limits),
            _ => "the engine stopped answering".to_string(),
        })
    }

    /// Stops the engine (SIGTERM, then SIGKILL).
    pub async fn stop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = self.child.kill().await;
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
