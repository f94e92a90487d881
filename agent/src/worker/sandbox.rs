//! Where users' code runs: a uid per workspace, its processes in the session's cgroup (see
//! `cgroup`), started with rlimits, in a new session (process group), in new network (empty),
//! mount, IPC, UTS and PID namespaces (a read-only view of the machine but for its home, its own
//! /tmp, /var/tmp, /dev/shm and /run, a /proc showing only its own processes: see
//! `session_view`), without supplementary groups, with no_new_privs and a seccomp filter (see
//! `seccomp`), as that user. All of it happens in `pre_exec`, in the child, before the uid drop
//! (std's own `Command::uid` would drop first, after which limits could no longer be set and
//! namespaces no longer made).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, setgid, setgroups, setsid, setuid};

use super::{cgroup, seccomp};
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

/// A workspace's unix user: a uid (and gid) of the worker's range, its home and its cgroup.
/// No passwd entry is made (the worker's unit keeps /etc read-only): the session is given
/// `HOME`, `USER` and `LOGNAME`, and git its identity, in the environment.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Every process of the session joins it (absent in rlimits-only mode).
    pub cgroup: Option<Arc<cgroup::Session>>,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.to_string();
    move |source| SandboxError::Io { what, source }
}

/// A uid of the range that the machine's user database gives to someone else is never used.
pub fn check_uid_is_ours(uid: u32) -> Result<(), SandboxError> {
    match nix::unistd::User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) if u.name != format!("ws{uid}") => Err(SandboxError::Command {
            what: format!("uid {uid}"),
            detail: format!(
                "it belongs to the user `{}` of this machine; give the worker a uid range no account uses (worker.uid_min, worker.uid_max)",
                u.name
            ),
        }),
        _ => Ok(()),
    }
}

impl Account {
    /// Prepares uid `uid` for a session: home `homes/<session>` and a cache directory beside it
    /// (0700, its own), and a cgroup with `limits`.
    pub fn create(
        uid: u32,
        homes: &Path,
        session: &str,
        cgroups: &cgroup::Cgroups,
        limits: &Limits,
    ) -> Result<Account, SandboxError> {
        check_uid_is_ours(uid)?;
        let name = format!("ws{uid}");
        let home = homes.join(session);
        let cgroup = cgroups
            .create(&name, limits)
            .map_err(|e| SandboxError::Command {
                what: "the session's cgroup".into(),
                detail: format!("{e:#}"),
            })?
            .map(Arc::new);
        let acct = Account {
            name,
            uid,
            gid: uid,
            home,
            cgroup,
        };
        let made = (|| {
            for dir in [acct.home.clone(), acct.cache_dir()] {
                let _ = std::fs::remove_dir_all(&dir); // a leftover of a crash
                std::fs::create_dir(&dir).map_err(io("creating the home directory"))?;
                std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).map_err(io("chown home"))?;
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(io("chmod home"))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = acct.destroy(Duration::ZERO);
            return Err(e);
        }
        Ok(acct)
    }

    /// The user's cache directory, beside its home (`<home>.cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.home.with_extension("cache")
    }

    /// Ends every process of the session (SIGTERM, then SIGKILL to the whole cgroup after
    /// `grace`), removes its cgroup, home and cache, and checks that nothing of it is left: an
    /// error means the uid must not be given to another session. Returns how many processes
    /// needed SIGKILL.
    pub fn destroy(&self, grace: Duration) -> Result<usize, SandboxError> {
        let killed = kill_user(self.uid, grace);
        if let Some(cg) = &self.cgroup {
            cg.remove(grace).map_err(|e| SandboxError::Command {
                what: "removing the session's cgroup".into(),
                detail: format!("{e:#}"),
            })?;
        }
        for (dir, what) in [
            (self.home.clone(), "removing the home directory"),
            (self.cache_dir(), "removing the cache directory"),
        ] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(what))?;
            }
        }
        let left = pids_of(self.uid);
        if !left.is_empty() {
            return Err(SandboxError::Command {
                what: format!("uid {}", self.uid),
                detail: format!("{} processes are left: {left:?}", left.len()),
            });
        }
        Ok(killed)
    }
}

/// Every live process of the machine (zombies left out): (pid, real uid).
fn processes() -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The status file, not the directory's owner: a process that is not dumpable shows a
        // directory owned by root.
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
        if let (Some(uid), false) = (owner, zombie) {
            out.push((pid, uid));
        }
    }
    out
}

/// Live processes of `uid`.
pub fn pids_of(uid: u32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, u)| *u == uid)
        .map(|(p, _)| p)
        .collect()
}

/// The uids of `range` that have a live process.
pub fn uids_running(range: std::ops::RangeInclusive<u32>) -> std::collections::BTreeSet<u32> {
    processes()
        .into_iter()
        .map(|(_, u)| u)
        .filter(|u| range.contains(u))
        .collect()
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

fn cstring(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).expect("no NUL in mount arguments")
}

/// A step of a session's view of the file systems, made in its own mount namespace: everything
/// as C strings made before the fork (the child of a threaded process must not allocate).
enum Step {
    /// Every mount read-only (`mount_setattr`, recursively from `/`).
    ReadOnly,
    /// `path` bound onto itself, writable (the home and cache in the read-only view).
    Writable(std::ffi::CString),
    /// A new mount.
    Mount {
        source: std::ffi::CString,
        target: std::ffi::CString,
        fstype: std::ffi::CString,
        flags: nix::libc::c_ulong,
        data: std::ffi::CString,
    },
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: nix::libc::c_int = 0x8000;

fn check(r: nix::libc::c_long) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Step {
    fn mount(
        source: &str,
        target: &str,
        fstype: &str,
        flags: nix::libc::c_ulong,
        data: &str,
    ) -> Step {
        Step::Mount {
            source: cstring(source),
            target: cstring(target),
            fstype: cstring(fstype),
            flags,
            data: cstring(data),
        }
    }

    /// For the engine server, which takes the same steps in its forked children.
    fn describe(&self) -> serde_json::Value {
        let text = |c: &std::ffi::CString| c.to_string_lossy().into_owned();
        match self {
            Step::ReadOnly => serde_json::json!({"op": "read_only"}),
            Step::Writable(p) => serde_json::json!({"op": "writable", "path": text(p)}),
            Step::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => serde_json::json!({
                "op": "mount", "source": text(source), "target": text(target),
                "fstype": text(fstype), "flags": flags, "data": text(data),
            }),
        }
    }

    /// In the child, before exec.
    fn apply(&self) -> std::io::Result<()> {
        use nix::libc::{self, MS_BIND, MS_NODEV, MS_NOSUID, MS_REMOUNT};
        // SAFETY: every pointer is a valid NUL-terminated string owned by `self`, or null where
        // the call allows it; `attr` lives through the call.
        unsafe {
            match self {
                Step::ReadOnly => {
                    let attr = MountAttr {
                        attr_set: MOUNT_ATTR_RDONLY,
                        attr_clr: 0,
                        propagation: 0,
                        userns_fd: 0,
                    };
                    check(libc::syscall(
                        libc::SYS_mount_setattr,
                        libc::AT_FDCWD,
                        c"/".as_ptr(),
                        AT_RECURSIVE,
                        &attr as *const MountAttr,
                        std::mem::size_of::<MountAttr>(),
                    ))
                }
                Step::Writable(path) => {
                    check(libc::mount(
                        path.as_ptr(),
                        path.as_ptr(),
                        std::ptr::null(),
                        MS_BIND,
                        std::ptr::null(),
                    ) as libc::c_long)?;
                    // A bind keeps the read-only flag it was made from; remounting without it
                    // makes this one writable.
                    check(libc::mount(
                        std::ptr::null(),
                        path.as_ptr(),
                        std::ptr::null(),
                        MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV,
                        std::ptr::null(),
                    ) as libc::c_long)
                }
                Step::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    *flags,
                    data.as_ptr().cast(),
                ) as libc::c_long),
            }
        }
    }
}

/// What a session sees of the machine's file systems, in a mount namespace of its own: all of
/// it read-only but its home and cache; its own `/tmp`, `/var/tmp` and `/dev/shm` (size-limited
/// tmpfs that vanish with its last process, so nothing passes to the next user of the uid and
/// nothing planted by another tenant is found there; their pages are charged to its cgroup); an
/// empty `/run` (no journal, syslog, D-Bus or systemd socket); a `/proc` that shows only its own
/// user's processes (`hidepid=2`: another tenant's command lines are invisible); no cgroup tree.
fn session_view(acct: &Account, limits: &Limits) -> Vec<Step> {
    use nix::libc::{MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY};
    let tmp = format!("size={}m,mode=1777", (limits.memory_mb / 2).max(16));
    let shm = format!("size={}m,mode=1777", (limits.memory_mb / 4).max(8));
    let mut steps = vec![
        Step::ReadOnly,
        Step::Writable(cstring(&acct.home.display().to_string())),
        Step::Writable(cstring(&acct.cache_dir().display().to_string())),
        Step::mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, &tmp),
        Step::mount("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, &tmp),
        Step::mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, &shm),
        Step::mount(
            "tmpfs",
            "/run",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=64k,mode=755",
        ),
        Step::mount(
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "hidepid=2",
        ),
    ];
    if Path::new("/sys/fs/cgroup").is_dir() {
        steps.push(Step::mount(
            "tmpfs",
            "/sys/fs/cgroup",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY,
            "size=4k,mode=755",
        ));
    }
    steps
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

/// The environment of every process of a session.
pub fn session_env(acct: &Account) -> Vec<(String, String)> {
    let cache = acct.cache_dir();
    [
        ("HOME", acct.home.display().to_string()),
        ("USER", acct.name.clone()),
        ("LOGNAME", acct.name.clone()),
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG", "C.UTF-8".into()),
        ("PYTHONUNBUFFERED", "1".into()),
        // Caches (matplotlib's font list, ...) beside the home, not in it: a save commits the
        // home, and a cache is not the person's work.
        ("XDG_CACHE_HOME", cache.display().to_string()),
        (
            "MPLCONFIGDIR",
            cache.join("matplotlib").display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The rlimits of a session's engine: CPU (SIGXCPU at the limit, SIGKILL five seconds of CPU
/// later), processes of its uid, open files, file size; the address space only when there is no
/// cgroup to count memory (it counts every mapping, shared ones too).
fn rlimits(l: &Limits, cgroup: bool) -> Vec<(Resource, u64, u64)> {
    let mut out = vec![
        (Resource::RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 5),
        (Resource::RLIMIT_NPROC, l.processes, l.processes),
        (Resource::RLIMIT_NOFILE, l.open_files, l.open_files),
        (
            Resource::RLIMIT_FSIZE,
            l.file_size_mb * MB,
            l.file_size_mb * MB,
        ),
    ];
    if !cgroup {
        out.push((Resource::RLIMIT_AS, l.memory_mb * MB, l.memory_mb * MB));
    }
    out
}

/// What the engine server (`zygote.py`) needs to put a forked process in the same sandbox as
/// `command` puts a fresh one: the same view, limits, uid, filter and environment, made by the
/// same functions; it executes the steps, the policy stays here.
pub fn zygote_spec(acct: &Account, limits: &Limits) -> serde_json::Value {
    use base64::Engine as _;
    let view: Vec<serde_json::Value> = session_view(acct, limits)
        .iter()
        .map(Step::describe)
        .collect();
    let rlimits: Vec<(i32, u64, u64)> = rlimits(limits, acct.cgroup.is_some())
        .into_iter()
        .map(|(r, soft, hard)| (r as i32, soft, hard))
        .collect();
    // The filters as bytes for the server (`struct sock_filter` in native order), made once.
    static SECCOMP: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let seccomp = SECCOMP.get_or_init(|| {
        seccomp::filters()
            .iter()
            .map(|prog| {
                let bytes: Vec<u8> = prog
                    .iter()
                    .flat_map(|f| {
                        let mut b = Vec::with_capacity(8);
                        b.extend_from_slice(&f.code.to_ne_bytes());
                        b.push(f.jt);
                        b.push(f.jf);
                        b.extend_from_slice(&f.k.to_ne_bytes());
                        b
                    })
                    .collect();
                base64::engine::general_purpose::STANDARD.encode(bytes)
            })
            .collect()
    });
    serde_json::json!({
        "uid": acct.uid,
        "gid": acct.gid,
        "home": acct.home,
        "view": view,
        "rlimits": rlimits,
        "seccomp": seccomp,
        "env": session_env(acct).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
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
        .envs(session_env(acct))
        .current_dir(&acct.home)
        .kill_on_drop(true);
    assert!(
        fds.len() <= 8,
        "at most 8 descriptors are passed to a session's process"
    );
    let (uid, gid) = (Uid::from_raw(acct.uid), Gid::from_raw(acct.gid));
    let rlimits = rlimits(limits, acct.cgroup.is_some());
    let view = session_view(acct, limits);
    let home = cstring(&acct.home.display().to_string());
    let root = std::ffi::CString::new("/").expect("static");
    let none = std::ffi::CString::new("none").expect("static");
    // The session's cgroup, in every hierarchy: the child joins it before anything else. Without
    // one (rlimits only), the address-space limit stands in for the cgroup's memory limit.
    let join: Vec<std::os::fd::OwnedFd> = match &acct.cgroup {
        Some(cg) => cg.join_fds().unwrap_or_default(),
        None => Vec::new(),
    };
    let joins_needed = acct.cgroup.is_some();
    // Compiled before the fork (once per worker): the child must not allocate.
    let filters = seccomp::filters();
    // SAFETY: the closure runs in the forked child before exec; it only makes system calls
    // (write, dup2, setsid, unshare, fork, waitpid, mount, mount_setattr, sethostname,
    // setrlimit, setgroups, setgid, setuid, prctl, seccomp) on data prepared before the fork,
    // and allocates nothing.
    unsafe {
        c.pre_exec(move || {
            if joins_needed && join.is_empty() {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ENOENT));
            }
            for fd in &join {
                if nix::libc::write(fd.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
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
            for step in &view {
                step.apply()?;
            }
            // The working directory was entered before the home was bound writable on top of
            // itself: enter it again, through the new mount.
            if nix::libc::chdir(home.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::sethostname(c"sagews".as_ptr(), 6) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            pid_namespace_init(nix::libc::fork())?;
            // The engine (PID 2): limits, then the user.
            for (resource, soft, hard) in &rlimits {
                setrlimit(*resource, *soft, *hard)?;
            }
            setgroups(&[])?;
            setgid(gid)?;
            setuid(uid)?;
            nix::sys::prctl::set_no_new_privs()?;
            seccomp::apply(filters)?;
            Ok(())
        });
    }
    c
}
