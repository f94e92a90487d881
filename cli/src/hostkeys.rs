//! Pinned SSH host keys in the state directory (`known_hosts`, OpenSSH's format: one line per
//! key, `address type base64`), so both sagectl and a plain `ssh -o UserKnownHostsFile=` use them.

use std::net::IpAddr;
use std::path::PathBuf;

pub struct KnownHosts {
    path: PathBuf,
    /// Hosts are pinned from parallel connections: one read-modify-write at a time.
    lock: std::sync::Mutex<()>,
}

impl KnownHosts {
    pub fn new(path: PathBuf) -> KnownHosts {
        KnownHosts {
            path,
            lock: std::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The pinned key lines of `addr`.
    pub fn get(&self, addr: IpAddr) -> Vec<String> {
        let a = addr.to_string();
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(a.as_str()))
            .map(String::from)
            .collect()
    }

    /// Replaces every key of `addr` with `lines` (a host deliberately remade).
    pub fn replace(&self, addr: IpAddr, lines: &[String]) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let a = addr.to_string();
        let old = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut out: Vec<String> = old
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(a.as_str()))
            .map(String::from)
            .collect();
        out.extend(lines.iter().cloned());
        let text = out.join("\n") + "\n";
        crate::pki::write_private(&self.path, text.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_keeps_other_hosts() {
        let d = tempfile::tempdir().unwrap();
        let k = KnownHosts::new(d.path().join("known_hosts"));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        k.replace(a, &["10.0.0.2 ssh-ed25519 AAAA1".into()])
            .unwrap();
        k.replace(b, &["10.0.0.3 ssh-ed25519 BBBB".into()]).unwrap();
        k.replace(
            a,
            &[
                "10.0.0.2 ssh-ed25519 AAAA2".into(),
                "10.0.0.2 ecdsa-sha2-nistp256 CCCC".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            k.get(a),
            [
                "10.0.0.2 ssh-ed25519 AAAA2",
                "10.0.0.2 ecdsa-sha2-nistp256 CCCC"
            ]
        );
        assert_eq!(k.get(b), ["10.0.0.3 ssh-ed25519 BBBB"]);
    }
}
