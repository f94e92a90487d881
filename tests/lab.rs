//! `sagectl lab` on this box, as root: three machines come up and are checked over real SSH
//! (OpenSSH, with the pinned host keys), then `lab down` leaves nothing behind. The machines are
//! torn down even when an assertion fails.

use sagews_testkit::lab;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lab::{Down, require, sagectl, scratch_inventory, ssh, text};

/// Runs `lab down` when dropped, so a failing test leaves no machines behind.
fn lab(args: &[&str], inv: &Path) -> Output {
    sagectl()
        .arg("lab")
        .arg(args[0])
        .arg(inv)
        .args(&args[1..])
        .output()
        .unwrap()
}

/// Live (not zombie) processes whose command line mentions `needle`.
fn live_processes(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie && cmd.contains(needle) && !cmd.contains("cargo") {
            out.push(cmd);
        }
    }
    out
}

/// Lab links (bridges `sglab-*`, veths `sgv*`) on this box.
fn lab_links() -> Vec<String> {
    let o = Command::new("ip").args(["-br", "link"]).output().unwrap();
    let mut v: Vec<String> = text(&o)
        .0
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("sgv") || n.starts_with("sglab-"))
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// Lab firewall tables on this box.
fn lab_tables() -> Vec<String> {
    let o = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let mut v: Vec<String> = text(&o)
        .0
        .lines()
        .filter(|l| l.contains("sagectl_lab_"))
        .map(String::from)
        .collect();
    v.sort();
    v
}

#[test]
fn three_machines_up_checked_over_ssh_then_nothing_left() {
    require("ip");
    let (_tmp, inv) = scratch_inventory(&lab::fixtures().join("lab3.yaml"));
    let _down = Down(inv.clone());

    // Other labs may run on this box (and come and go while this test runs): what this one
    // leaves is checked by its own id, found in its machines' records.
    let o = lab(&["up"], &inv);
    let (out, err) = text(&o);
    assert!(o.status.success(), "lab up failed:\n{out}\n{err}");
    let rec = std::fs::read_to_string("/run/sagectl-lab/labtest/alpha/machine.json").unwrap();
    let veth = serde_json::from_str::<serde_json::Value>(&rec).unwrap()["veth"]
        .as_str()
        .unwrap()
        .to_string();
    let id = veth[3..9].to_string();
    let ours =
        |v: Vec<String>| -> Vec<String> { v.into_iter().filter(|n| n.contains(&id)).collect() };
    assert!(
        !ours(lab_links()).is_empty() && !ours(lab_tables()).is_empty(),
        "{id}"
    );
    assert!(
        err.contains("3 machines up (3 started, 0 already running)"),
        "{err}"
    );

    let hosts = [
        ("alpha", "10.78.0.10"),
        ("bravo", "10.78.0.11"),
        ("charlie", "10.78.0.12"),
    ];
    for (h, addr) in hosts {
        // systemd booted as PID 1 and sshd runs.
        let state = ssh(&inv, h, &["systemctl", "is-system-running"]);
        assert!(
            matches!(state.trim(), "running" | "degraded"),
            "{h}: {state}"
        );
        assert_eq!(
            ssh(&inv, h, &["systemctl", "is-active", "ssh"]).trim(),
            "active"
        );
        assert_eq!(ssh(&inv, h, &["hostname"]).trim(), h);
        assert!(
            ssh(&inv, h, &["ip", "-4", "-o", "addr", "show", "eth0"])
                .contains(&format!("{addr}/24"))
        );
        // The others by name.
        for (other, other_addr) in hosts {
            let line = ssh(&inv, h, &["getent", "hosts", other]);
            assert!(
                line.starts_with(other_addr),
                "{h} resolves {other} as {line}"
            );
            ssh(
                &inv,
                h,
                &[
                    "timeout",
                    "5",
                    "bash",
                    "-c",
                    &format!("exec 3<>/dev/tcp/{other}/22; head -c 4 <&3"),
                ],
            );
        }
        // No route out: only the lab subnet.
        let routes = ssh(&inv, h, &["ip", "route"]);
        assert!(
            !routes.contains("default"),
            "{h} has a default route: {routes}"
        );
    }

    // apt works through the lab's proxy.
    let out = ssh(
        &inv,
        "bravo",
        &[
            "sh",
            "-c",
            "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q hello >/dev/null && hello",
        ],
    );
    assert_eq!(out.trim(), "Hello, world!");

    // Each machine has its own host keys, pinned in the state directory.
    let known = std::fs::read_to_string(inv.parent().unwrap().join(".sagectl/labtest/known_hosts"))
        .unwrap();
    let keys: Vec<&str> = known
        .lines()
        .filter(|l| l.contains("ssh-ed25519"))
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(keys.len(), 3, "{known}");
    assert!(
        keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2],
        "host keys are shared: {known}"
    );

    // A second `up` changes nothing; status says running.
    let o = lab(&["up"], &inv);
    assert!(
        text(&o).1.contains("(0 started, 3 already running)"),
        "{}",
        text(&o).1
    );
    let o = lab(&["status"], &inv);
    assert!(o.status.success());
    assert_eq!(text(&o).0.matches("running").count(), 3, "{}", text(&o).0);

    // Down: no process, mount, netns, link, cgroup or firewall table is left.
    let o = lab(&["down"], &inv);
    assert!(o.status.success(), "lab down failed: {}", text(&o).1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live_processes("--machine=labtest-").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(live_processes("--machine=labtest-"), Vec::<String>::new());
    assert_eq!(
        live_processes("/run/sagectl-lab/labtest"),
        Vec::<String>::new(),
        "apt proxy still running"
    );
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !text(&netns).0.contains("sagectl-labtest-"),
        "{}",
        text(&netns).0
    );
    assert_eq!(ours(lab_links()), Vec::<String>::new(), "links left behind");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains("/run/sagectl-lab/labtest"), "{mounts}");
    assert!(!Path::new("/run/sagectl-lab/labtest").exists());
    for h in ["unified", "systemd", "memory", ""] {
        let d = Path::new("/sys/fs/cgroup")
            .join(h)
            .join("sagectl-lab/labtest-alpha");
        assert!(!d.exists(), "{} left", d.display());
    }
    assert_eq!(
        ours(lab_tables()),
        Vec::<String>::new(),
        "firewall tables left behind"
    );
    // Status now says stopped (exit 3: not all running).
    let o = lab(&["status"], &inv);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(text(&o).0.matches("stopped").count(), 3, "{}", text(&o).0);
}

#[test]
fn subnet_overlapping_this_box_is_refused() {
    require("ip");
    // An interface holding an address of the lab's subnet stands for a real network (a veth:
    // this box's kernel has no dummy links).
    let dummy = "sgtestdummy0";
    let _ = Command::new("ip").args(["link", "del", dummy]).output();
    assert!(
        Command::new("ip")
            .args([
                "link",
                "add",
                dummy,
                "type",
                "veth",
                "peer",
                "name",
                "sgtestdummy1"
            ])
            .status()
            .unwrap()
            .success()
    );
    struct Del(&'static str);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", self.0]).output();
        }
    }
    let _del = Del(dummy);
    assert!(
        Command::new("ip")
            .args(["addr", "add", "10.68.5.7/24", "dev", dummy])
            .status()
            .unwrap()
            .success()
    );
    let tmp = tempfile::tempdir().unwrap();
    let inv = tmp.path().join("overlap.yaml");
    std::fs::write(&inv, "name: overlap\nlab: {subnet: 10.68.0.0/16}\nhosts:\n  db: {address: 10.68.0.10, roles: [database]}\n").unwrap();
    let o = lab(&["up"], &inv);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("lab.subnet 10.68.0.0/16 overlaps 10.68.5.7/24 on interface sgtestdummy0"),
        "{err}"
    );
    assert!(
        err.contains("hint: choose a free block for `lab.subnet`"),
        "{err}"
    );
    assert!(
        !Path::new("/run/sagectl-lab/overlap").exists(),
        "nothing was made"
    );
}

#[test]
fn not_root_is_a_clear_error() {
    require("setpriv");
    let tmp = tempfile::tempdir().unwrap();
    let inv = tmp.path().join("lab.yaml");
    std::fs::write(&inv, "name: nr\nlab: {subnet: 10.80.0.0/24}\nhosts:\n  db: {address: 10.80.0.10, roles: [database]}\n").unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_sagectl"))
        .args(["lab", "up"])
        .arg(&inv)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("lab machines need root"), "{err}");
}

/// Fifteen machines beside the other lab tests' machines: more than Debian's default inotify
/// limits allow. `lab up` raises the limits for every lab machine on the box, and each machine's
/// systemd reaches `running` (not `degraded` with "Too many open files").
#[test]
fn fifteen_machines_beside_other_labs_all_run() {
    require("ip");
    let (_tmp, inv) = scratch_inventory(&lab::fixtures().join("lab15.yaml"));
    let _down = Down(inv.clone());
    let o = lab(&["up"], &inv);
    let (out, err) = text(&o);
    assert!(o.status.success(), "lab up:\n{out}\n{err}");
    let instances: u64 = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        instances >= 128 + 40 * 15,
        "max_user_instances is {instances}"
    );
    let hosts: Vec<String> = (1..=15).map(|i| format!("m{i:02}")).collect();
    let states: Vec<(String, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = hosts
            .iter()
            .map(|h| {
                let inv = &inv;
                s.spawn(move || {
                    let o = sagectl()
                        .args(["lab", "ssh"])
                        .arg(inv)
                        .arg(h)
                        .args([
                            "--",
                            "timeout",
                            "120",
                            "systemctl",
                            "is-system-running",
                            "--wait",
                        ])
                        .output()
                        .unwrap();
                    (h.clone(), text(&o).0.trim().to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (h, state) in &states {
        if state != "running" {
            let failed = ssh(&inv, h, &["systemctl", "--failed", "--no-legend"]);
            panic!("{h} is {state:?}; failed units:\n{failed}");
        }
    }
}
