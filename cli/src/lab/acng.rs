//! apt-cacher-ng on the bridge address, so lab machines install packages with no route out. It
//! is run by hand with its own small configuration (the system's maps deb.debian.org to mirror
//! lists that may be empty); its cache lives in the cache directory and outlives the lab.

use std::net::SocketAddr;
use std::time::Duration;

use super::{APT_PROXY_PORT, Lab, LabError, io, say, wait_listening};

fn pid_file(lab: &Lab<'_>) -> std::path::PathBuf {
    lab.run_dir.join("acng/pid")
}

fn running_pid(lab: &Lab<'_>) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(lab))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "apt-cacher-ng").then_some(pid)
}

pub fn ensure(lab: &Lab<'_>) -> Result<(), LabError> {
    if running_pid(lab).is_some() {
        return Ok(());
    }
    let dir = lab.run_dir.join("acng");
    let cache = lab.cache_dir.join("apt-cache");
    for d in [dir.join("log"), cache.clone()] {
        std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
    }
    let conf = format!(
        "CacheDir: {}\nLogDir: {}\nSupportDir: /usr/lib/apt-cacher-ng\nPort: {APT_PROXY_PORT}\nBindAddress: {}\nPidFile: {}\nSocketPath: {}\nExThreshold: 4\nForeGround: 0\n",
        cache.display(),
        dir.join("log").display(),
        lab.settings.gateway(),
        pid_file(lab).display(),
        dir.join("socket").display(),
    );
    std::fs::write(dir.join("acng.conf"), conf)
        .map_err(io("writing the apt proxy's configuration"))?;
    crate::sys::run(&["apt-cacher-ng", "-c", dir.to_str().expect("utf-8 path")])?;
    let addr = SocketAddr::new(lab.settings.gateway(), APT_PROXY_PORT);
    if !wait_listening(addr, Duration::from_secs(10)) {
        return Err(LabError::Machine {
            host: "apt proxy".into(),
            what: format!(
                "apt-cacher-ng is not answering on {addr}; see {}",
                dir.join("log").display()
            ),
        });
    }
    say(format!("apt proxy on {addr} (cache {})", cache.display()));
    Ok(())
}

pub fn stop(lab: &Lab<'_>) {
    if let Some(pid) = running_pid(lab) {
        let _ = crate::sys::output(&["kill", &pid.to_string()]);
        for _ in 0..100 {
            if running_pid(lab).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if running_pid(lab).is_some() {
            let _ = crate::sys::output(&["kill", "-9", &pid.to_string()]);
        }
    }
}
