//! The deploy lock: one run at a time per inventory and per host. Locally, `flock(2)` on
//! `deploy.lock` in the state directory; on each host touched, `flock` on `/run/sagectl.lock`
//! held by a process of the run's own SSH connection. Both hold the holder's JSON
//! ([`Holder`]) so a refused run can name who holds it. A holder that dies frees its lock
//! with no clean-up from anyone: the kernel drops a dead process's flock, and a host's
//! holding process ends when sagectl's SSH connection does.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Who holds a lock: written into the lock file by the holder once it has the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The user who ran sagectl (`$SUDO_USER`, else `$USER`).
    pub user: String,
    /// The host name of the machine sagectl runs on.
    pub host: String,
    pub pid: u32,
    /// sagectl's command line.
    pub command: String,
    /// Unix seconds when the lock was taken.
    pub started: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is given.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Who runs sagectl (as the audit record says).
pub fn user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into())
}

impl Holder {
    /// This process, taking a lock now.
    pub fn me() -> Holder {
        let mut args: Vec<String> = std::env::args().collect();
        // The program by its name, not the path it was run from.
        if let Some(name) = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
        {
            args[0] = name;
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Holder {
            user: user(),
            host: hostname(),
            pid: std::process::id(),
            command: crate::quote::join(&args),
            started: now(),
        }
    }

    /// Parses a lock file's content; `None` when empty or not a holder.
    pub fn parse(text: &str) -> Option<Holder> {
        serde_json::from_str(text.trim()).ok()
    }

    /// One line of JSON (never a newline inside).
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("serializable")
    }

    /// `alice on deploy1 (pid 4242, `sagectl up lab.yaml`), started 2026-12-01T20:31:05Z, 42 s ago`.
    pub fn describe(&self) -> String {
        let ago = now().saturating_sub(self.started);
        format!(
            "{} on {} (pid {}, `{}`), started {}, {} ago",
            crate::diag::escape(&self.user),
            crate::diag::escape(&self.host),
            self.pid,
            crate::diag::escape(&self.command),
            crate::logquery::format_ms(self.started as i64 * 1000).replace(".000Z", "Z"),
            human(ago)
        )
    }
}

fn human(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

/// Who holds a lock, as a message: the holder, or what the file held when it is no holder.
fn holder_text(content: &str) -> String {
    match Holder::parse(content) {
        Some(h) => h.describe(),
        None if content.trim().is_empty() => {
            "another run (which has not written its name yet)".into()
        }
        None => format!("another run ({})", crate::diag::escape(content.trim())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another sagectl run holds the deploy lock {path}: {holder}{waited}\n  hint: wait for it to finish, or pass --lock-timeout SECONDS to wait for it"
    )]
    Held {
        path: PathBuf,
        holder: String,
        waited: String,
    },
    #[error("the deploy lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The local deploy lock, held until dropped (or until the process dies: the kernel releases
/// a flock with the last descriptor of its open file, and the descriptor is close-on-exec, so
/// no child of sagectl keeps it).
#[derive(Debug)]
pub struct LocalLock {
    file: File,
    /// What a previous holder that died left in the file, if anything.
    pub taken_over: Option<String>,
}

impl LocalLock {
    /// Takes the lock `deploy.lock` in `dir` (made 0700 when missing) for `me`, trying for
    /// `timeout`; `waiting` is called once, with the holder, when the lock is held.
    pub fn acquire(
        dir: &Path,
        me: &Holder,
        timeout: Duration,
        waiting: impl FnOnce(&str),
    ) -> Result<LocalLock, LockError> {
        let path = dir.join("deploy.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        let started = Instant::now();
        let mut waiting = Some(waiting);
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let content = read_all(&mut file).map_err(io)?;
            if started.elapsed() >= timeout {
                return Err(LockError::Held {
                    path: path.clone(),
                    holder: holder_text(&content),
                    waited: if timeout.is_zero() {
                        String::new()
                    } else {
                        format!(" (waited {} s)", timeout.as_secs())
                    },
                });
            }
            if let Some(w) = waiting.take() {
                w(&holder_text(&content));
            }
            std::thread::sleep(Duration::from_millis(100).min(timeout - started.elapsed()));
        }
        let previous = read_all(&mut file).map_err(io)?;
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(format!("{}\n", me.line()).as_bytes())
            .map_err(io)?;
        Ok(LocalLock {
            file,
            taken_over: (!previous.trim().is_empty()).then(|| holder_text(&previous)),
        })
    }
}

impl Drop for LocalLock {
    fn drop(&mut self) {
        // Emptied while still held, so a file with a holder in it means one that died.
        let _ = self.file.set_len(0);
    }
}

/// The deploy lock of `dir` for this process: taken as [`LocalLock::acquire`] does, or, when
/// this process holds it already (a command running several pipelines, or draining and then
/// converging), the same lock shared. Released when the last holder drops it.
pub fn for_process(
    dir: &Path,
    me: &Holder,
    timeout: Duration,
    waiting: impl FnOnce(&str),
) -> Result<std::sync::Arc<LocalLock>, LockError> {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, Weak};
    static HELD: Mutex<BTreeMap<PathBuf, Weak<LocalLock>>> = Mutex::new(BTreeMap::new());
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = held.get(dir).and_then(Weak::upgrade) {
        return Ok(l);
    }
    let l = Arc::new(LocalLock::acquire(dir, me, timeout, waiting)?);
    held.insert(dir.to_path_buf(), Arc::downgrade(&l));
    Ok(l)
}

fn read_all(f: &mut File) -> std::io::Result<String> {
    f.rewind()?;
    let mut s = String::new();
    f.take(4096).read_to_string(&mut s)?;
    Ok(s)
}

/// Where the lock lives on a host (`/run`: a tmpfs, gone at reboot with every holder).
pub const REMOTE_PATH: &str = "/run/sagectl.lock";

/// The host's lock, run as `sh -c REMOTE_SCRIPT sh PATH TIMEOUT` over the run's own SSH
/// connection, the holder's JSON as its first line of stdin. It prints `prev\t<holder>` when
/// a holder that died left its name, `busy\t<holder>` when the lock is held (then waits up to
/// TIMEOUT seconds, exiting 4 if still held), `locked` once it holds it; then it holds the lock
/// until its stdin ends: when sagectl releases it, or when the SSH connection ends for any
/// reason (sagectl killed included), as sshd then closes the session's pipes.
pub const REMOTE_SCRIPT: &str = r#"
umask 077
exec 9>>"$1" || exit 3
IFS= read -r me || exit 3
if ! flock -n 9; then
  printf 'busy\t%s\n' "$(head -c 2048 "$1" | tr -d '\n')"
  [ "$2" -gt 0 ] && flock -w "$2" 9 || exit 4
fi
prev=$(head -c 2048 "$1" | tr -d '\n')
[ -n "$prev" ] && printf 'prev\t%s\n' "$prev"
printf '%s\n' "$me" > "$1"
echo locked
cat > /dev/null
: > "$1"
"#;

/// What a host's lock script said, up to `locked` or its end.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RemoteReply {
    /// The holder when the lock was held at first.
    pub busy: Option<String>,
    /// What a holder that died left.
    pub previous: Option<String>,
    pub locked: bool,
}

impl RemoteReply {
    /// Parses the lines the script printed so far.
    pub fn parse(text: &str) -> RemoteReply {
        let mut r = RemoteReply::default();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("busy\t") {
                r.busy = Some(holder_text(h));
            } else if let Some(h) = line.strip_prefix("prev\t") {
                r.previous = Some(holder_text(h));
            } else if line == "locked" {
                r.locked = true;
            }
        }
        r
    }

    /// The host's error when the lock was not taken.
    pub fn refusal(&self, host: &str, timeout: Duration) -> String {
        let waited = if timeout.is_zero() {
            String::new()
        } else {
            format!(" (waited {} s)", timeout.as_secs())
        };
        match &self.busy {
            Some(h) => format!(
                "another sagectl run holds the lock {REMOTE_PATH} on {host}: {h}{waited}\n  hint: wait for it to finish, or pass --lock-timeout SECONDS to wait for it"
            ),
            None => format!("could not take the lock {REMOTE_PATH} on {host}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: u32) -> Holder {
        Holder {
            user: "alice".into(),
            host: "deploy1".into(),
            pid,
            command: "sagectl up lab.yaml".into(),
            started: now() - 42,
        }
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_first_then_gets_it_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalLock::acquire(dir.path(), &holder(1), Duration::ZERO, |_| {}).unwrap();
        assert_eq!(first.taken_over, None);
        let e = LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds the deploy lock")
                && e.contains("alice on deploy1 (pid 1, `sagectl up lab.yaml`), started ")
                && e.contains("42 s ago")
                && e.contains("--lock-timeout"),
            "{e}"
        );
        drop(first);
        let second = LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {}).unwrap();
        assert_eq!(second.taken_over, None, "a released lock is empty");
    }

    #[test]
    fn a_waiting_holder_gets_the_lock_when_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalLock::acquire(dir.path(), &holder(1), Duration::ZERO, |_| {}).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let mut told = String::new();
        let t = Instant::now();
        LocalLock::acquire(dir.path(), &holder(2), Duration::from_secs(10), |h| {
            told = h.to_string()
        })
        .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250));
        assert!(told.contains("pid 1"), "{told}");
        release.join().unwrap();
        // And gives up after its timeout.
        let _held = LocalLock::acquire(dir.path(), &holder(3), Duration::ZERO, |_| {}).unwrap();
        let e = LocalLock::acquire(dir.path(), &holder(4), Duration::from_secs(1), |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("pid 3") && e.contains("(waited 1 s)"), "{e}");
    }

    /// A holder in another process, SIGKILLed: the kernel drops its flock, the next run
    /// takes the lock at once and says whose it was.
    #[test]
    fn a_killed_holders_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deploy.lock");
        // Another process holds the lock (a shell that takes it, then becomes `sleep` keeping
        // the descriptor), as a killed sagectl would have.
        std::fs::write(&path, format!("{}\n", holder(77).line())).unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exec 9>>\"$0\" && flock 9 && exec sleep 60"])
            .arg(&path)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            match LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {}) {
                Err(e) => break e.to_string(),
                Ok(l) => {
                    drop(l);
                    // The child has not taken it yet: put the name back and try again.
                    std::fs::write(&path, format!("{}\n", holder(77).line())).unwrap();
                    assert!(Instant::now() < deadline, "the child never took the lock");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        assert!(e.contains("pid 77"), "{e}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let l = LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {}).unwrap();
        let prev = l.taken_over.clone().unwrap();
        assert!(prev.contains("alice on deploy1 (pid 77"), "{prev}");
        let content = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Holder::parse(&content).unwrap().pid, 2);
    }

    #[test]
    fn a_process_shares_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let a = for_process(dir.path(), &holder(1), Duration::ZERO, |_| {}).unwrap();
        let b = for_process(dir.path(), &holder(1), Duration::ZERO, |_| {}).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        drop(a);
        assert!(LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {}).is_err());
        drop(b);
        LocalLock::acquire(dir.path(), &holder(2), Duration::ZERO, |_| {}).unwrap();
    }

    #[test]
    fn replies_of_the_host_script() {
        let h = holder(9).line();
        let r = RemoteReply::parse(&format!("busy\t{h}\n"));
        assert!(!r.locked);
        let e = r.refusal("alpha", Duration::ZERO);
        assert!(
            e.starts_with("another sagectl run holds the lock /run/sagectl.lock on alpha: alice on deploy1 (pid 9, `sagectl up lab.yaml`)"),
            "{e}"
        );
        let r = RemoteReply::parse(&format!("prev\t{h}\nlocked\n"));
        assert!(r.locked && r.previous.unwrap().contains("pid 9"));
        let r = RemoteReply::parse("busy\t\x1b[31mnot json\n");
        assert_eq!(r.busy.unwrap(), "another run (\\u{1b}[31mnot json)");
        assert_eq!(
            RemoteReply::parse("busy\t\n").refusal("b", Duration::from_secs(5)),
            "another sagectl run holds the lock /run/sagectl.lock on b: another run (which has not written its name yet) (waited 5 s)\n  hint: wait for it to finish, or pass --lock-timeout SECONDS to wait for it"
        );
    }
}
