//! A session: one workspace on this worker. Its task owns the workspace's unix user and engine
//! and runs its commands one at a time, in order (executes, saves, close); an interrupt goes
//! straight to the engine's process group. The session closes itself at its wall-clock limit,
//! after its idle timeout, or when its engine dies, and always removes its user and processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::{Mutex, mpsc};

use super::Shared;
use super::engine::{Emit, Engine, EngineError, Stream};
use super::sandbox::{self, Account};
use crate::proto::{Event, FileOp, FileResult, Limits, MAX_FILE_BYTES, Status};

pub enum Cmd {
    Execute { id: u64, code: String },
    Save { message: String },
    File(FileOp),
    Close { reason: String },
}

/// Where a session's events go: the connection that last spoke for it (replaceable).
pub type Sink = Arc<Mutex<Option<mpsc::Sender<Event>>>>;

pub struct Handle {
    pub tx: mpsc::Sender<Cmd>,
    /// Ends a running cell at once when the session is closed (the close command itself waits
    /// in `tx` behind it).
    pub stop: Arc<tokio::sync::Notify>,
    pub sink: Sink,
    /// The engine's pid (its process group), for interrupts.
    pub pid: i32,
    pub uid: u32,
}

struct ToSink {
    sink: Sink,
    session: String,
    id: u64,
}

impl Emit for ToSink {
    async fn emit(&mut self, stream: Stream, data: String) {
        let (session, id) = (self.session.clone(), self.id);
        let e = match stream {
            Stream::Stdout => Event::Stdout { session, id, data },
            Stream::Stderr => Event::Stderr { session, id, data },
        };
        send(&self.sink, e).await;
    }

    async fn image(&mut self, mime: String, data: String) {
        let e = Event::Image {
            session: self.session.clone(),
            id: self.id,
            mime,
            data,
        };
        send(&self.sink, e).await;
    }
}

const FILES: &str = include_str!("files.py");

/// A file operation, as the workspace's user in the sandbox (`files.py`).
async fn file_op(acct: &Account, limits: &Limits, op: FileOp) -> FileResult {
    let checked = match &op {
        FileOp::List => Ok(String::new()),
        FileOp::Read { path } | FileOp::Write { path, .. } | FileOp::Remove { path } => {
            crate::proto::workspace_path(path)
        }
    };
    let path = match checked {
        Ok(p) => p,
        Err(message) => return FileResult::Failed { message },
    };
    let (verb, stdin) = match op {
        FileOp::List => ("list", Vec::new()),
        FileOp::Read { .. } => ("read", Vec::new()),
        FileOp::Write { data, .. } => ("write", data.into_bytes()),
        FileOp::Remove { .. } => ("remove", Vec::new()),
    };
    if verb != "list" && path.is_empty() {
        return FileResult::Failed {
            message: "a file path is required".into(),
        };
    }
    if stdin.len() > MAX_FILE_BYTES {
        return FileResult::Failed {
            message: format!("the text is over {MAX_FILE_BYTES} bytes"),
        };
    }
    let mut c = sandbox::command(
        acct,
        limits,
        "python3",
        &["-I", "-c", FILES, verb, &path],
        Vec::new(),
    );
    c.env("SAGEWS_MAX_FILE", MAX_FILE_BYTES.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => {
            return FileResult::Failed {
                message: format!("python3: {e}"),
            };
        }
    };
    let group = child.id();
    let run = async {
        let mut input = child.stdin.take().expect("piped");
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = input.write_all(&stdin).await;
        });
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("python3: {e}"))?;
        let _ = writer.await;
        serde_json::from_slice::<FileResult>(&out.stdout).map_err(|_| {
            format!(
                "the file operation failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(r)) => r,
        Ok(Err(message)) => FileResult::Failed { message },
        Err(_) => {
            kill_group(group);
            FileResult::Failed {
                message: "the file operation took longer than 30 s".into(),
            }
        }
    }
}

/// SIGKILL to a sandboxed command's process group (its stand-in, init and everything under it):
/// dropping the command kills the stand-in only.
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

async fn send(sink: &Sink, e: Event) {
    let tx = sink.lock().await.clone();
    if let Some(tx) = tx {
        let _ = tx.send(e).await;
    }
}

/// Prepares the workspace and starts its engine. On success the session's task runs on, and
/// the caller registers the handle before sending the `opened` event (so a request that answers
/// it always finds the session).
pub async fn open(
    shared: Arc<Shared>,
    session: String,
    bundle: Option<String>,
    limits: Limits,
    sink: Sink,
) -> Result<(Handle, Event), String> {
    let started = Instant::now();
    let uid = shared
        .allocate_uid()
        .ok_or("no free workspace uid: the worker is full")?;
    let homes = shared.config.state_dir.join("homes");
    let acct = {
        let (homes, session) = (homes.clone(), session.clone());
        let (cgroups, limits) = (shared.cgroups.clone(), limits.clone());
        tokio::task::spawn_blocking(move || {
            Account::create(uid, &homes, &session, &cgroups, &limits)
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let acct = match acct {
        Ok(a) => a,
        Err(e) => {
            shared.release_uid(uid);
            return Err(e.to_string());
        }
    };
    let fail = |acct: Account, shared: Arc<Shared>, why: String| async move {
        remove(&shared, acct, Duration::from_secs(1), "").await;
        why
    };
    // The files and the engine at the same time: the engine writes nothing in the home while
    // it starts (its caches are beside it), so the checkout finds it empty.
    let (files, engine) = tokio::join!(
        checkout(
            &acct,
            &limits,
            bundle.as_deref(),
            shared.config.max_bundle_bytes(),
        ),
        Engine::start(
            &acct,
            &limits,
            &shared.config.engine,
            shared.zygote.as_deref(),
        )
    );
    let engine = match (files, engine) {
        (Ok(()), Ok(e)) => e,
        (Err(e), engine) => {
            if let Ok(mut engine) = engine {
                engine.stop(shared.grace()).await;
            }
            return Err(fail(acct, shared, e).await);
        }
        (Ok(()), Err(e)) => return Err(fail(acct, shared, e.to_string()).await),
    };
    let (tx, rx) = mpsc::channel(64);
    let pid = engine.pid;
    shared.metrics.sessions_opened.inc();
    if engine.forked {
        shared.metrics.engines_forked.inc();
    } else {
        shared.metrics.engines_fresh.inc();
    }
    let opened = Event::Opened {
        session: session.clone(),
        engine: engine.kind.clone(),
        ready_ms: started.elapsed().as_millis() as u64,
        forked: engine.forked,
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let session_io = Io {
        rx,
        sink: sink.clone(),
        stop: stop.clone(),
    };
    tokio::spawn(run(shared, session, acct, engine, limits, session_io));
    Ok((
        Handle {
            tx,
            stop: stop.clone(),
            sink,
            pid,
            uid,
        },
        opened,
    ))
}

/// Runs a git command in the workspace, as its user, in the sandbox; returns stdout.
async fn git(
    acct: &Account,
    limits: &Limits,
    args: &[&str],
    max_out: usize,
) -> Result<Vec<u8>, String> {
    let mut argv = vec![
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "safe.directory=*",
        "-c",
        "init.defaultBranch=main",
    ];
    argv.extend_from_slice(args);
    let mut c = sandbox::command(acct, limits, "git", &argv, Vec::new());
    let ident = format!("{}@sagews.invalid", acct.name);
    c.env("GIT_AUTHOR_NAME", &acct.name)
        .env("GIT_AUTHOR_EMAIL", &ident)
        .env("GIT_COMMITTER_NAME", &acct.name)
        .env("GIT_COMMITTER_EMAIL", &ident);
    c.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().map_err(|e| format!("git: {e}"))?;
    let group = child.id();
    let o = match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
        Ok(o) => o.map_err(|e| format!("git: {e}"))?,
        Err(_) => {
            kill_group(group);
            return Err(format!("git {} timed out", args[0]));
        }
    };
    if !o.status.success() {
        return Err(format!(
            "git {} failed: {}",
            args[0],
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    if o.stdout.len() > max_out {
        return Err(format!(
            "git {} produced {} bytes, over the limit of {max_out}",
            args[0],
            o.stdout.len()
        ));
    }
    Ok(o.stdout)
}

/// The workspace's files: cloned from the bundle the backend sent, or an empty repository.
async fn checkout(
    acct: &Account,
    limits: &Limits,
    bundle: Option<&str>,
    max: usize,
) -> Result<(), String> {
    match bundle {
        // A new workspace: its repository is made at its first save (a git process is most
        // of what opening an empty workspace would cost).
        None => Ok(()),
        Some(b64) => {
            if b64.len() / 4 * 3 > max {
                return Err(format!(
                    "the bundle is larger than the limit of {max} bytes"
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("the bundle is not base64: {e}"))?;
            let path = acct.home.with_extension("bundle");
            std::fs::write(&path, &bytes).map_err(|e| format!("writing the bundle: {e}"))?;
            std::os::unix::fs::chown(&path, Some(acct.uid), Some(acct.gid))
                .map_err(|e| e.to_string())?;
            let p = path.display().to_string();
            let home = acct.home.display().to_string();
            let r = git(acct, limits, &["clone", "-q", &p, &home], 1 << 20)
                .await
                .map_err(|e| format!("not a valid git bundle: {e}"));
            let _ = std::fs::remove_file(&path);
            r.map(drop)
        }
    }
}

async fn save(
    acct: &Account,
    limits: &Limits,
    message: &str,
    max: usize,
) -> Result<(Vec<u8>, bool), String> {
    let home = acct.home.display().to_string();
    // The repository of a new workspace is made here (see `checkout`).
    if std::fs::symlink_metadata(acct.home.join(".git")).is_err() {
        git(acct, limits, &["init", "-q", &home], 1 << 20).await?;
    }
    git(acct, limits, &["-C", &home, "add", "-A"], 1 << 20).await?;
    let staged = git(
        acct,
        limits,
        &["-C", &home, "status", "--porcelain"],
        16 << 20,
    )
    .await?;
    let changed = !staged.is_empty();
    if changed {
        git(
            acct,
            limits,
            &["-C", &home, "commit", "-q", "-m", message],
            1 << 20,
        )
        .await?;
    }
    let bundle = git(
        acct,
        limits,
        &["-C", &home, "bundle", "create", "-q", "-", "--all"],
        max,
    )
    .await;
    match bundle {
        Ok(b) => Ok((b, changed)),
        // A new workspace with no file yet: nothing to keep, and nothing wrong.
        Err(e) if e.contains("empty bundle") && !changed => Ok((Vec::new(), false)),
        Err(e) => Err(e),
    }
}

/// Removes the session's processes, cgroup and files; its uid is given out again only when
/// nothing of it is left.
async fn remove(shared: &Shared, acct: Account, grace: Duration, session: &str) {
    let uid = acct.uid;
    match tokio::task::spawn_blocking(move || acct.destroy(grace)).await {
        Ok(Ok(_)) => shared.release_uid(uid),
        Ok(Err(e)) => {
            tracing::error!(session = %session, uid, "the session could not be removed whole, so its uid is held: {e}");
            shared.hold_uid(uid);
        }
        Err(e) => {
            tracing::error!(session = %session, uid, "removing the session: {e}");
            shared.hold_uid(uid);
        }
    }
}

/// What a session's task hears and speaks through.
struct Io {
    rx: mpsc::Receiver<Cmd>,
    sink: Sink,
    stop: Arc<tokio::sync::Notify>,
}

async fn run(
    shared: Arc<Shared>,
    session: String,
    acct: Account,
    mut engine: Engine,
    limits: Limits,
    io: Io,
) {
    let Io { mut rx, sink, stop } = io;
    // The session's CPU time (all its processes) is looked at every second, whatever it does.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let cpu_over = |acct: &Account| {
        let used = acct.cgroup.as_ref()?.cpu_used();
        (used.as_secs() >= limits.cpu_seconds).then(|| {
            format!(
                "CPU time limit reached ({} s of CPU for the session's processes together)",
                limits.cpu_seconds
            )
        })
    };
    let wall = tokio::time::Instant::now() + Duration::from_secs(limits.wall_clock_seconds);
    let idle = Duration::from_secs(limits.idle_timeout_seconds);
    let mut idle_at = tokio::time::Instant::now() + idle;
    let reason = loop {
        let cmd = tokio::select! {
            c = rx.recv() => match c { Some(c) => c, None => break "the worker is shutting down".to_string() },
            _ = tokio::time::sleep_until(wall) => break format!("wall-clock limit reached ({} s)", limits.wall_clock_seconds),
            _ = tokio::time::sleep_until(idle_at) => break format!("idle for {} s", limits.idle_timeout_seconds),
            _ = tick.tick() => match cpu_over(&acct) {
                Some(why) => break why,
                None => continue,
            },
            why = engine.ended(&limits) => break why,
        };
        match cmd {
            Cmd::Execute { id, code } => {
                shared.metrics.executes.inc();
                let mut to = ToSink {
                    sink: sink.clone(),
                    session: session.clone(),
                    id,
                };
                // A close or the wall-clock limit ends the cell whatever it does (it may ignore
                // SIGINT, or never print): the engine's process group is stopped, then every
                // process of the user when the session ends.
                let ended = {
                    let cell = engine.execute(&code, &limits, &mut to);
                    tokio::pin!(cell);
                    loop {
                        tokio::select! {
                            r = &mut cell => break Ok(r),
                            _ = stop.notified() => break Err("the session was closed while this cell ran".to_string()),
                            _ = tokio::time::sleep_until(wall) => break Err(format!("wall-clock limit reached ({} s)", limits.wall_clock_seconds)),
                            _ = tick.tick() => if let Some(why) = cpu_over(&acct) { break Err(why) },
                        }
                    }
                };
                // How the cell ended; a reason ends the session too.
                let (status, why) = match ended {
                    Ok(Ok(status)) => (status, None),
                    Ok(Err(EngineError::Died(why) | EngineError::Start(why))) => {
                        // Killed by the kernel at the session's memory limit: say so.
                        let oom = acct.cgroup.as_ref().is_some_and(|cg| {
                            cg.verdicts().contains(&super::cgroup::Verdict::Memory)
                        });
                        let why = if oom {
                            format!(
                                "memory limit reached ({} MB for the session's processes and files together)",
                                limits.memory_mb
                            )
                        } else {
                            why
                        };
                        (Status::Killed, Some(why))
                    }
                    Err(why) => {
                        engine.stop(shared.grace()).await;
                        (Status::Killed, Some(why))
                    }
                };
                if why.is_some() {
                    shared.metrics.limit_kills.inc();
                }
                send(
                    &sink,
                    Event::Done {
                        session: session.clone(),
                        id,
                        status,
                        message: why.clone(),
                    },
                )
                .await;
                if let Some(why) = why {
                    break why;
                }
                idle_at = tokio::time::Instant::now() + idle;
            }
            Cmd::Save { message } => {
                match save(&acct, &limits, &message, shared.config.max_bundle_bytes()).await {
                    Ok((bundle, changed)) => {
                        let b64 = base64::engine::general_purpose::STANDARD.encode(bundle);
                        send(
                            &sink,
                            Event::Saved {
                                session: session.clone(),
                                bundle: b64,
                                changed,
                            },
                        )
                        .await;
                    }
                    Err(e) => {
                        send(
                            &sink,
                            Event::Error {
                                session: Some(session.clone()),
                                message: format!("save failed: {e}"),
                            },
                        )
                        .await
                    }
                }
                idle_at = tokio::time::Instant::now() + idle;
            }
            Cmd::File(op) => {
                let result = file_op(&acct, &limits, op).await;
                send(
                    &sink,
                    Event::FileResult {
                        session: session.clone(),
                        result,
                    },
                )
                .await;
                idle_at = tokio::time::Instant::now() + idle;
            }
            Cmd::Close { reason } => break reason,
        }
    };
    engine.stop(shared.grace()).await;
    shared.forget(&session);
    remove(&shared, acct, shared.grace(), &session).await;
    tracing::info!(session = %session, reason = %reason, "session closed");
    send(&sink, Event::Closed { session, reason }).await;
}
