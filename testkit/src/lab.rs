//! Helpers shared by the integration tests: paths, running sagectl, scratch copies of
//! inventories, and running a real tool inside private mount and network namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A `sagectl` command (the binary built for these tests).
pub fn sagectl() -> Command {
    Command::new(crate::bin("sagectl"))
}

/// Takes a lab down when dropped, whatever the test did (hold it until the end).
pub struct Down(pub PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = sagectl().args(["lab", "down"]).arg(&self.0).output();
    }
}

/// `sagectl up INVENTORY --json ARGS`: the output and the recap it printed.
pub fn up(inv: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let o = sagectl()
        .arg("up")
        .arg(inv)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let recap = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no JSON recap ({e}):\n{}\n{}", text(&o).0, text(&o).1));
    (o, recap)
}

/// `sagectl lab ssh INV HOST -- ARGV`, which must succeed: its stdout.
pub fn ssh(inv: &Path, host: &str, argv: &[&str]) -> String {
    let o = sagectl()
        .args(["lab", "ssh"])
        .arg(inv)
        .arg(host)
        .arg("--")
        .args(argv)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "ssh {host} {argv:?} failed:\n{out}\n{err}"
    );
    out
}

/// The entry of `name` in a JSON report's `hosts` (`up`'s recap, `status`).
pub fn host_entry<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))
}

/// The file that kills every process of lab machine `machine` (`<inventory>-<host>`) at once
/// when `1` is written to it.
pub fn kill_file(machine: &str) -> PathBuf {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let p = Path::new(root)
            .join("sagectl-lab")
            .join(machine)
            .join("cgroup.kill");
        if p.exists() {
            return p;
        }
    }
    panic!("no cgroup.kill for {machine}");
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Copies the directory holding an inventory into a fresh temp dir, so state directories
/// (.sagectl/) made by the test never land in the source tree. Returns the dir and the copy.
pub fn scratch_inventory(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(src.parent().unwrap(), tmp.path());
    let file = tmp.path().join(src.file_name().unwrap());
    (tmp, file)
}

pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == ".sagectl" {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(&name));
        } else {
            std::fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}

/// Renders `inventory` into `out`, asserting success.
pub fn render(inventory: &Path, out: &Path) -> String {
    let o = sagectl()
        .arg("render")
        .arg(inventory)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "render failed:\n{stdout}\n{stderr}");
    format!("{stdout}{stderr}")
}

pub fn is_root() -> bool {
    let o = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim() == "0"
}

/// Fails with what to do when the test cannot run here: these tests are meant to run (CI
/// installs the tools and runs as root), never to pass by skipping.
pub fn require(tool: &str) {
    assert!(
        is_root(),
        "this test needs root (mount and network namespaces); run it as CI does: `sudo .ci/run`"
    );
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "`{tool}` is not installed; .ci/run installs it (apt-get install ...)"
    );
}

/// Runs `argv` in new mount and network namespaces where each `(dir, over)` bind-mounts `dir`
/// over the system directory `over`, and loopback holds `addresses`. The real tool then reads
/// the rendered files at their real paths and can bind the host's real addresses.
pub fn run_isolated(binds: &[(&Path, &str)], addresses: &[String], argv: &[&str]) -> Output {
    let mut script = String::from("set -e\nip link set lo up\n");
    for a in addresses {
        let prefix = if a.contains(':') { 128 } else { 32 };
        script.push_str(&format!("ip addr add {a}/{prefix} dev lo\n"));
    }
    for (i, _) in binds.iter().enumerate() {
        script.push_str(&format!(
            "mount --bind \"$BIND_SRC_{i}\" \"$BIND_DST_{i}\"\n"
        ));
    }
    script.push_str("exec \"$@\"\n");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--net", "--", "sh", "-c", &script, "sh"])
        .args(argv);
    for (i, (src, dst)) in binds.iter().enumerate() {
        cmd.env(format!("BIND_SRC_{i}"), src)
            .env(format!("BIND_DST_{i}"), dst);
    }
    cmd.output().unwrap()
}

/// Gives each rendered file of a host the owner, group and mode its MANIFEST says, as
/// `sagectl up` will on the host.
pub fn apply_manifest(host_out: &Path) {
    let manifest = std::fs::read_to_string(host_out.join("MANIFEST")).unwrap();
    for line in manifest.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, path) = (w[0], w[1], w[2]);
        let file = host_out.join(path.trim_start_matches('/'));
        for (cmd, arg) in [("chown", owner), ("chmod", mode)] {
            let st = Command::new(cmd).arg(arg).arg(&file).status().unwrap();
            assert!(st.success(), "{cmd} {arg} {}", file.display());
        }
    }
}

/// Runs `script` (sh) as if on the host whose rendered files are in `host_out`: its /etc laid
/// over the system's (overlayfs, read-only) in a private mount namespace, in a private network
/// namespace where loopback holds `addresses`.
pub fn run_as_host(host_out: &Path, addresses: &[String], script: &str) -> Output {
    let mut setup = String::from("set -e\nip link set lo up\n");
    for a in addresses {
        let prefix = if a.contains(':') { 128 } else { 32 };
        setup.push_str(&format!(
            "ip addr add {a}/{prefix} dev lo 2>/dev/null || true\n"
        ));
    }
    setup.push_str("mount -t overlay overlay -o \"lowerdir=$HOST_ETC:/etc\" /etc\nset +e\n");
    Command::new("unshare")
        .args(["--mount", "--net", "--", "sh", "-c"])
        .arg(format!("{setup}{script}"))
        .env("HOST_ETC", host_out.join("etc"))
        .output()
        .unwrap()
}

/// A copy of the system directory `system` (e.g. /etc/nginx, for mime.types) with the rendered
/// files of the same directory laid over it.
pub fn overlay(system: &str, rendered_host: &Path, into: &Path) -> PathBuf {
    let dst = into.join(system.trim_start_matches('/'));
    if Path::new(system).is_dir() {
        copy_tree(Path::new(system), &dst);
    }
    let rendered = rendered_host.join(system.trim_start_matches('/'));
    if rendered.is_dir() {
        copy_tree(&rendered, &dst);
    }
    dst
}
