//! Connection setup: how sagectl reaches each host. The inventory says what it says; where it
//! is silent, the user's `~/.ssh/config` (`$SAGECTL_SSH_CONFIG`) fills in `User`, `Port` and
//! `IdentityFile`, then the defaults (root, 22), then the lab key or ssh-agent. Applied to the
//! inventory before rendering, so the firewall opens the port sagectl connects to.

use std::net::SocketAddr;
use std::path::Path;

use crate::inventory::{Host, Inventory, Ssh};
use crate::ssh::Target;
use crate::ssh_config::HostConfig;

/// Completes every host's SSH settings from the user's SSH client configuration.
pub fn apply_ssh_config(inv: &mut Inventory) {
    for h in &mut inv.hosts {
        merge(&mut h.ssh, crate::ssh_config::lookup(&h.name));
    }
}

/// The inventory's settings first, then `cfg`, then the defaults already in `ssh`.
fn merge(ssh: &mut Ssh, cfg: HostConfig) {
    if !ssh.user_set {
        if let Some(u) = cfg.user {
            ssh.user = u;
        }
    }
    if !ssh.port_set {
        if let Some(p) = cfg.port {
            ssh.port = p;
        }
    }
    if ssh.identity_file.is_none() {
        ssh.identity_file = cfg.identity_file;
    }
}

/// Where and as whom to connect to `host`; `lab_key` when nothing else names a key.
pub fn target(host: &Host, lab_key: Option<&Path>) -> Target {
    Target {
        host: host.name.clone(),
        addr: SocketAddr::new(host.address, host.ssh.port),
        user: host.ssh.user.clone(),
        identity: host
            .ssh
            .identity_file
            .clone()
            .or_else(|| lab_key.map(Path::to_path_buf)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inventory_wins_then_ssh_config_then_defaults() {
        let cfg = HostConfig {
            user: Some("deploy".into()),
            port: Some(2222),
            identity_file: Some("/k".into()),
        };
        let mut defaults = Ssh {
            user: "root".into(),
            port: 22,
            identity_file: None,
            user_set: false,
            port_set: false,
        };
        let mut given = Ssh {
            user: "admin".into(),
            port: 2200,
            identity_file: Some("/mine".into()),
            user_set: true,
            port_set: true,
        };
        merge(&mut defaults, cfg.clone());
        merge(&mut given, cfg);
        assert_eq!(
            (
                defaults.user.as_str(),
                defaults.port,
                defaults.identity_file
            ),
            ("deploy", 2222, Some("/k".into()))
        );
        assert_eq!(
            (given.user.as_str(), given.port, given.identity_file),
            ("admin", 2200, Some("/mine".into()))
        );
    }
}
