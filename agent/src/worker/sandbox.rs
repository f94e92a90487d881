//! Where users' code runs: a unix user per workspace, its processes started with rlimits, in a
//! new session (process group), in new network (empty), mount, IPC and UTS namespaces (a private
//! /tmp, /var/tmp, /dev/shm and /run, a /proc showing only its own processes: see
//! `session_mounts`), without supplementary groups, with no_new_privs, as that user. All of it happens in `pre_exec`, in the child, before the uid
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

/// A mount made in a session's own mount namespace: everything as C strings made before the
/// fork (the child of a threaded process must not allocate).
struct Mount {
    source: std::ffi::CString,
    target: std::ffi::CString,
    fstype: std::ffi::CString,
    flags: nix::libc::c_ulong,
    data: std::ffi::CString,
}

impl Mount {
    fn new(
        source: &str,
        target: &str,
        fstype: &str,
        flags: nix::libc::c_ulong,
        data: &str,
    ) -> Mount {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in mount arguments");
        Mount {
            source: c(source),
            target: c(target),
            fstype: c(fstype),
            flags,
            data: c(data),
        }
    }

    /// In the child, before exec.
    fn apply(&self) -> std::io::Result<()> {
        // SAFETY: every pointer is a valid NUL-terminated string owned by `self`.
        let r = unsafe {
            nix::libc::mount(
                self.source.as_ptr(),
                self.target.as_ptr(),
                self.fstype.as_ptr(),
                self.flags,
                self.data.as_ptr().cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// What a session sees of the machine's file systems, in a mount namespace of its own: its own
/// `/tmp`, `/var/tmp` and `/dev/shm` (size-limited tmpfs that vanish with its last process, so
/// nothing passes to the next user of the uid and nothing planted by another tenant is found
/// there), an empty `/run` (no journal, syslog, D-Bus or systemd socket), and a `/proc` that
/// shows only its own user's processes (`hidepid=2`: another tenant's command lines are
/// invisible).
fn session_mounts(limits: &Limits) -> Vec<Mount> {
    use nix::libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID};
    let tmp = format!("size={}m,mode=1777", (limits.memory_mb / 4).max(16));
    let shm = format!("size={}m,mode=1777", (limits.memory_mb / 8).max(8));
    vec![
        Mount::new("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, &tmp),
        Mount::new("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, &tmp),
        Mount::new("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, &shm),
        Mount::new(
            "tmpfs",
            "/run",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=64k,mode=755",
        ),
        Mount::new(
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "hidepid=2",
        ),
    ]
}

/// After the fork into a new PID namespace, in the process that stays outside it (`pid` is the
/// namespace's init): closes every descriptor (so the worker's `spawn` sees the exec of the
/// engine, and its pipes end with it), ignores SIGINT (meant for the engine), waits for the init
/// and ends as it did: `128 + n` from the init is death by signal `n`, raised again here so the
/// worker reads the engine's real cause (SIGXCPU, SIGKILL...). In the init (`pid == 0`),
/// returns. Only system calls: this runs between fork and exec.
unsafe fn stand_in_until_exit(pid: nix::libc::pid_t) -> std::io::Result<()> {
    use nix::libc;
    if !is_parent(pid)? {
        return Ok(());
    }
    // SAFETY: plain system calls on this process's own state; nothing is allocated.
    unsafe {
        become_a_waiter();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        let code = wait_for(pid);
        // Re-raise only signals that end a process (never one that stops it, or is ignored).
        let ending = [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGILL,
            libc::SIGABRT,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGKILL,
            libc::SIGSEGV,
            libc::SIGPIPE,
            libc::SIGALRM,
            libc::SIGTERM,
            libc::SIGXCPU,
            libc::SIGXFSZ,
        ];
        if code > 128 && ending.contains(&(code - 128)) {
            let sig = code - 128;
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
        }
        libc::_exit(code)
    }
}

/// In the PID namespace's init (`pid` is the engine, forked from it): the same as the stand-in
/// outside, but an init cannot die of a signal it does not handle, so it reports the engine's
/// signal `n` as exit status `128 + n`. It reaps whatever is orphaned into it meanwhile, and
/// when it ends, the kernel ends every process left in the session. Why an init of our own
/// rather than the engine as PID 1: the kernel ignores signals without a handler sent to a
/// namespace's init (SIGTERM, SIGXCPU at the CPU limit), which would change how a session ends.
/// In the engine (`pid == 0`), returns.
unsafe fn pid_namespace_init(pid: nix::libc::pid_t) -> std::io::Result<()> {
    use nix::libc;
    if !is_parent(pid)? {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe {
        become_a_waiter();
        libc::_exit(wait_for(pid))
    }
}

/// After a fork: true in the parent, false in the child.
fn is_parent(pid: nix::libc::pid_t) -> std::io::Result<bool> {
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pid != 0)
}

/// What the stand-in and the init do first: hold no descriptor (so the worker's `spawn` sees the
/// engine's exec, and the engine's pipes end with it) and never dump core (they are forks of the
/// worker, whose memory holds its key).
unsafe fn become_a_waiter() {
    use nix::libc;
    // SAFETY: system calls on this process's own descriptors and flags.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..65536 {
                libc::close(fd);
            }
        }
    }
}

/// Waits for `pid` (reaping any other child meanwhile); its exit code, or `128 + signal`.
unsafe fn wait_for(pid: nix::libc::pid_t) -> i32 {
    use nix::libc;
    loop {
        let mut status = 0;
        // SAFETY: waits on this process's own children.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if got < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 127;
        }
    }
}

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
    assert!(
        fds.len() <= 8,
        "at most 8 descriptors are passed to a session's process"
    );
    let (uid, gid) = (Uid::from_raw(acct.uid), Gid::from_raw(acct.gid));
    let l = limits.clone();
    let mounts = session_mounts(limits);
    let root = std::ffi::CString::new("/").expect("static");
    let none = std::ffi::CString::new("none").expect("static");
    // SAFETY: the closure runs in the forked child before exec; it only makes system calls
    // (dup2, setsid, unshare, fork, waitpid, mount, sethostname, setrlimit, setgroups, setgid,
    // setuid, prctl) on data prepared before the fork, and allocates nothing.
    unsafe {
        c.pre_exec(move || {
            // Each source moved above the targets first, so no dup2 overwrites another's source.
            let mut moved = [-1; 8];
            for (i, (from, _)) in fds.iter().enumerate().take(8) {
                moved[i] = nix::libc::fcntl(*from, nix::libc::F_DUPFD_CLOEXEC, 16);
                if moved[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, (_, to)) in fds.iter().enumerate().take(8) {
                if nix::libc::dup2(moved[i], *to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            setsid()?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            unshare(
                CloneFlags::CLONE_NEWNET
                    | CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWPID,
            )?;
            // The new PID namespace takes our children: the first is its init (PID 1), which
            // mounts the session's /proc and forks the engine. This process stays outside to
            // stand for the session toward the worker (its pid, its exit status), doing nothing
            // else. See `pid_namespace_init` for why two of them.
            stand_in_until_exit(nix::libc::fork())?;
            // PID 1 of the session.
            // Nothing mounted here propagates back to the machine.
            if nix::libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                nix::libc::MS_REC | nix::libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for m in &mounts {
                m.apply()?;
            }
            if nix::libc::sethostname(c"sagews".as_ptr(), 6) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            pid_namespace_init(nix::libc::fork())?;
            // The engine (PID 2): limits, then the user.
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
            setgroups(&[])?;
            setgid(gid)?;
            setuid(uid)?;
            nix::sys::prctl::set_no_new_privs()?;
            Ok(())
        });
    }
    c
}
