//! Credentials from a test CA: the deployment's own PKI code (`sagews-pki`), so certificates carry
//! roles exactly as deployed ones do.

use std::path::{Path, PathBuf};

pub use sagews_pki::{State, role_name};

/// Writes a certificate and key from `state` into `dir` as `<name>.crt/.key`, plus `ca.crt`.
pub fn creds(state: &State, dir: &Path, name: &str, roles: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut dns = vec![name.to_string()];
    dns.extend(roles.iter().map(|r| role_name(r)));
    let c = state
        .issue(
            &format!("t-{name}"),
            name,
            dns,
            vec!["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
    let (ca, crt, key) = (
        dir.join("ca.crt"),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&ca, state.ca_cert_pem()).unwrap();
    std::fs::write(&crt, &c.chain_pem).unwrap();
    std::fs::write(&key, c.key_pem.expose()).unwrap();
    (ca, crt, key)
}
