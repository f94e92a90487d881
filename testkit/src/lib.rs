//! Test support for the workspace's integration tests and benchmarks (in `tests/` and
//! `agent/benches/`): one place for every helper, used as an ordinary crate.
//!
//! - [`lab`]: paths, running `sagectl`, scratch inventories, lab guards, real tools in private
//!   namespaces.
//! - [`browser`]: the page's SockJS protocol as a browser speaks it through HAProxy.
//! - [`person`]: a person at a browser for drills: reconnects, cookies, what they saw.
//! - [`pki`]: credentials from a test CA (the deployment's own PKI code).
//! - [`pg`]: a fresh PostgreSQL cluster.
//! - [`worker`]: a worker process and a backend-side client for it.
//! - [`stack`]: a whole backend stack on loopback (PostgreSQL, memcached, nginx, HAProxy,
//!   workers, backends, logd).

pub mod browser;
pub mod lab;
pub mod person;
pub mod pg;
pub mod pki;
pub mod probe;
pub mod stack;
pub mod worker;

use std::path::PathBuf;

/// A binary of the workspace (`sagectl`, `sage-agent`) from the target directory the running
/// test or benchmark was built into (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
/// Cargo builds a package's binaries before its tests and benchmarks; `./test` builds the whole
/// workspace first, so a test of one package finds the other's binary too.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace` (./test does) before this test",
        path.display()
    );
    path
}

/// Fails unless running as root (namespaces, users, PostgreSQL as its own user): these tests
/// are meant to run as CI runs them, never to pass by skipping.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (namespaces, users, lab machines): run it as CI does, `sudo ./test`"
    );
}
