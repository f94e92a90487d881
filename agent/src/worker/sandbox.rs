//! Where users' code runs: a unix user per workspace, its processes started with rlimits, in a
//! new session (process group), in an empty network namespace, without supplementary groups, with
//! no_new_privs, as that user. All of it happens in `pre_exec`, in the child, before the uid
//! drop (std's own `Command::uid` would drop first, after which limits could no longer be set
//! and namespaces no longer made).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, setgid, setgroups, setsid, setuid};

use crate::proto::Limits;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// A workspace's unix user.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

fn run(what: &str, argv: &[&str]) -> Result<(), SandboxError> {
    let o = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|source| SandboxError::Io {
            what: what.to_string(),
            source,
        })?;
    if o.status.success() {
        Ok(())
    } else {
        Err(SandboxError::Command {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        })
    }
}

impl Account {
    /// Makes the user `ws<uid>` with home `homes/<session>` (0700, its own).
    pub fn create(uid: u32, homes: &Path, session: &str) -> Result<Account, SandboxError> {
        let name = format!("ws{uid}");
        let home = homes.join(session);
        let (uid_s, home_s) = (uid.to_string(), home.display().to_string());
        run(
            &format!("useradd {name}"),
            &[
                "useradd",
                "--uid",
                &uid_s,
                "--user-group",
                "--home-dir",
                &home_s,
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "sagews workspace",
                &name,
            ],
        )?;
        let user = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .ok_or_else(|| SandboxError::Command {
                what: format!("user {name}"),
                detail: "not found after useradd".into(),
            })?;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| SandboxError::Io { what, source }
        };
        std::fs::create_dir(&home).map_err(io("creating the home directory"))?;
        std::os::unix::fs::chown(&home, Some(uid), Some(user.gid.as_raw()))
            .map_err(io("chown home"))?;
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io("chmod home"))?;
        let acct = Account {
            name,
            uid,
            gid: user.gid.as_raw(),
            home,
        };
        let cache = acct.cache_dir();
        let _ = std::fs::remove_dir_all(&cache); // a leftover of a crash
        std::fs::create_dir(&cache).map_err(io("creating the cache directory"))?;
        std::os::unix::fs::chown(&cache, Some(uid), Some(acct.gid)).map_err(io("chown cache"))?;
        std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io("chmod cache"))?;
        Ok(acct)
    }

    /// The user's cache directory, beside its home (`<home>.cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.home.with_extension("cache")
    }

    /// Kills every process of the user (SIGTERM, then SIGKILL after `grace`), then removes the
    /// user, its group and its home. Returns how many processes needed SIGKILL.
    pub fn destroy(&self, grace: Duration) -> Result<usize, SandboxError> {
        let killed = kill_user(self.uid, grace);
        run(&format!("userdel {}", self.name), &["userdel", &self.name])?;
        for (dir, what) in [
            (self.home.clone(), "removing the home directory"),
            (self.cache_dir(), "removing the cache directory"),
        ] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|source| SandboxError::Io {
                    what: what.into(),
                    source,
                })?;
            }
        }
        Ok(killed)
    }
}

/// Live processes of `uid`.
pub fn pids_of(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let owner = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if owner == Some(uid) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// SIGTERM to every process of `uid`, then SIGKILL to what is left after `grace`, until none is
/// left. Returns how many got SIGKILL.
pub fn kill_user(uid: u32, grace: Duration) -> usize {
    for p in pids_of(uid) {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !pids_of(uid).is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut sigkilled = 0;
    // Processes may fork while we look: repeat until none is left.
    for _ in 0..500 {
        let left = pids_of(uid);
        if left.is_empty() {
            break;
        }
        for p in left {
            if kill(Pid::from_raw(p), Signal::SIGKILL).is_ok() {
                sigkilled += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sigkilled
}

const MB: u64 = 1 << 20;

/// A command that runs as `acct` under `limits`; `fds` are (parent fd, child fd) to pass.
pub fn command(
    acct: &Account,
    limits: &Limits,
    program: &str,
    args: &[&str],
    fds: Vec<(RawFd, RawFd)>,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env_clear()
        .env("HOME", &acct.home)
        .env("USER", &acct.name)
        .env("LOGNAME", &acct.name)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        // Caches (matplotlib's font list, ...) beside the home, not in it: a save commits the
        // home, and a cache is not the person's work.
        .env("XDG_CACHE_HOME", acct.cache_dir())
        .env("MPLCONFIGDIR", acct.cache_dir().join("matplotlib"))
        .current_dir(&acct.home)
        .kill_on_drop(true);
    let (uid, gid) = (Uid::from_raw(acct.uid), Gid::from_raw(acct.gid));
    let l = limits.clone();
    // SAFETY: the closure runs in the forked child before exec; it only makes system calls
    // (dup2, setsid, unshare, setrlimit, setgroups, setgid, setuid, prctl) and allocates nothing.
    unsafe {
        c.pre_exec(move || {
            for (from, to) in &fds {
                if nix::libc::dup2(*from, *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            setsid()?;
            unshare(CloneFlags::CLONE_NEWNET)?;
            // CPU: SIGXCPU at the limit, SIGKILL five seconds of CPU later.
            setrlimit(Resource::RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 5)?;
            setrlimit(Resource::RLIMIT_AS, l.memory_mb * MB, l.memory_mb * MB)?;
            setrlimit(Resource::RLIMIT_NPROC, l.processes, l.processes)?;
            setrlimit(Resource::RLIMIT_NOFILE, l.open_files, l.open_files)?;
            setrlimit(
                Resource::RLIMIT_FSIZE,
                l.file_size_mb * MB,
                l.file_size_mb * MB,
            )?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            setgroups(&[])?;
            setgid(gid)?;
            setuid(uid)?;
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    c
}
