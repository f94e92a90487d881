//! The box's inotify limits against the lab machines it will run. Every machine's systemd,
//! journald and services take inotify instances of the box's root user, and Debian's default
//! (`fs.inotify.max_user_instances = 128`) runs out at about fifteen machines: units then fail
//! with "Too many open files" and machines end `degraded`. kind and other container tools ask
//! users to raise these limits; `sagectl lab up` raises them itself when they are too low for
//! the machines that will run (this lab's and every other lab's on the box), and says so.

use std::path::Path;

use super::{LabError, io, say};

/// Inotify instances one machine may take (systemd, journald, logind, dbus and services,
/// measured at 20 to 30 on a deployed lab host), with room.
pub const INSTANCES_PER_MACHINE: u64 = 40;
/// Watches per machine (systemd watches unit and configuration directories).
pub const WATCHES_PER_MACHINE: u64 = 8192;
/// Left for the box itself.
const BOX_INSTANCES: u64 = 128;
const BOX_WATCHES: u64 = 65536;

const INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";
const WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// What the limits must be for `machines` lab machines in all.
pub fn wanted(machines: u64) -> (u64, u64) {
    (
        BOX_INSTANCES + INSTANCES_PER_MACHINE * machines,
        BOX_WATCHES + WATCHES_PER_MACHINE * machines,
    )
}

/// Machines of every lab on this box (their records under `/run/sagectl-lab/<lab>/<host>`),
/// plus `new` about to start that are not among them yet.
pub fn machines_on_box(run_root: &Path, new: u64) -> u64 {
    let existing = std::fs::read_dir(run_root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|lab| {
            std::fs::read_dir(lab.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|m| m.path().join("machine.json").exists())
        .count() as u64;
    existing + new
}

fn read(path: &str) -> Result<u64, LabError> {
    std::fs::read_to_string(path)
        .map_err(io(format!("reading {path}")))?
        .trim()
        .parse()
        .map_err(|_| LabError::Machine {
            host: "box".into(),
            what: format!("{path} does not hold a number"),
        })
}

/// Raises the limits to what `machines` need (never lowers them).
pub fn ensure(machines: u64) -> Result<(), LabError> {
    let (instances, watches) = wanted(machines);
    for (path, want, name) in [
        (INSTANCES, instances, "fs.inotify.max_user_instances"),
        (WATCHES, watches, "fs.inotify.max_user_watches"),
    ] {
        let have = read(path)?;
        if have < want {
            std::fs::write(path, want.to_string()).map_err(io(format!(
                "raising {name} to {want} (lab machines need it; set it with sysctl yourself if this box forbids it)"
            )))?;
            say(format!(
                "raised {name} from {have} to {want} for {machines} lab machines on this box (not kept across reboots)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifteen_machines_need_more_than_debians_default() {
        let (i, w) = wanted(15);
        assert!(i >= 15 * 20 + 128, "{i}");
        assert!(w > 8192 * 15, "{w}");
        assert_eq!(wanted(0), (BOX_INSTANCES, BOX_WATCHES));
    }

    #[test]
    fn counts_machines_of_every_lab() {
        let d = tempfile::tempdir().unwrap();
        for (lab, host) in [("a", "x"), ("a", "y"), ("b", "z")] {
            let m = d.path().join(lab).join(host);
            std::fs::create_dir_all(&m).unwrap();
            std::fs::write(m.join("machine.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(d.path().join("b/not-a-machine")).unwrap();
        assert_eq!(machines_on_box(d.path(), 2), 5);
        assert_eq!(machines_on_box(&d.path().join("nothing"), 1), 1);
    }
}
