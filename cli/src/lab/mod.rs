//! `sagectl lab`: throwaway local Debian machines for an inventory whose `lab:` section is set.
//!
//! Each host of the inventory becomes a systemd-nspawn container booted with systemd as PID 1,
//! running on an overlay (a tmpfs upper layer) over one cached base rootfs built with mmdebstrap,
//! in its own network namespace with a veth into a bridge that holds the subnet's first address.
//! sshd takes the lab's key for root; each machine has fresh host keys, pinned in the state
//! directory. apt reaches Debian through an apt-cacher-ng on the bridge address (the machines
//! have no route out), whose cache persists between runs.
//!
//! Everything a lab makes at run time sits under `/run/sagectl-lab/<name>/` (a tmpfs, one
//! directory per machine recording what was made), so `down` removes what is there even when the
//! inventory changed since `up`.

mod acng;
mod cgroup;
mod image;
mod limits;
mod machine;
mod net;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::inventory::{Host, Inventory, Lab as LabSettings};
use crate::sys::{self, SysError};

pub use machine::MachineStatus;

/// The port of the lab's apt proxy on the bridge address (not apt-cacher-ng's usual 3142, so a
/// system-wide apt-cacher-ng on the box does not collide with it).
pub const APT_PROXY_PORT: u16 = 3149;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0} has no `lab:` section, so its hosts are not lab machines")]
    NoLab(PathBuf),
    #[error("lab machines need root (network namespaces, mounts, cgroups); run sagectl as root")]
    NotRoot,
    #[error(
        "lab.subnet {subnet} overlaps {other} on {dev}\n  hint: choose a free block for `lab.subnet` in {file}"
    )]
    Overlap {
        subnet: String,
        other: String,
        dev: String,
        file: PathBuf,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("machine {host}: {what}")]
    Machine { host: String, what: String },
    #[error("{count} machine(s) failed:\n{details}")]
    Machines { count: usize, details: String },
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// A lab: an inventory's lab settings and where its parts live on this box.
pub struct Lab<'a> {
    pub inv: &'a Inventory,
    pub settings: &'a LabSettings,
    /// Short hash of the inventory name, for interface names (at most 15 characters).
    id: String,
    /// `/run/sagectl-lab/<name>`: a tmpfs holding the machines' writable layers.
    run_dir: PathBuf,
    /// `/var/lib/sagectl/lab`: base images and the apt cache, kept between runs.
    cache_dir: PathBuf,
    state_dir: PathBuf,
}

/// The host keys of a machine that was (re)made, or None for one already running.
type NewKeys = Option<Vec<String>>;

/// Prints a progress line on stderr (stdout stays for results, such as `up --json`).
pub fn say(msg: impl AsRef<str>) {
    eprintln!("lab: {}", msg.as_ref());
}

impl<'a> Lab<'a> {
    pub fn new(inv: &'a Inventory) -> Result<Lab<'a>, LabError> {
        let settings = inv
            .lab
            .as_ref()
            .ok_or_else(|| LabError::NoLab(inv.file.clone()))?;
        let cache_dir = std::env::var_os("SAGECTL_LAB_CACHE")
            .map_or_else(|| PathBuf::from("/var/lib/sagectl/lab"), PathBuf::from);
        Ok(Lab {
            inv,
            settings,
            id: format!("{:06x}", fnv1a(inv.name.as_bytes()) & 0xff_ffff),
            run_dir: Path::new("/run/sagectl-lab").join(&inv.name),
            cache_dir,
            state_dir: crate::pki::dir_for(inv),
        })
    }

    pub fn bridge(&self) -> String {
        format!("sglab-{}", self.id)
    }

    /// The key sagectl logs in to lab machines with.
    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join("lab").join("id_ed25519")
    }

    /// Pinned host keys of the lab machines (OpenSSH known_hosts format).
    pub fn known_hosts(&self) -> PathBuf {
        self.state_dir.join("known_hosts")
    }

    fn machine(&self, host: &'a Host) -> machine::Machine<'_> {
        machine::Machine::new(self, host)
    }

    /// Brings every machine up (idempotent: running healthy machines are left alone).
    pub fn up(&self) -> Result<(), LabError> {
        let started = Instant::now();
        preflight()?;
        net::check_subnet(self)?;
        let new = self
            .inv
            .hosts
            .iter()
            .filter(|h| !self.run_dir.join(&h.name).join("machine.json").exists())
            .count() as u64;
        let run_root = self.run_dir.parent().expect("/run/sagectl-lab/<name>");
        limits::ensure(limits::machines_on_box(run_root, new))?;
        let base = image::ensure_base(&self.cache_dir, &self.settings.suite)?;
        std::fs::create_dir_all(self.state_dir.join("lab"))
            .map_err(io("creating the state directory"))?;
        ensure_key(&self.key_path())?;
        self.mount_run_dir()?;
        net::ensure_bridge(self)?;
        acng::ensure(self)?;

        let results: Vec<(String, Result<NewKeys, LabError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .inv
                .hosts
                .iter()
                .map(|h| {
                    let base = &base;
                    (
                        h.name.clone(),
                        s.spawn(move || self.machine(h).ensure_up(base)),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(n, h)| {
                    (
                        n,
                        h.join().unwrap_or_else(|_| {
                            Err(LabError::Machine {
                                host: "?".into(),
                                what: "panicked".into(),
                            })
                        }),
                    )
                })
                .collect()
        });
        let mut failed = Vec::new();
        let mut made = 0;
        for (name, r) in results {
            match r {
                Ok(Some(keys)) => {
                    made += 1;
                    // A remade machine has new host keys: a deliberate change, so re-pin them.
                    let addr = self.inv.host(&name).expect("inventory host").address;
                    crate::hostkeys::KnownHosts::new(self.known_hosts())
                        .replace(addr, &keys)
                        .map_err(io("pinning host keys"))?;
                }
                Ok(None) => {}
                Err(e) => failed.push(format!("  {name}: {e}")),
            }
        }
        if !failed.is_empty() {
            return Err(LabError::Machines {
                count: failed.len(),
                details: failed.join("\n"),
            });
        }
        say(format!(
            "{} machines up ({made} started, {} already running) in {:.1}s; apt proxy http://{}:{APT_PROXY_PORT}",
            self.inv.hosts.len(),
            self.inv.hosts.len() - made,
            started.elapsed().as_secs_f64(),
            self.settings.gateway()
        ));
        Ok(())
    }

    /// Removes every machine and everything the lab made, keeping the base image and apt cache.
    pub fn down(&self) -> Result<(), LabError> {
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        let started = Instant::now();
        let recorded = machine::recorded(&self.run_dir);
        let n = recorded.len();
        let results: Vec<Result<(), LabError>> = std::thread::scope(|s| {
            let handles: Vec<_> = recorded
                .into_iter()
                .map(|rec| s.spawn(move || machine::teardown(self, &rec)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LabError::Machine {
                            host: "?".into(),
                            what: "panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| format!("  {e}"))
            .collect();
        acng::stop(self);
        cgroup::remove_parents();
        net::remove_bridge(self)?;
        self.unmount_run_dir()?;
        if !errors.is_empty() {
            return Err(LabError::Machines {
                count: errors.len(),
                details: errors.join("\n"),
            });
        }
        say(format!(
            "{n} machines down in {:.1}s (base image and apt cache kept in {})",
            started.elapsed().as_secs_f64(),
            self.cache_dir.display()
        ));
        Ok(())
    }

    /// Removes the machine of `host` (processes, disk, network), as if it were lost.
    pub fn destroy(&self, host: &str) -> Result<(), LabError> {
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        match machine::recorded(&self.run_dir)
            .into_iter()
            .find(|r| r.host == host)
        {
            Some(rec) => {
                machine::teardown(self, &rec)?;
                say(format!("{host}'s machine is gone (its disk with it)"));
            }
            None => say(format!("{host} has no machine")),
        }
        Ok(())
    }

    /// The state of each host's machine.
    pub fn status(&self) -> Vec<(String, MachineStatus)> {
        if !self.run_dir.exists() {
            return self
                .inv
                .hosts
                .iter()
                .map(|h| (h.name.clone(), MachineStatus::Stopped))
                .collect();
        }
        self.inv
            .hosts
            .iter()
            .map(|h| (h.name.clone(), self.machine(h).status()))
            .collect()
    }

    fn mount_run_dir(&self) -> Result<(), LabError> {
        std::fs::create_dir_all(&self.run_dir)
            .map_err(io(format!("creating {}", self.run_dir.display())))?;
        if !is_mountpoint(&self.run_dir) {
            let dir = self.run_dir.display().to_string();
            sys::run(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "mode=0700",
                "sagectl-lab",
                &dir,
            ])?;
        }
        Ok(())
    }

    fn unmount_run_dir(&self) -> Result<(), LabError> {
        if is_mountpoint(&self.run_dir) {
            sys::run(&["umount", &self.run_dir.display().to_string()])?;
        }
        let _ = std::fs::remove_dir(&self.run_dir);
        Ok(())
    }
}

/// Whether `dir` is a mount point (listed in /proc/self/mounts).
pub(crate) fn is_mountpoint(dir: &Path) -> bool {
    let want = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
    })
}

/// Root, and the tools the lab uses (installed with apt when missing, saying so).
fn preflight() -> Result<(), LabError> {
    if !sys::is_root() {
        return Err(LabError::NotRoot);
    }
    let needs = [
        ("systemd-nspawn", "systemd-container"),
        ("mmdebstrap", "mmdebstrap"),
        ("apt-cacher-ng", "apt-cacher-ng"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
    ];
    let mut missing: Vec<&str> = needs
        .iter()
        .filter(|(p, _)| !sys::have(p) && !Path::new("/usr/sbin").join(p).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        say(format!(
            "installing {} (needed for lab machines)",
            missing.join(" ")
        ));
        sys::run(&["apt-get", "update", "-q"])?;
        let mut argv = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        argv.extend(&missing);
        sys::run(&argv)?;
    }
    Ok(())
}

fn ensure_key(path: &Path) -> Result<(), LabError> {
    if path.exists() {
        return Ok(());
    }
    let p = path.display().to_string();
    sys::run(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "sagectl-lab",
        "-f",
        &p,
    ])?;
    Ok(())
}

/// Waits until something at `addr` speaks SSH (the server's banner), or `timeout`.
pub(crate) fn wait_ssh(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits until `addr` accepts TCP connections, or `timeout`.
pub(crate) fn wait_listening(addr: std::net::SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}
