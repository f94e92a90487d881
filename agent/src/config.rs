//! What every agent's config file shares: it is JSON rendered by sagectl, and its TLS paths are
//! relative to the file's own directory (under systemd, the credentials directory).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Another host an agent connects to: the name its certificate carries and its address
/// (`host:port`). Backends, static hosts and memcached servers in configs are all this.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub address: String,
}

/// The CA, this host's certificate and its key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    fn resolve(&mut self, dir: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    pub fn identity(&self) -> Result<crate::tls::Identity, crate::tls::TlsError> {
        crate::tls::Identity::load(&self.ca, &self.cert, &self.key)
    }
}

/// A config type with TLS paths.
pub trait HasTls {
    fn tls(&mut self) -> &mut TlsPaths;
}

/// Reads a config file: a parse error names the file, line and column; TLS paths are resolved.
pub fn load<T: DeserializeOwned + HasTls>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut c: T = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: line {}, column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    c.tls().resolve(path.parent().unwrap_or(Path::new(".")));
    Ok(c)
}
