//! Hosts one at a time: names, addresses (IPv4 where the configs need it), roles, variables and
//! SSH settings as the inventory gives them (`~/.ssh/config` is applied when connecting).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use super::super::raw::{RawHost, RawInventory};
use super::super::{Host, Role, Ssh};
use super::{LABEL_HINT, V, is_label, resolve, role_names};
use crate::diag::{Pos, suggest};
use crate::yaml::{index, join};

/// The hosts that came through, and what later rules need to know.
pub(super) struct Hosts {
    pub hosts: Vec<Host>,
    pub names: BTreeSet<String>,
    /// Every role named was understood.
    pub roles_known: bool,
}

/// Checks every host; `ssh` is the inventory-wide settings over the defaults.
pub(super) fn check_hosts(v: &mut V<'_>, raw: &RawInventory, ssh: &Ssh) -> Hosts {
    let mut out = Hosts {
        hosts: Vec::new(),
        names: BTreeSet::new(),
        roles_known: true,
    };
    let mut addresses: BTreeMap<IpAddr, String> = BTreeMap::new();
    for h in &raw.hosts {
        let path = join("hosts", &h.name.v);
        if !is_label(&h.name.v) {
            v.err(
                &h.name.pos,
                &path,
                format!("`{}` is not a valid host name", h.name.v),
                LABEL_HINT.to_string(),
            );
        }
        if !out.names.insert(h.name.v.clone()) {
            v.err(
                &h.name.pos,
                &path,
                format!("host `{}` is declared twice", h.name.v),
                "host names are unique across the inventory and its includes".to_string(),
            );
        }
        let address = check_address(v, h, &path, &mut addresses);
        // A misspelt role is reported; the rules between roles would only repeat it ("a
        // `worker` host needs a `backend` host" after `roles: [backnd]`), so they wait until it
        // is fixed.
        let (roles, known) = check_roles(v, h, &path);
        out.roles_known &= known;
        if let (Some(ip @ IpAddr::V6(_)), Some(a)) = (address, &h.address) {
            check_v6(v, ip, &roles, &a.pos, &join(&path, "address"));
        }
        let vars = super::vars::check_vars(v, &h.vars, &join(&path, "vars"));
        if let Some(ip) = address {
            out.hosts.push(Host {
                name: h.name.v.clone(),
                address: ip,
                roles,
                vars,
                ssh: host_ssh(raw, h, ssh),
                pos: h.name.pos.clone(),
            });
        }
    }
    out
}

fn check_address(
    v: &mut V<'_>,
    h: &RawHost,
    path: &str,
    addresses: &mut BTreeMap<IpAddr, String>,
) -> Option<IpAddr> {
    let Some(a) = &h.address else {
        if !v.reported(&join(path, "address")) {
            v.err(
                &h.name.pos,
                path,
                "the host has no `address`",
                "add `address: 10.0.0.5` (an IP address)".to_string(),
            );
        }
        return None;
    };
    match a.v.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
            v.err(
                &a.pos,
                &join(path, "address"),
                format!("`{ip}` cannot be a host's address"),
                None,
            );
            None
        }
        Ok(ip) => {
            if let Some(other) = addresses.insert(ip, h.name.v.clone()) {
                v.err(
                    &a.pos,
                    &join(path, "address"),
                    format!("address {ip} is already used by host `{other}`"),
                    "each host needs an address of its own: one of the two is a copy".to_string(),
                );
            }
            Some(ip)
        }
        Err(_) => {
            v.err(
                &a.pos,
                &join(path, "address"),
                format!("`{}` is not an IP address", a.v),
                "write an IPv4 or IPv6 address such as 10.0.0.5; names are not resolved"
                    .to_string(),
            );
            None
        }
    }
}

/// The host's roles, sorted, and whether every one named was understood.
fn check_roles(v: &mut V<'_>, h: &RawHost, path: &str) -> (Vec<Role>, bool) {
    let mut roles = Vec::new();
    let mut known = true;
    if h.roles.is_empty() && !v.reported(&join(path, "roles")) {
        v.err(
            &h.name.pos,
            &join(path, "roles"),
            "the host has no roles",
            Some(format!("give at least one of: {}", role_names().join(", "))),
        );
    }
    for (i, r) in h.roles.iter().enumerate() {
        let rp = index(&join(path, "roles"), i);
        match Role::from_name(&r.v) {
            Some(Role::Firewall) => v.err(
                &r.pos,
                &rp,
                "`firewall` is applied to every host and is not listed",
                "remove it".to_string(),
            ),
            Some(role) if roles.contains(&role) => {
                v.err(&r.pos, &rp, format!("role `{role}` is listed twice"), None)
            }
            Some(role) => roles.push(role),
            None => {
                known = false;
                v.err(
                    &r.pos,
                    &rp,
                    format!("unknown role `{}`", r.v),
                    Some(suggest(&r.v, &role_names())),
                )
            }
        }
    }
    roles.sort();
    (roles, known)
}

/// The host's own settings, then the inventory's, then the defaults. Identity files are
/// relative to the file that names them.
fn host_ssh(raw: &RawInventory, h: &RawHost, ssh: &Ssh) -> Ssh {
    let main_dir = raw.file.parent().unwrap_or(Path::new("."));
    let host_dir = h.file.parent().unwrap_or(Path::new("."));
    let user = h.ssh.user.as_ref().or(raw.ssh.user.as_ref());
    let port = h.ssh.port.as_ref().or(raw.ssh.port.as_ref());
    Ssh {
        user: user.map_or_else(|| ssh.user.clone(), |u| u.v.clone()),
        port: port.map_or(ssh.port, |p| p.v as u16),
        identity_file: h
            .ssh
            .identity_file
            .as_ref()
            .map(|f| resolve(host_dir, &f.v))
            .or_else(|| {
                raw.ssh
                    .identity_file
                    .as_ref()
                    .map(|f| resolve(main_dir, &f.v))
            }),
        user_set: user.is_some(),
        port_set: port.is_some(),
    }
}

/// Roles whose configs write `address:port` (agents' listen and peer addresses, nginx's
/// `listen`), which needs brackets around an IPv6 address that the templates do not write.
const V6_UNSUPPORTED: [Role; 5] = [
    Role::Backend,
    Role::Worker,
    Role::Logd,
    Role::Static,
    Role::Cache,
];

fn check_v6(v: &mut V<'_>, ip: IpAddr, roles: &[Role], pos: &Pos, path: &str) {
    if let Some(r) = roles.iter().find(|r| V6_UNSUPPORTED.contains(r)) {
        v.err(
            pos,
            path,
            format!("a `{r}` host needs an IPv4 address, not {ip}"),
            "its rendered configs write address:port, which cannot hold an IPv6 address; only database and loadbalancer hosts may have one".to_string(),
        );
    }
}
