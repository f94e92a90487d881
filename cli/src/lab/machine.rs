//! One lab machine: an overlay root on the lab's tmpfs, a network namespace with a veth into
//! the bridge, a cgroup, and systemd-nspawn booting systemd in it. What was made is recorded in
//! `machine.json` beside the root, so teardown never depends on the inventory.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cgroup::Cgroup;
use super::{APT_PROXY_PORT, Lab, LabError, io, net, wait_ssh};
use crate::inventory::Host;
use crate::sys;

/// What `down` needs to remove a machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub host: String,
    pub address: IpAddr,
    pub netns: String,
    pub veth: String,
    pub cgroup: String,
    /// The transient systemd unit the machine runs in, on a box whose PID 1 is systemd.
    #[serde(default)]
    pub unit: Option<String>,
    pub dir: PathBuf,
    /// The state directory whose keys the machine trusts: another inventory of the same name
    /// (another directory) must not inherit it.
    #[serde(default)]
    pub state_dir: PathBuf,
}

pub struct Machine<'l> {
    lab: &'l Lab<'l>,
    host: &'l Host,
    rec: Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineStatus {
    /// Running and answering SSH; memory in use when the box can tell.
    Running {
        memory_bytes: Option<u64>,
    },
    Stopped,
    /// Some parts exist without the machine running: `lab up` will remake it.
    Broken(String),
}

impl fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MachineStatus::Running {
                memory_bytes: Some(m),
            } => write!(f, "running ({} MiB)", m / (1 << 20)),
            MachineStatus::Running { memory_bytes: None } => write!(f, "running"),
            MachineStatus::Stopped => write!(f, "stopped"),
            MachineStatus::Broken(why) => write!(f, "broken: {why}"),
        }
    }
}

/// How machines are started, chosen by the box's PID 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// PID 1 is not systemd: nspawn is started by us (`setsid`) inside cgroups we make, one
    /// per machine, and kept there with `--keep-unit` (without its own cgroup each machine's
    /// systemd would fight the others over one).
    Direct,
    /// PID 1 is systemd: each machine is a transient service (`systemd-run`) in
    /// `sagectl.slice` with `Delegate=yes`, the way `systemd-nspawn@.service` runs; nspawn keeps
    /// that unit (`--keep-unit`), so the machine's systemd owns a cgroup subtree systemd
    /// delegated to it, and `systemctl stop` ends it. Machines are not registered with
    /// machined (`sagectl lab status|ssh` is how to reach them).
    Systemd,
}

impl Launch {
    /// `SAGECTL_LAB_LAUNCH=direct|systemd` overrides the choice (a box without systemd's
    /// manager running has no `/run/systemd/system`).
    pub fn for_this_box() -> Launch {
        match std::env::var("SAGECTL_LAB_LAUNCH").as_deref() {
            Ok("direct") => Launch::Direct,
            Ok("systemd") => Launch::Systemd,
            _ if Path::new("/run/systemd/system").is_dir() => Launch::Systemd,
            _ => Launch::Direct,
        }
    }
}

/// The command that starts a machine: `nspawn` (systemd-nspawn and its arguments) wrapped as
/// `launch` needs; `log` receives nspawn's output.
pub fn launch_argv(
    launch: Launch,
    unit: Option<&str>,
    nspawn: &[String],
    log: &Path,
) -> Vec<String> {
    let mut argv: Vec<String> = match launch {
        Launch::Direct => [
            "setsid",
            "-f",
            "sh",
            "-c",
            "IFS=:; for d in $SAGECTL_CGROUPS; do echo $$ > \"$d/cgroup.procs\" || exit 1; done; unset IFS; exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec(),
        Launch::Systemd => vec![
            "systemd-run".into(),
            "--quiet".into(),
            "--collect".into(),
            format!("--unit={}", unit.unwrap_or("sagectl-lab.service")),
            "--slice=sagectl".into(),
            "--property=Delegate=yes".into(),
            "--property=KillMode=mixed".into(),
            format!("--property=StandardOutput=append:{}", log.display()),
            format!("--property=StandardError=append:{}", log.display()),
            "--".into(),
        ],
    };
    argv.extend(nspawn.iter().cloned());
    argv
}

/// Every machine recorded under a lab's run directory.
pub fn recorded(run_dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("machine.json")).ok())
        .filter_map(|s| serde_json::from_str(&s).ok())
        .collect();
    out.sort_by(|a, b| a.host.cmp(&b.host));
    out
}

impl<'l> Machine<'l> {
    pub fn new(lab: &'l Lab<'l>, host: &'l Host) -> Machine<'l> {
        let offset = match (host.address, lab.settings.subnet.addr()) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u32::from(a).wrapping_sub(u32::from(n)),
            _ => 0,
        };
        let (cgroup, unit) = match Launch::for_this_box() {
            Launch::Direct => (format!("sagectl-lab/{}-{}", lab.inv.name, host.name), None),
            Launch::Systemd => {
                let unit = format!("sagectl-lab-{}-{}.service", lab.inv.name, host.name);
                (format!("sagectl.slice/{unit}"), Some(unit))
            }
        };
        let rec = Record {
            host: host.name.clone(),
            address: host.address,
            netns: format!("sagectl-{}-{}", lab.inv.name, host.name),
            veth: format!("sgv{}{offset:05}", lab.id),
            cgroup,
            unit,
            dir: lab.run_dir.join(&host.name),
            state_dir: std::path::absolute(&lab.state_dir)
                .unwrap_or_else(|_| lab.state_dir.clone()),
        };
        Machine { lab, host, rec }
    }

    fn name(&self) -> String {
        let n = format!("{}-{}", self.lab.inv.name, self.host.name);
        n.chars().take(64).collect()
    }

    pub fn status(&self) -> MachineStatus {
        let recorded: Option<Record> = std::fs::read_to_string(self.rec.dir.join("machine.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if recorded.is_some_and(|r| r.state_dir != self.rec.state_dir) {
            return MachineStatus::Broken(
                "made for another state directory (an inventory of the same name elsewhere)".into(),
            );
        }
        let cg = Cgroup::new(&self.rec.cgroup);
        let procs = !cg.pids().is_empty();
        let netns = Path::new("/run/netns").join(&self.rec.netns).exists();
        let ssh = procs
            && netns
            && wait_ssh(
                SocketAddr::new(self.rec.address, 22),
                Duration::from_millis(300),
            );
        match (procs, netns, ssh) {
            (true, true, true) => MachineStatus::Running {
                memory_bytes: cg.memory_bytes(),
            },
            (false, false, _) if !self.rec.dir.exists() => MachineStatus::Stopped,
            (true, _, false) => {
                MachineStatus::Broken("its processes run but SSH does not answer".into())
            }
            _ => MachineStatus::Broken("left over from an earlier run".into()),
        }
    }

    /// Starts the machine unless it already runs. Returns its SSH host keys (known_hosts lines
    /// for its address) when it was (re)made, so the lab can re-pin them.
    pub fn ensure_up(&self, base: &Path) -> Result<Option<Vec<String>>, LabError> {
        if let MachineStatus::Running { .. } = self.status() {
            return Ok(None);
        }
        if self.rec.dir.exists() || Path::new("/run/netns").join(&self.rec.netns).exists() {
            teardown(self.lab, &self.rec)?;
        }
        let started = Instant::now();
        let keys = self.prepare_root(base)?;
        self.network()?;
        self.boot()?;
        let addr = SocketAddr::new(self.rec.address, 22);
        if !wait_ssh(addr, Duration::from_secs(60)) {
            let log = std::fs::read(self.rec.dir.join("nspawn.log")).unwrap_or_default();
            return Err(LabError::Machine {
                host: self.host.name.clone(),
                what: format!(
                    "SSH did not answer on {addr} within 60s; nspawn said:\n{}",
                    sys::tail(&log, 10)
                ),
            });
        }
        super::say(format!(
            "{} ({}) answers SSH after {:.1}s",
            self.host.name,
            self.rec.address,
            started.elapsed().as_secs_f64()
        ));
        Ok(Some(keys))
    }

    fn prepare_root(&self, base: &Path) -> Result<Vec<String>, LabError> {
        let d = &self.rec.dir;
        let (upper, work, root) = (d.join("upper"), d.join("work"), d.join("root"));
        for p in [&upper, &work, &root] {
            std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))?;
        }
        let rec = serde_json::to_string_pretty(&self.rec).expect("serializable");
        std::fs::write(d.join("machine.json"), rec).map_err(io("recording the machine"))?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            upper.display(),
            work.display()
        );
        sys::run(&[
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            root.to_str().expect("utf-8"),
        ])?;

        // Fresh host keys, made by the machine's own ssh-keygen (no RSA: slow to make, and
        // every client we use speaks ed25519 and ECDSA).
        let r = root.to_str().expect("utf-8");
        for t in ["ed25519", "ecdsa"] {
            let f = format!("/etc/ssh/ssh_host_{t}_key");
            sys::run(&["chroot", r, "ssh-keygen", "-q", "-t", t, "-N", "", "-f", &f])?;
        }
        let mut keys = Vec::new();
        for t in ["ed25519", "ecdsa"] {
            if let Ok(k) =
                std::fs::read_to_string(root.join(format!("etc/ssh/ssh_host_{t}_key.pub")))
            {
                let mut w = k.split_whitespace();
                if let (Some(kind), Some(b64)) = (w.next(), w.next()) {
                    keys.push(format!("{} {kind} {b64}", self.rec.address));
                }
            }
        }
        let write = |rel: &str, content: &str, mode: u32| -> Result<(), LabError> {
            use std::os::unix::fs::PermissionsExt;
            let p = root.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("creating {}", parent.display())))?;
            }
            std::fs::write(&p, content).map_err(io(format!("writing {}", p.display())))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", p.display())))
        };
        write("etc/hostname", &format!("{}\n", self.host.name), 0o644)?;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for h in &self.lab.inv.hosts {
            hosts.push_str(&format!("{}\t{}\n", h.address, h.name));
        }
        hosts.push_str(&format!(
            "{}\tsagectl-lab-gateway\n",
            self.lab.settings.gateway()
        ));
        write("etc/hosts", &hosts, 0o644)?;
        let pubkey = std::fs::read_to_string(self.lab.key_path().with_extension("pub"))
            .map_err(io("reading the lab's public key"))?;
        write("root/.ssh/authorized_keys", &pubkey, 0o600)?;
        std::fs::set_permissions(
            root.join("root/.ssh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io("chmod /root/.ssh"))?;
        // A stalled transfer (apt-cacher-ng can wedge when several machines fetch one new file
        // at once) times out and is retried instead of hanging the deploy.
        let proxy = format!(
            "// Written by sagectl lab: the machine's only way to Debian's archive.\nAcquire::http::Proxy \"http://{}:{APT_PROXY_PORT}\";\nAcquire::http::Timeout \"20\";\nAcquire::Retries \"5\";\n",
            self.lab.settings.gateway()
        );
        write("etc/apt/apt.conf.d/01sagectl-proxy", &proxy, 0o644)?;
        Ok(keys)
    }

    fn network(&self) -> Result<(), LabError> {
        let (ns, veth) = (&self.rec.netns, &self.rec.veth);
        let peer = format!("sgp{}", &veth[3..]);
        let addr = format!("{}/{}", self.rec.address, self.lab.settings.subnet.prefix());
        sys::run(&["ip", "netns", "add", ns])?;
        sys::run(&[
            "ip", "link", "add", veth, "type", "veth", "peer", "name", &peer,
        ])?;
        sys::run(&[
            "ip",
            "link",
            "set",
            veth,
            "master",
            &self.lab.bridge(),
            "up",
        ])?;
        sys::run(&["ip", "link", "set", &peer, "netns", ns])?;
        sys::run(&["ip", "-n", ns, "link", "set", &peer, "name", "eth0"])?;
        sys::run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        sys::run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        sys::run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn boot(&self) -> Result<(), LabError> {
        let cg = Cgroup::new(&self.rec.cgroup);
        if self.rec.unit.is_none() {
            cg.create()?; // under systemd, the unit's cgroup is systemd's to make
        }
        let log = std::fs::File::create(self.rec.dir.join("nspawn.log"))
            .map_err(io("creating nspawn.log"))?;
        let joined = std::env::join_paths(&cg.dirs).map_err(|e| LabError::Machine {
            host: self.host.name.clone(),
            what: e.to_string(),
        })?;
        let root = self.rec.dir.join("root");
        let netns = Path::new("/run/netns").join(&self.rec.netns);
        let mut nspawn: Vec<String> = ["systemd-nspawn", "--quiet", "--boot", "--directory"]
            .map(String::from)
            .to_vec();
        nspawn.push(root.display().to_string());
        nspawn.push(format!("--machine={}", self.name()));
        nspawn.extend(
            [
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
                // The machine owns its network namespace, so it may manage its own firewall
                // (nspawn grants CAP_NET_ADMIN only for networks it made itself).
                "--capability=CAP_NET_ADMIN",
            ]
            .map(String::from),
        );
        nspawn.push(format!("--network-namespace-path={}", netns.display()));
        // Direct: setsid -f makes init adopt nspawn, so the machine outlives this command; the
        // shell joins the machine's cgroups, then becomes nspawn. Systemd: a transient unit.
        let launch = if self.rec.unit.is_some() {
            Launch::Systemd
        } else {
            Launch::Direct
        };
        let argv = launch_argv(
            launch,
            self.rec.unit.as_deref(),
            &nspawn,
            &self.rec.dir.join("nspawn.log"),
        );
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .env("SAGECTL_CGROUPS", joined)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("nspawn.log"))?)
            .stderr(log)
            .status()
            .map_err(|source| sys::SysError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        if !status.success() {
            return Err(LabError::Machine {
                host: self.host.name.clone(),
                what: format!("starting systemd-nspawn failed ({status})"),
            });
        }
        Ok(())
    }
}

/// Removes a machine: its processes, cgroups, overlay, veth, network namespace and files.
pub fn teardown(_lab: &Lab<'_>, rec: &Record) -> Result<(), LabError> {
    if let Some(unit) = &rec.unit {
        // systemd ends the unit's processes and removes its cgroup; what follows is a no-op
        // then, and a fallback if the unit was lost.
        let _ = sys::output(&["systemctl", "stop", unit]);
        let _ = sys::output(&["systemctl", "reset-failed", unit]);
    }
    Cgroup::new(&rec.cgroup).kill_and_remove()?;
    let root = rec.dir.join("root");
    if super::is_mountpoint(&root) {
        let r = root.display().to_string();
        if sys::run(&["umount", &r]).is_err() {
            sys::run(&["umount", "--lazy", &r])?;
        }
    }
    net::delete_link(&rec.veth)?;
    if Path::new("/run/netns").join(&rec.netns).exists() {
        sys::run(&["ip", "netns", "del", &rec.netns])?;
    }
    if rec.dir.exists() {
        std::fs::remove_dir_all(&rec.dir).map_err(io(format!("removing {}", rec.dir.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_start_in_our_cgroups_or_as_delegated_units() {
        let nspawn = vec!["systemd-nspawn".to_string(), "--boot".into()];
        let log = Path::new("/run/x/nspawn.log");
        let d = launch_argv(Launch::Direct, None, &nspawn, log);
        assert_eq!(&d[..2], ["setsid", "-f"]);
        assert!(d[4].contains("cgroup.procs"));
        assert_eq!(&d[d.len() - 2..], nspawn.as_slice());
        let s = launch_argv(
            Launch::Systemd,
            Some("sagectl-lab-l-h.service"),
            &nspawn,
            log,
        );
        assert_eq!(s[0], "systemd-run");
        for want in [
            "--unit=sagectl-lab-l-h.service",
            "--property=Delegate=yes",
            "--slice=sagectl",
            "--property=StandardOutput=append:/run/x/nspawn.log",
        ] {
            assert!(s.iter().any(|a| a == want), "{want} in {s:?}");
        }
        let dashdash = s.iter().position(|a| a == "--").unwrap();
        assert_eq!(&s[dashdash + 1..], nspawn.as_slice());
    }
}
