//! The base root filesystem every lab machine starts from: Debian built once with mmdebstrap
//! and cached. Machines never write to it (they run on overlays), so it is shared by all.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{LabError, io, say};
use crate::sys::SysError;

/// What the base holds; a change here rebuilds existing bases (the stamp differs).
const PACKAGES: &str =
    "systemd,systemd-sysv,dbus,libpam-systemd,openssh-server,python3,iproute2,ca-certificates";
const RECIPE: &str = "1";

/// Waits for an exclusive lock on `f` (released when it is closed).
fn lock_exclusive(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor this function borrows; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The base for `suite`, built when missing or made by another recipe.
pub fn ensure_base(cache: &Path, suite: &str) -> Result<PathBuf, LabError> {
    let base = cache.join(format!("base-{suite}"));
    let stamp = format!("recipe {RECIPE}\npackages {PACKAGES}\n");
    let built = || std::fs::read_to_string(base.join(".sagectl-base")).is_ok_and(|s| s == stamp);
    if built() {
        return Ok(base);
    }
    std::fs::create_dir_all(cache).map_err(io(format!("creating {}", cache.display())))?;
    // One build at a time on this box: two labs coming up together (tests do) would otherwise
    // build into the same directory. The second waits, then finds the base built.
    let lock = std::fs::File::create(cache.join(format!(".base-{suite}.lock")))
        .map_err(io("creating the base image's lock file"))?;
    lock_exclusive(&lock).map_err(io("locking the base image"))?;
    if built() {
        return Ok(base);
    }
    let tmp = cache.join(format!(".base-{suite}.building"));
    let _ = std::fs::remove_dir_all(&tmp);
    say(format!(
        "building the {suite} base image with mmdebstrap (about a minute, once; cached in {})",
        cache.display()
    ));
    let started = Instant::now();
    let include = format!("--include={PACKAGES}");
    let argv = [
        "mmdebstrap",
        "--variant=important",
        &include,
        // Every machine makes its own host keys and machine id at first boot.
        "--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*",
        "--customize-hook=: > \"$1\"/etc/machine-id; rm -f \"$1\"/var/lib/dbus/machine-id",
        suite,
        tmp.to_str().expect("utf-8 path"),
    ];
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SysError::Spawn {
            program: "mmdebstrap".into(),
            source,
        })?;
    let mut last = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        if let Some(info) = line.strip_prefix("I: ") {
            say(format!("base: {info}"));
        }
        last.push(line);
        if last.len() > 8 {
            last.remove(0);
        }
    }
    let status = child.wait().map_err(io("waiting for mmdebstrap"))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(SysError::Failed {
            command: "mmdebstrap".into(),
            status: status.to_string(),
            stderr: last.join("\n"),
        }
        .into());
    }
    std::fs::write(tmp.join(".sagectl-base"), &stamp).map_err(io("writing the base stamp"))?;
    let _ = std::fs::remove_dir_all(&base);
    std::fs::rename(&tmp, &base).map_err(io(format!("moving the base into {}", base.display())))?;
    say(format!(
        "base image built in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(base)
}
