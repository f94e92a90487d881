//! The basics of OpenSSH's client configuration (`~/.ssh/config`): `User`, `Port` and
//! `IdentityFile` of the `Host` blocks matching a host's name, used where the inventory does not
//! say. First value wins, as in OpenSSH; `Match` blocks and `Include` are not followed.
//! `HostName` is not used: the inventory's `address` is authoritative.

use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_file: Option<PathBuf>,
}

/// The user's config file: `$SAGECTL_SSH_CONFIG`, else `~/.ssh/config`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SAGECTL_SSH_CONFIG") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh/config"))
}

/// Settings for `host` from the default config file (empty when there is none).
pub fn lookup(host: &str) -> HostConfig {
    default_path()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| parse_for(&t, host))
        .unwrap_or_default()
}

/// Settings for `host` from config `text`.
pub fn parse_for(text: &str, host: &str) -> HostConfig {
    let mut out = HostConfig::default();
    let mut active = true; // lines before any Host apply to all
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, r)) => (
                k,
                r.trim_start_matches(|c: char| c.is_whitespace() || c == '=')
                    .trim(),
            ),
            None => (line, ""),
        };
        let value = rest.trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "host" => active = host_matches(rest, host),
            "match" => active = false,
            "user" if active && out.user.is_none() => out.user = Some(value.to_string()),
            "port" if active && out.port.is_none() => out.port = value.parse().ok(),
            "identityfile" if active && out.identity_file.is_none() => {
                out.identity_file = Some(match value.strip_prefix("~/") {
                    Some(r) => std::env::var_os("HOME")
                        .map_or_else(|| PathBuf::from(value), |h| Path::new(&h).join(r)),
                    None => PathBuf::from(value),
                });
            }
            _ => {}
        }
    }
    out
}

/// OpenSSH's pattern lists: any positive pattern matches and no negated one does.
fn host_matches(patterns: &str, host: &str) -> bool {
    let mut matched = false;
    for p in patterns.split_whitespace() {
        if let Some(neg) = p.strip_prefix('!') {
            if glob(neg.as_bytes(), host.as_bytes()) {
                return false;
            }
        } else if glob(p.as_bytes(), host.as_bytes()) {
            matched = true;
        }
    }
    matched
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "\
# comment
Host web* !web9
    User deploy
    Port 2222
Host *
    User fallback
    IdentityFile=/keys/id_ed25519
Match host foo
    Port 1
";

    #[test]
    fn first_matching_value_wins() {
        let c = parse_for(CONF, "web1");
        assert_eq!(
            c,
            HostConfig {
                user: Some("deploy".into()),
                port: Some(2222),
                identity_file: Some("/keys/id_ed25519".into())
            }
        );
        let c = parse_for(CONF, "web9");
        assert_eq!((c.user.as_deref(), c.port), (Some("fallback"), None));
        let c = parse_for(CONF, "db");
        assert_eq!(c.user.as_deref(), Some("fallback"));
    }

    #[test]
    fn globs() {
        assert!(glob(b"w?b*", b"web12"));
        assert!(!glob(b"w?b", b"web12"));
        assert!(glob(b"*", b""));
    }
}
