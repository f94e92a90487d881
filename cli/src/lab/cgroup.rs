//! A cgroup per lab machine, in every hierarchy this box mounts (cgroup v2 alone, or v1 with a
//! v2 `unified` beside it). On a box whose PID 1 is not systemd, nspawn runs with `--keep-unit`
//! and would otherwise share one cgroup with every other machine, whose systemds then fight over
//! it ("Failed to attach to cgroup"). It also gives `down` a reliable kill and `status` memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{LabError, io};

/// The cgroup directories of one machine.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
}

const ROOT: &str = "/sys/fs/cgroup";

fn is_cgroup2(p: &Path) -> bool {
    p.join("cgroup.controllers").exists()
}

impl Cgroup {
    /// The directories of `name` (e.g. `sagectl-lab/lab-db`) in each hierarchy.
    pub fn new(name: &str) -> Cgroup {
        let root = Path::new(ROOT);
        let dirs = if is_cgroup2(root) {
            vec![root.join(name)]
        } else {
            // Hybrid or v1: the v2 tree (for cgroup.kill), the named systemd tree (where the
            // machine's systemd keeps its units), and every controller a worker puts its
            // sessions under (memory, pids, cpu, cpuacct: agent/src/worker/cgroup.rs). Left at
            // the root of a hierarchy, every lab machine's worker (of every lab on the box) made
            // its session cgroups in the same directories, `sagews/ws20000`: one machine's live
            // session made another's open of the same uid fail (EBUSY, its processes invisible
            // from the other's PID namespace). Machines share the box's kernel; each needs its
            // own subtree in each hierarchy, as each real machine has its own kernel.
            let mut dirs: Vec<PathBuf> = Vec::new();
            for h in ["unified", "systemd", "memory", "pids", "cpu", "cpuacct"] {
                // Co-mounted controllers (`cpu,cpuacct` with `cpu` a link to it) count once.
                let Ok(p) = root.join(h).canonicalize() else {
                    continue;
                };
                let d = p.join(name);
                if p.is_dir() && !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
            dirs
        };
        Cgroup { dirs }
    }

    pub fn create(&self) -> Result<(), LabError> {
        for d in &self.dirs {
            std::fs::create_dir_all(d).map_err(io(format!("creating cgroup {}", d.display())))?;
        }
        Ok(())
    }

    /// Processes in the machine's cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let Some(d) = self.dirs.first() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        collect_pids(d, &mut out);
        out
    }

    /// Memory in use by the machine, when a memory controller tells.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.current", "memory.usage_in_bytes"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok())
        })
    }

    /// Kills every process of the machine and removes its cgroups.
    pub fn kill_and_remove(&self) -> Result<(), LabError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            let killfile = self
                .dirs
                .iter()
                .map(|d| d.join("cgroup.kill"))
                .find(|p| p.exists());
            match killfile {
                Some(k) => {
                    std::fs::write(&k, "1").map_err(io(format!("writing {}", k.display())))?
                }
                None => {
                    for p in pids {
                        let _ = crate::sys::output(&["kill", "-9", &p.to_string()]);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Machine {
                    host: self.dirs[0].display().to_string(),
                    what: "processes survived 20s of SIGKILL".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Killed processes stay members until their parents reap them: retry removal a while.
        for d in &self.dirs {
            loop {
                match remove_tree(d) {
                    Ok(()) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => return Err(io(format!("removing cgroup {}", d.display()))(e)),
                }
            }
        }
        Ok(())
    }
}

/// Removes the lab's parent cgroups (`sagectl-lab`) once no machine of any lab is left in them.
pub fn remove_parents() {
    for d in Cgroup::new("sagectl-lab").dirs {
        let _ = std::fs::remove_dir(d); // fails, harmlessly, while another lab runs
    }
}

fn collect_pids(d: &Path, out: &mut Vec<u32>) {
    if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(d) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// rmdir of a cgroup and every cgroup below it, deepest first.
fn remove_tree(d: &Path) -> std::io::Result<()> {
    if !d.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(d)?.flatten() {
        if e.path().is_dir() {
            remove_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(d)
}
