//! A cgroup per session: memory (tmpfs pages included: the kernel charges them to the cgroup
//! that wrote them), process count and CPU counted for all of a session's processes together,
//! and a kill that reaches every one of them.
//!
//! Two layouts, found at start from `/proc/self/cgroup` and `/proc/self/mountinfo`:
//! - **cgroup v2** (a systemd machine: the unit has `Delegate=yes`): the worker moves itself into
//!   `<its cgroup>/worker` (v2 lets only leaves hold processes), enables `memory pids cpu` for
//!   the children of its cgroup, and makes `<its cgroup>/sagews/<session>`.
//! - **cgroup v1** (controllers on v1 hierarchies, as on a hybrid host and in the lab machines
//!   made on one): `<hierarchy>/<its cgroup>/sagews/<session>` in the memory, pids, cpu and
//!   cpuacct hierarchies.
//!
//! The hierarchies are used where they are mounted; where that is read-only (the lab machines'
//! nspawn mounts, a unit's `ProtectControlGroups`), `private_mounts` (called by `sage-agent
//! worker` before it starts a thread) mounts them afresh in a mount namespace of the worker's
//! own. Without the controllers, the worker refuses to start unless the configuration allows
//! per-process rlimits only (`require_cgroups: false`); its metrics say which (`mode`).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::Limits;

const MB: u64 = 1 << 20;
/// CPU bandwidth is given per this period (µs).
const PERIOD_US: u64 = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    V2,
    V1,
    /// Per-process rlimits only (allowed by the configuration).
    Off,
}

impl Mode {
    /// As the worker's metrics say it.
    pub fn label(self) -> &'static str {
        match self {
            Mode::V2 => "cgroup2",
            Mode::V1 => "cgroup1",
            Mode::Off => "rlimits",
        }
    }
}

/// Where this worker's session cgroups are made.
#[derive(Clone, Debug)]
pub struct Cgroups {
    mode: Mode,
    /// The `sagews` parent directory in each hierarchy used (one for v2).
    parents: Vec<PathBuf>,
}

/// One line of `/proc/self/cgroup`: hierarchy id, controllers, path.
fn own_cgroups(text: &str) -> Vec<(u32, Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.parse().ok()?;
            let ctrl = it.next()?;
            let path = it.next()?.to_string();
            let ctrl = ctrl
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((id, ctrl, path))
        })
        .collect()
}

/// A cgroup mount from `/proc/self/mountinfo`: (root within the hierarchy, mount point,
/// fstype, super options).
fn cgroup_mounts(text: &str) -> Vec<(String, PathBuf, String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let p: Vec<&str> = post.split(' ').collect();
            let fstype = *p.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let unescape = |s: &str| s.replace("\\040", " ");
            Some((
                unescape(f.get(3)?),
                PathBuf::from(unescape(f.get(4)?)),
                fstype.to_string(),
                p.get(2)?.split(',').map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The directory of cgroup `path` under a mount of root `root` at `at`.
fn under_mount(root: &str, at: &Path, path: &str) -> Option<PathBuf> {
    let rel = if root == "/" {
        path
    } else {
        path.strip_prefix(root)?
    };
    Some(at.join(rel.trim_start_matches('/')))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> anyhow::Error {
    let what = what.into();
    move |e| anyhow::anyhow!("{what}: {e}")
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `key value` lines (memory.events, pids.events, cpu.stat, memory.oom_control): the value of
/// `key`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// In `sage-agent worker`, before any thread exists: when the machine's cgroup hierarchies are
/// mounted read-only, gives this process a mount namespace of its own in which they are mounted
/// again, writable, at the usual places (sessions later get their own, without them). Does
/// nothing when they are writable or absent.
pub fn private_mounts() -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    let mounts = cgroup_mounts(&read(Path::new("/proc/self/mountinfo")));
    let own = own_cgroups(&read(Path::new("/proc/self/cgroup")));
    let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok();
    let wanted: Vec<&(u32, Vec<String>, String)> = own
        .iter()
        .filter(|(id, c, _)| *id == 0 || c.iter().any(|c| V1_CONTROLLERS.contains(&c.as_str())))
        .collect();
    let blocked = mounts.iter().any(|(_, at, _, _)| !writable(at));
    if wanted.is_empty() || !blocked {
        return Ok(());
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| anyhow::anyhow!("a mount namespace for the worker's cgroups: {e}"))?;
    // Mounts from the machine still reach us; ours never reach it.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("making the worker's mounts its own: {e}"))?;
    let base = Path::new("/sys/fs/cgroup");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        flags,
        Some("size=64k,mode=755"),
    )
    .map_err(|e| anyhow::anyhow!("mounting a tmpfs on {}: {e}", base.display()))?;
    for (id, ctrl, _) in wanted {
        let (dir, fstype, opts) = if *id == 0 {
            ("unified".to_string(), "cgroup2", String::new())
        } else {
            (ctrl.join(","), "cgroup", ctrl.join(","))
        };
        let at = base.join(&dir);
        std::fs::create_dir_all(&at).map_err(io(format!("creating {}", at.display())))?;
        mount(
            Some("cgroup"),
            &at,
            Some(fstype),
            flags,
            Some(opts.as_str()),
        )
        .map_err(|e| anyhow::anyhow!("mounting the {dir} cgroup hierarchy: {e}"))?;
    }
    Ok(())
}

impl Cgroups {
    /// Finds the hierarchies and prepares the `sagews` parents; `Off` when the controllers are
    /// missing and `required` is false.
    /// Leftovers (`ws<uid>`) of `uids` are removed.
    pub fn discover(
        required: bool,
        uids: std::ops::RangeInclusive<u32>,
    ) -> anyhow::Result<Cgroups> {
        let mounts = cgroup_mounts(&read(Path::new("/proc/self/mountinfo")));
        let own = own_cgroups(&read(Path::new("/proc/self/cgroup")));
        let found = Self::v2(&mounts, &own).and_then(|v2| match v2 {
            Some(c) => Ok(Some(c)),
            None => Self::v1(&mounts, &own),
        });
        match found {
            Ok(Some(c)) => {
                c.remove_leftovers(&uids);
                Ok(c)
            }
            Ok(None) | Err(_) if !required => {
                if let Err(e) = &found {
                    tracing::warn!("session cgroups unavailable: {e:#}");
                }
                tracing::warn!(
                    "no cgroup controllers for sessions: each process gets rlimits only (require_cgroups is false)"
                );
                Ok(Cgroups {
                    mode: Mode::Off,
                    parents: Vec::new(),
                })
            }
            Ok(None) => anyhow::bail!(
                "sessions need the memory, pids and cpu cgroup controllers (cgroup v2 delegated to the worker's unit, or v1 hierarchies), and this machine gives neither; set worker.require_cgroups: false in the inventory to run sessions with per-process rlimits only"
            ),
            Err(e) => Err(e.context("preparing the sessions' cgroups")),
        }
    }

    /// cgroup v2 with the controllers delegated to our cgroup.
    fn v2(
        mounts: &[(String, PathBuf, String, Vec<String>)],
        own: &[(u32, Vec<String>, String)],
    ) -> anyhow::Result<Option<Cgroups>> {
        let Some((_, _, path)) = own.iter().find(|(id, _, _)| *id == 0) else {
            return Ok(None);
        };
        let Some(dir) = mounts
            .iter()
            .filter(|(_, _, t, _)| t == "cgroup2")
            .find_map(|(root, at, _, _)| under_mount(root, at, path))
        else {
            return Ok(None);
        };
        let available = read(&dir.join("cgroup.controllers"));
        if !V2_CONTROLLERS
            .iter()
            .all(|c| available.split_whitespace().any(|a| a == *c))
        {
            return Ok(None);
        }
        // Only leaves hold processes: the worker moves to `worker`, sessions go to `sagews`.
        let (base, leaf) = if dir.ends_with("worker") {
            (
                dir.parent().map(Path::to_path_buf).unwrap_or(dir.clone()),
                dir.clone(),
            )
        } else {
            (dir.clone(), dir.join("worker"))
        };
        if leaf != dir {
            std::fs::create_dir_all(&leaf).map_err(io(format!("creating {}", leaf.display())))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(io("moving the worker into its leaf cgroup"))?;
        }
        let enable = V2_CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        write(&base.join("cgroup.subtree_control"), &enable)
            .map_err(io(format!("enabling {enable} in {}", base.display())))?;
        let parent = base.join("sagews");
        std::fs::create_dir_all(&parent).map_err(io(format!("creating {}", parent.display())))?;
        write(&parent.join("cgroup.subtree_control"), &enable)
            .map_err(io(format!("enabling {enable} in {}", parent.display())))?;
        Ok(Some(Cgroups {
            mode: Mode::V2,
            parents: vec![parent],
        }))
    }

    /// cgroup v1 hierarchies for memory, pids, cpu and cpuacct.
    fn v1(
        mounts: &[(String, PathBuf, String, Vec<String>)],
        own: &[(u32, Vec<String>, String)],
    ) -> anyhow::Result<Option<Cgroups>> {
        let mut parents: Vec<PathBuf> = Vec::new();
        for want in V1_CONTROLLERS {
            let Some((_, _, path)) = own
                .iter()
                .find(|(id, c, _)| *id != 0 && c.iter().any(|c| c == want))
            else {
                return Ok(None);
            };
            let Some(dir) = mounts
                .iter()
                .filter(|(_, _, t, o)| t == "cgroup" && o.iter().any(|o| o == want))
                .find_map(|(root, at, _, _)| under_mount(root, at, path))
            else {
                return Ok(None);
            };
            let parent = dir.join("sagews");
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
        for p in &parents {
            std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))?;
        }
        Ok(Some(Cgroups {
            mode: Mode::V1,
            parents,
        }))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A session's cgroup with `limits` set; `None` in rlimits-only mode.
    pub fn create(&self, name: &str, limits: &Limits) -> anyhow::Result<Option<Session>> {
        if self.mode == Mode::Off {
            return Ok(None);
        }
        let s = Session {
            mode: self.mode,
            dirs: self.parents.iter().map(|p| p.join(name)).collect(),
        };
        // A leftover of a crash under the same name goes first.
        s.remove(Duration::from_millis(200))?;
        for d in &s.dirs {
            std::fs::create_dir(d).map_err(io(format!("creating {}", d.display())))?;
        }
        if let Err(e) = s.set_limits(limits) {
            let _ = s.remove(Duration::ZERO);
            return Err(e);
        }
        Ok(Some(s))
    }

    /// Kills and removes the session cgroups of `uids` that a previous run of the worker left
    /// (other workers may share the parent, with other uids).
    fn remove_leftovers(&self, uids: &std::ops::RangeInclusive<u32>) {
        for p in &self.parents {
            let Ok(entries) = std::fs::read_dir(p) else {
                continue;
            };
            for e in entries.flatten() {
                let ours = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("ws"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|u| uids.contains(&u));
                if ours && e.path().is_dir() {
                    let s = Session {
                        mode: self.mode,
                        dirs: vec![e.path()],
                    };
                    if let Err(e) = s.remove(Duration::from_millis(200)) {
                        tracing::warn!("a leftover session cgroup: {e:#}");
                    }
                }
            }
        }
    }
}

/// One session's cgroup (a directory per hierarchy).
#[derive(Debug)]
pub struct Session {
    mode: Mode,
    dirs: Vec<PathBuf>,
}

/// Why the cgroup ended a session's processes, if it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Memory,
    Processes,
}

impl Session {
    fn file(&self, name: &str) -> Option<PathBuf> {
        self.dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
    }

    fn set_limits(&self, l: &Limits) -> anyhow::Result<()> {
        let memory = (l.memory_mb * MB).to_string();
        let quota = (PERIOD_US * l.cpu_percent / 100).max(1000).to_string();
        let set = |name: &str, value: &str| -> anyhow::Result<()> {
            let p = self
                .file(name)
                .ok_or_else(|| anyhow::anyhow!("no {name} in the session's cgroup"))?;
            write(&p, value).map_err(io(format!("writing {value} to {}", p.display())))
        };
        match self.mode {
            Mode::V2 => {
                set("memory.max", &memory)?;
                // Swap would let a session hold more than its memory; none is given.
                if self.file("memory.swap.max").is_some() {
                    set("memory.swap.max", "0")?;
                }
                set("pids.max", &l.processes.to_string())?;
                set("cpu.max", &format!("{quota} {PERIOD_US}"))?;
            }
            Mode::V1 => {
                set("memory.limit_in_bytes", &memory)?;
                if self.file("memory.memsw.limit_in_bytes").is_some() {
                    set("memory.memsw.limit_in_bytes", &memory)?;
                }
                set("pids.max", &l.processes.to_string())?;
                set("cpu.cfs_period_us", &PERIOD_US.to_string())?;
                set("cpu.cfs_quota_us", &quota)?;
            }
            Mode::Off => {}
        }
        Ok(())
    }

    /// Descriptors a new process writes `0` to (itself) before anything else: it joins the
    /// session's cgroup in every hierarchy.
    pub fn join_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_CLOEXEC)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// CPU time used by every process of the session so far.
    pub fn cpu_used(&self) -> Duration {
        match self.mode {
            Mode::V2 => self
                .file("cpu.stat")
                .and_then(|p| keyed(&read(&p), "usage_usec"))
                .map(Duration::from_micros),
            _ => self
                .file("cpuacct.usage")
                .and_then(|p| read(&p).trim().parse().ok())
                .map(Duration::from_nanos),
        }
        .unwrap_or_default()
    }

    /// Memory charged to the session now (its processes, tmpfs and page cache), in bytes.
    pub fn memory_used(&self) -> u64 {
        let name = match self.mode {
            Mode::V2 => "memory.current",
            _ => "memory.usage_in_bytes",
        };
        self.file(name)
            .and_then(|p| read(&p).trim().parse().ok())
            .unwrap_or(0)
    }

    /// Which limit the kernel enforced so far: processes killed at the memory limit, or forks
    /// refused at the process limit.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let mut out = Vec::new();
        let oom = match self.mode {
            Mode::V2 => self
                .file("memory.events")
                .map(|p| keyed(&read(&p), "oom_kill")),
            _ => self
                .file("memory.oom_control")
                .map(|p| keyed(&read(&p), "oom_kill")),
        };
        if oom.flatten().unwrap_or(0) > 0 {
            out.push(Verdict::Memory);
        }
        if self
            .file("pids.events")
            .and_then(|p| keyed(&read(&p), "max"))
            .unwrap_or(0)
            > 0
        {
            out.push(Verdict::Processes);
        }
        out
    }

    /// The session's processes (from the first hierarchy: every process joins all of them).
    pub fn pids(&self) -> Vec<i32> {
        let mut s = String::new();
        if let Some(d) = self.dirs.first()
            && let Ok(mut f) = std::fs::File::open(d.join("cgroup.procs"))
        {
            let _ = f.read_to_string(&mut s);
        }
        s.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// SIGKILL to every process of the session, until none is left.
    pub fn kill(&self) {
        if self.mode == Mode::V2
            && let Some(p) = self.file("cgroup.kill")
            && write(&p, "1").is_ok()
        {
            return;
        }
        // v1: processes may fork while we look (up to pids.max); repeat until none is left.
        for _ in 0..500 {
            let left = self.pids();
            if left.is_empty() {
                return;
            }
            for p in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills what is left and removes the directories; an error when something stays (the uid
    /// must then not be given to another session).
    pub fn remove(&self, wait: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait.max(Duration::from_millis(500));
        for d in &self.dirs {
            if !d.exists() {
                continue;
            }
            loop {
                self.kill();
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // EBUSY while the last processes exit.
                    Err(e) if Instant::now() >= deadline => {
                        return Err(anyhow::anyhow!(
                            "removing the session cgroup {}: {e} ({} processes left)",
                            d.display(),
                            self.pids().len()
                        ));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        Ok(())
    }
}

use std::os::unix::fs::OpenOptionsExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_and_v2_cgroups_under_their_mounts() {
        let own = own_cgroups(
            "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/system.slice/sage-worker.service\n",
        );
        assert_eq!(own.len(), 4);
        assert_eq!(own[2].1, vec!["cpu", "cpuacct"]);
        let mounts = cgroup_mounts(
            "35 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
             36 30 0:31 /x /mnt/cpu\\040here rw - cgroup cgroup rw,cpu,cpuacct\n\
             37 30 0:32 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw,nsdelegate\n\
             38 30 0:33 / /tmp rw - tmpfs tmpfs rw\n",
        );
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1].1, PathBuf::from("/mnt/cpu here"));
        assert_eq!(
            under_mount(&mounts[0].0, &mounts[0].1, "/process_api/abc"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        // A mount of a subtree: paths are relative to its root; others are not under it.
        assert_eq!(
            under_mount("/x", Path::new("/mnt/cpu"), "/x/y"),
            Some(PathBuf::from("/mnt/cpu/y"))
        );
        assert_eq!(under_mount("/x", Path::new("/mnt/cpu"), "/z"), None);
    }

    /// Without the controllers neither layout is found (the worker then refuses to start unless
    /// the configuration allows rlimits only).
    #[test]
    fn missing_controllers_are_no_layout() {
        let own = own_cgroups("4:memory:/\n1:cpu,cpuacct:/\n0::/\n");
        let mounts = cgroup_mounts(
            "35 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             36 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             37 30 0:32 / /nonexistent/unified rw - cgroup2 cgroup2 rw\n",
        );
        // No pids hierarchy: no v1 layout (nothing is created on the way).
        assert!(Cgroups::v1(&mounts, &own).unwrap().is_none());
        // A v2 tree whose cgroup lists no controllers: none either.
        assert!(Cgroups::v2(&mounts, &own).unwrap().is_none());
    }

    #[test]
    fn reads_keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "max"), Some(12));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed(events, "missing"), None);
    }

    /// The v2 file names on a directory shaped like one (a unit test: this box's kernel gives
    /// cgroup v2 no controllers; the v1 path is tested on real cgroups in tests/worker.rs).
    #[test]
    fn v2_limits_and_counters_use_the_v2_files() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.max",
            "cgroup.procs",
        ] {
            std::fs::write(d.path().join(f), "").unwrap();
        }
        std::fs::write(
            d.path().join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 1\n",
        )
        .unwrap();
        std::fs::write(d.path().join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        std::fs::write(d.path().join("pids.events"), "max 0\n").unwrap();
        let s = Session {
            mode: Mode::V2,
            dirs: vec![d.path().to_path_buf()],
        };
        let limits = Limits {
            cpu_seconds: 1,
            memory_mb: 64,
            processes: 10,
            open_files: 64,
            file_size_mb: 1,
            wall_clock_seconds: 1,
            idle_timeout_seconds: 1,
            cpu_percent: 50,
        };
        s.set_limits(&limits).unwrap();
        let got = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(got("memory.max"), (64 * MB).to_string());
        assert_eq!(got("memory.swap.max"), "0");
        assert_eq!(got("pids.max"), "10");
        assert_eq!(got("cpu.max"), "50000 100000");
        assert_eq!(s.cpu_used(), Duration::from_millis(2500));
        assert_eq!(s.verdicts(), vec![Verdict::Memory]);
    }
}
