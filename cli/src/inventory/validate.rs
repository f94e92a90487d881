//! Stage two: names, addresses, roles and the rules between hosts. Every problem is collected
//! with its position and path; an [`Inventory`] comes out only when there are none.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use super::constraint::Constraint;
use super::raw::{RawInventory, RawSsh, Sp, Vars};
use super::{Cidr, Host, Inventory, Lab, LogdSettings, Role, Ssh, Tls};
use crate::diag::{Diagnostics, Pos, suggest};
use crate::roles::Catalog;
use crate::yaml::{Decoder, index, join};

struct V<'a> {
    diags: Diagnostics,
    /// Every variable a role declares, with its default.
    known_vars: BTreeMap<&'a str, &'a serde_json::Value>,
    /// And what each may hold.
    types: BTreeMap<&'a str, &'a Constraint>,
    /// Paths stage one reported: what is missing there was reported as wrong already.
    reported: &'a BTreeSet<String>,
}

impl V<'_> {
    fn err(
        &mut self,
        pos: &Pos,
        path: &str,
        msg: impl Into<String>,
        hint: impl Into<Option<String>>,
    ) {
        self.diags.push(pos, path, msg, hint.into());
    }

    /// Whether stage one reported a problem at `path` (so "missing" would repeat it).
    fn reported(&self, path: &str) -> bool {
        self.reported.contains(path)
    }
}

/// A DNS label: what host, group and inventory names must be, so they work as hostnames,
/// file names and certificate names alike.
pub fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

const LABEL_HINT: &str = "use lowercase letters, digits and '-' (at most 63, not at either end)";

/// Checks `raw`, adding to the problems stage one found (`diags`).
pub fn validate(raw: RawInventory, diags: Diagnostics) -> Result<Inventory, Diagnostics> {
    let catalog = Catalog::embedded()?;
    let stage_one_clean = diags.is_empty();
    let mut v = V {
        diags,
        known_vars: catalog.defaults(),
        types: catalog.types(),
        reported: &raw.reported,
    };

    let name = match &raw.name {
        Some(n) if is_label(&n.v) => n.v.clone(),
        Some(n) => {
            v.err(
                &n.pos,
                "name",
                format!("`{}` is not a valid inventory name", n.v),
                LABEL_HINT.to_string(),
            );
            String::new()
        }
        None if v.reported("name") => String::new(),
        None => {
            v.err(
                &raw.top,
                "name",
                "the inventory has no `name`",
                "add `name: mysite`; it names the state directory .sagectl/<name>/".to_string(),
            );
            String::new()
        }
    };

    let defaults = Ssh {
        user: "root".into(),
        port: 22,
        identity_file: None,
    };
    let ssh = merge_ssh(&defaults, &raw.ssh);
    let vars = check_vars(&mut v, &raw.vars, "vars");

    // Hosts: names, addresses, roles.
    let mut hosts = Vec::new();
    // A misspelt role is reported; the rules between roles would only repeat it ("a `worker`
    // host needs a `backend` host" after `roles: [backnd]`), so they wait until it is fixed.
    let mut roles_known = true;
    let mut addresses: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut names = BTreeSet::new();
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
        if !names.insert(h.name.v.clone()) {
            v.err(
                &h.name.pos,
                &path,
                format!("host `{}` is declared twice", h.name.v),
                "host names are unique across the inventory and its includes".to_string(),
            );
        }
        let address = match &h.address {
            None if v.reported(&join(&path, "address")) => None,
            None => {
                v.err(
                    &h.name.pos,
                    &path,
                    "the host has no `address`",
                    "add `address: 10.0.0.5` (an IP address)".to_string(),
                );
                None
            }
            Some(a) => {
                match a.v.parse::<IpAddr>() {
                    Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                        v.err(
                            &a.pos,
                            &join(&path, "address"),
                            format!("`{ip}` cannot be a host's address"),
                            None,
                        );
                        None
                    }
                    Ok(ip) => {
                        if let Some(other) = addresses.insert(ip, h.name.v.clone()) {
                            v.err(
                                &a.pos,
                                &join(&path, "address"),
                                format!("address {ip} is already used by host `{other}`"),
                                "each host needs an address of its own: one of the two is a copy"
                                    .to_string(),
                            );
                        }
                        Some(ip)
                    }
                    Err(_) => {
                        v.err(&a.pos, &join(&path, "address"), format!("`{}` is not an IP address", a.v), "write an IPv4 or IPv6 address such as 10.0.0.5; names are not resolved".to_string());
                        None
                    }
                }
            }
        };
        let mut roles = Vec::new();
        if h.roles.is_empty() && !v.reported(&join(&path, "roles")) {
            v.err(
                &h.name.pos,
                &join(&path, "roles"),
                "the host has no roles",
                Some(format!("give at least one of: {}", role_names().join(", "))),
            );
        }
        for (i, r) in h.roles.iter().enumerate() {
            let rp = index(&join(&path, "roles"), i);
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
                    roles_known = false;
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
        if let (Some(ip @ IpAddr::V6(_)), Some(a)) = (address, &h.address) {
            check_v6(&mut v, ip, &roles, &a.pos, &join(&path, "address"));
        }
        let host_vars = check_vars(&mut v, &h.vars, &join(&path, "vars"));
        // The host's own settings, then the inventory's, then ~/.ssh/config, then defaults.
        // Identity files are relative to the file that names them.
        let cfg = crate::ssh_config::lookup(&h.name.v);
        let main_dir = raw.file.parent().unwrap_or(std::path::Path::new("."));
        let host_dir = h.file.parent().unwrap_or(std::path::Path::new("."));
        let host_ssh = Ssh {
            user: h
                .ssh
                .user
                .as_ref()
                .or(raw.ssh.user.as_ref())
                .map(|u| u.v.clone())
                .or(cfg.user)
                .unwrap_or(ssh.user.clone()),
            port: h
                .ssh
                .port
                .as_ref()
                .or(raw.ssh.port.as_ref())
                .map(|p| p.v as u16)
                .or(cfg.port)
                .unwrap_or(ssh.port),
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
                })
                .or(cfg.identity_file),
        };
        if let Some(ip) = address {
            hosts.push(Host {
                name: h.name.v.clone(),
                address: ip,
                roles,
                vars: host_vars,
                ssh: host_ssh,
                pos: h.name.pos.clone(),
            });
        }
    }
    let hosts_pos = raw
        .hosts
        .first()
        .map_or(raw.top.clone(), |h| h.name.pos.clone());
    if raw.hosts.is_empty() && !v.reported("hosts") {
        v.err(
            &raw.top,
            "hosts",
            "the inventory has no hosts",
            "add a `hosts:` mapping of name to address and roles".to_string(),
        );
    }

    // Rules between roles (only meaningful once every host parsed).
    let count = |role: Role| hosts.iter().filter(|h| h.roles.contains(&role)).count();
    // Every host made it, with every role understood: counting hosts by role means something.
    let roles_complete = roles_known && hosts.len() == raw.hosts.len();
    let rules_apply = !raw.hosts.is_empty() && stage_one_clean && roles_complete;
    if rules_apply {
        match count(Role::Database) {
            1 => {}
            0 => v.err(
                &hosts_pos,
                "hosts",
                "no host has the `database` role",
                "exactly one host must run PostgreSQL".to_string(),
            ),
            n => {
                for h in hosts.iter().filter(|h| h.has(Role::Database)).skip(1) {
                    v.err(
                        &h.pos,
                        &join("hosts", &h.name),
                        format!("{n} hosts have the `database` role"),
                        "exactly one host runs PostgreSQL".to_string(),
                    );
                }
            }
        }
        let needs: [(Role, Role, &str); 7] = [
            (
                Role::Worker,
                Role::Backend,
                "workers take sessions only from backends",
            ),
            (
                Role::Backend,
                Role::Cache,
                "backends keep sessions in memcached",
            ),
            (
                Role::Backend,
                Role::Loadbalancer,
                "browsers reach backends through HAProxy",
            ),
            (
                Role::Loadbalancer,
                Role::Backend,
                "HAProxy sends /api and /sockjs to backends",
            ),
            (
                Role::Loadbalancer,
                Role::Static,
                "HAProxy sends / and /pub/ to nginx",
            ),
            (
                Role::Static,
                Role::Loadbalancer,
                "nginx is reached through HAProxy",
            ),
            (Role::Logd, Role::Database, "logd writes to PostgreSQL"),
        ];
        for (has, needs, why) in needs {
            if count(has) > 0 && count(needs) == 0 {
                let h = hosts.iter().find(|h| h.has(has)).expect("counted");
                v.err(
                    &h.pos,
                    &join("hosts", &h.name),
                    format!("a `{has}` host needs a `{needs}` host, and there is none"),
                    format!("{why}: give some host the `{needs}` role"),
                );
            }
        }
    }

    // TLS.
    let public_name = match &raw.public_name {
        Some(n) if is_dns_name(&n.v) => n.v.clone(),
        Some(n) => {
            v.err(
                &n.pos,
                "tls.public_name",
                format!("`{}` is not a DNS name", n.v),
                "the name browsers use, such as sagews.example.org".to_string(),
            );
            String::new()
        }
        None => {
            if count(Role::Loadbalancer) > 0 && !v.reported("tls.public_name") && !v.reported("tls")
            {
                v.err(&raw.top, "tls.public_name", "the site has no public name", "add `tls: {public_name: sagews.example.org}`: HAProxy's certificate is made for it".to_string());
            }
            String::new()
        }
    };
    let dir = raw
        .file
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let mut tls_file = |f: &Option<Sp<String>>, key: &str, pem: &str| -> Option<PathBuf> {
        let f = f.as_ref()?;
        let p = resolve(&dir, &f.v);
        // Read as `render` will, so a file that validates is one it can read.
        match super::files::read_text(&p, super::files::MAX_INVENTORY_FILE) {
            Ok(text) if text.contains(pem) => {}
            Ok(_) => v.err(
                &f.pos,
                &join("tls", key),
                format!("{} holds no `{pem}`", p.display()),
                "give the PEM file HAProxy is to serve".to_string(),
            ),
            Err(e) => v.err(
                &f.pos,
                &join("tls", key),
                format!("cannot read {}: {e}", p.display()),
                "the path is relative to the inventory file".to_string(),
            ),
        }
        Some(p)
    };
    let certificate = tls_file(
        &raw.certificate,
        "certificate",
        "-----BEGIN CERTIFICATE-----",
    );
    let key = tls_file(&raw.key, "key", "PRIVATE KEY-----");
    if certificate.is_some() != key.is_some() {
        let pos = raw
            .certificate
            .as_ref()
            .or(raw.key.as_ref())
            .map_or(raw.top.clone(), |s| s.pos.clone());
        v.err(
            &pos,
            "tls",
            "give both `certificate` and `key`, or neither",
            None,
        );
    }

    // Groups.
    let mut groups = BTreeMap::new();
    for (g, members) in &raw.groups {
        let path = join("groups", &g.v);
        if !is_label(&g.v) {
            v.err(
                &g.pos,
                &path,
                format!("`{}` is not a valid group name", g.v),
                LABEL_HINT.to_string(),
            );
        } else if names.contains(&g.v) || Role::from_name(&g.v).is_some() {
            v.err(
                &g.pos,
                &path,
                format!("group `{}` has the name of a host or role", g.v),
                "rename it, so `--limit` stays unambiguous".to_string(),
            );
        }
        let mut list = Vec::new();
        for (i, m) in members.iter().enumerate() {
            if names.contains(&m.v) {
                list.push(m.v.clone());
            } else {
                let known: Vec<&str> = names.iter().map(String::as_str).collect();
                v.err(
                    &m.pos,
                    &index(&path, i),
                    format!("no host named `{}`", m.v),
                    Some(suggest(&m.v, &known)),
                );
            }
        }
        if let Some(prev) = groups.insert(g.v.clone(), list) {
            // Groups may be extended by included files.
            groups.get_mut(&g.v).expect("inserted").extend(prev);
        }
    }

    let logd = check_logd(&mut v, &raw, &hosts, roles_complete);
    let lab = check_lab(&mut v, &raw, &hosts);
    check_ports(&mut v, &raw, &catalog, &hosts, &vars);

    if !v.diags.is_empty() {
        return Err(v.diags);
    }
    Ok(Inventory {
        name,
        file: raw.file,
        ssh,
        tls: Tls {
            public_name,
            certificate,
            key,
        },
        vars,
        groups,
        hosts,
        worker: raw.worker,
        backend: raw.backend,
        logd,
        lab,
        include_dirs: raw.include_dirs,
    })
}

fn role_names() -> Vec<&'static str> {
    Role::DECLARABLE.iter().map(|r| r.name()).collect()
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| is_label(&l.to_ascii_lowercase()))
}

fn resolve(dir: &std::path::Path, p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    dir.join(p)
}

fn merge_ssh(base: &Ssh, o: &RawSsh) -> Ssh {
    Ssh {
        user: o
            .user
            .as_ref()
            .map_or_else(|| base.user.clone(), |u| u.v.clone()),
        port: o.port.as_ref().map_or(base.port, |p| p.v as u16),
        identity_file: o
            .identity_file
            .as_ref()
            .map(|f| PathBuf::from(&f.v))
            .or_else(|| base.identity_file.clone()),
    }
}

/// Variables must be ones some role reads (a typo would otherwise be silently ignored), with a
/// value its role's constraint allows.
fn check_vars(v: &mut V<'_>, vars: &Vars, path: &str) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for (k, node) in vars {
        if !v.known_vars.contains_key(k.v.as_str()) {
            let known: Vec<&str> = v.known_vars.keys().copied().collect();
            let hint = match crate::diag::closest(&k.v, known.iter().copied()) {
                Some(c) => format!("did you mean `{c}`? `sagectl vars` lists every variable"),
                None => "no role reads it; `sagectl vars` lists every variable".to_string(),
            };
            v.err(
                &k.pos,
                &join(path, &k.v),
                format!("unknown variable `{}`", k.v),
                hint,
            );
            continue;
        }
        // The catalog gives every declared variable a type (checked when it loads).
        let c = v.types[k.v.as_str()];
        let mut d = Decoder::default();
        if c.check(&mut d, node, &join(path, &k.v)) {
            out.insert(k.v.clone(), crate::yaml::to_json(node));
        }
        v.diags.0.extend(d.diags.0);
    }
    out
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

/// `roles_complete`: every host and role was understood, so counting logd hosts means something.
fn check_logd(
    v: &mut V<'_>,
    raw: &RawInventory,
    hosts: &[Host],
    roles_complete: bool,
) -> LogdSettings {
    let l = &raw.logd;
    let mut allow = Vec::new();
    let workers: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Worker)).collect();
    for (i, a) in l.allow.iter().enumerate() {
        let path = index("logd.allow", i);
        match a.v.parse::<Cidr>() {
            Ok(c) => {
                if let Some(w) = workers.iter().find(|w| c.contains(w.address)) {
                    v.err(
                        &a.pos,
                        &path,
                        format!("{c} lets worker `{}` ({}) send logs", w.name, w.address),
                        "workers are untrusted and never write to logd: narrow the block"
                            .to_string(),
                    );
                }
                allow.push(c);
            }
            Err(e) => v.err(
                &a.pos,
                &path,
                format!("not a valid address block: {e}"),
                "write an address (10.0.0.5) or a CIDR block (10.0.0.0/24)".to_string(),
            ),
        }
    }
    let logds: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Logd)).collect();
    let mut replica = None;
    match &l.replica {
        _ if !roles_complete => {}
        Some(r) => match logds.iter().find(|h| h.name == r.v) {
            Some(_) if logds.len() == 2 => replica = Some(r.v.clone()),
            Some(_) => v.err(
                &r.pos,
                "logd.replica",
                format!(
                    "a replica needs exactly two logd hosts, found {}",
                    logds.len()
                ),
                "give the role `logd` to the primary and to the replica".to_string(),
            ),
            None => {
                let known: Vec<&str> = logds.iter().map(|h| h.name.as_str()).collect();
                v.err(
                    &r.pos,
                    "logd.replica",
                    format!("`{}` is not a host with the logd role", r.v),
                    Some(suggest(&r.v, &known)),
                );
            }
        },
        None if logds.len() > 1 => {
            let h = logds[1];
            v.err(
                &h.pos,
                &join("hosts", &h.name),
                "more than one logd host without `logd.replica`",
                "name the second logd host in `logd.replica`; at most two logd hosts".to_string(),
            );
        }
        None => {}
    }
    for a in &l.alerts {
        if let Some(h) = &a.v.host {
            if !hosts.iter().any(|x| &x.name == h) {
                v.err(
                    &a.pos,
                    "logd.alerts",
                    format!("alert `{}` names no host `{h}`", a.v.name),
                    None,
                );
            }
        }
    }
    let mut seen = BTreeSet::new();
    for a in &l.alerts {
        if !seen.insert(&a.v.name) {
            v.err(
                &a.pos,
                "logd.alerts",
                format!("two alert rules are named `{}`", a.v.name),
                None,
            );
        }
    }
    LogdSettings {
        port: l.port,
        http_port: l.http_port,
        allow,
        retention_days: l.retention_days,
        alerts: l.alerts.iter().map(|a| a.v.clone()).collect(),
        replica,
    }
}

const LAB_SUBNET_HINT: &str = "use an IPv4 block from /16 to /29, such as 10.77.0.0/24";

fn check_lab(v: &mut V<'_>, raw: &RawInventory, hosts: &[Host]) -> Option<Lab> {
    let l = raw.lab.as_ref()?;
    if !is_label(&l.suite.v) {
        v.err(
            &l.suite.pos,
            "lab.suite",
            format!("`{}` is not a Debian suite name", l.suite.v),
            "such as bookworm".to_string(),
        );
    }
    let subnet = match l.subnet.v.parse::<Cidr>() {
        Ok(c) if c.addr().is_ipv4() && c.prefix() >= 16 && c.prefix() <= 29 => c,
        Ok(c) => {
            v.err(
                &l.subnet.pos,
                "lab.subnet",
                format!("{c} cannot be a lab subnet"),
                LAB_SUBNET_HINT.to_string(),
            );
            return None;
        }
        Err(e) => {
            v.err(
                &l.subnet.pos,
                "lab.subnet",
                format!("not a valid subnet: {e}"),
                LAB_SUBNET_HINT.to_string(),
            );
            return None;
        }
    };
    let lab = Lab {
        subnet,
        suite: l.suite.v.clone(),
    };
    for h in hosts {
        let pos = raw
            .hosts
            .iter()
            .find(|r| r.name.v == h.name)
            .and_then(|r| r.address.as_ref())
            .map_or(&h.pos, |a| &a.pos);
        let bad = if !subnet.contains(h.address) {
            Some("outside the lab subnet")
        } else if h.address == subnet.nth(0).expect("non-empty") || h.address == subnet.last() {
            Some("the network or broadcast address of the lab subnet")
        } else if h.address == lab.gateway() {
            Some("the lab bridge's own address")
        } else {
            None
        };
        if let Some(why) = bad {
            v.err(
                pos,
                &join(&join("hosts", &h.name), "address"),
                format!("{} is {why} ({subnet})", h.address),
                format!(
                    "lab hosts take addresses from {} up",
                    subnet.nth(2).expect("non-empty")
                ),
            );
        }
    }
    Some(lab)
}

/// Where the inventory set a port, and its path; `None` for a default or a fixed port.
type SetAt = Option<(Pos, String)>;

/// Two services of one host must not want the same port. The services are the fixed ones of
/// each role, the agents' settings, and every port variable its role declares a `listener` for,
/// with the value the host gets (its own, else the inventory's, else the default).
fn check_ports(
    v: &mut V<'_>,
    raw: &RawInventory,
    catalog: &Catalog,
    hosts: &[Host],
    vars: &BTreeMap<String, serde_json::Value>,
) {
    for (h, rh) in hosts
        .iter()
        .filter_map(|h| Some((h, raw.hosts.iter().find(|r| r.name.v == h.name)?)))
    {
        let host_path = join("hosts", &h.name);
        let mut ports: Vec<(u16, String, SetAt)> = vec![(h.ssh.port, "ssh".into(), None)];
        let fixed = |p: u16, who: &str| (p, who.to_string(), None);
        for r in h.all_roles() {
            for (var, c) in &catalog.role(r).types {
                let Some(listener) = c.listener() else {
                    continue;
                };
                let set = |vars: &Vars, path: &str| {
                    vars.iter()
                        .find(|(k, _)| &k.v == var)
                        .map(|(k, _)| (k.pos.clone(), join(path, var)))
                };
                let given = |vars: &Vars| vars.iter().any(|(k, _)| &k.v == var);
                // The value the host gets; none when that one was invalid (and reported).
                let value = if given(&rh.vars) {
                    h.vars.get(var)
                } else if given(&raw.vars) {
                    vars.get(var)
                } else {
                    catalog.role(r).defaults.get(var)
                };
                let Some(p) = value
                    .and_then(|x| x.as_u64())
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                let at =
                    set(&rh.vars, &join(&host_path, "vars")).or_else(|| set(&raw.vars, "vars"));
                ports.push((p, format!("{listener} (`{var}`)"), at));
            }
            match r {
                Role::Loadbalancer => {
                    ports.push(fixed(80, "haproxy http"));
                    ports.push(fixed(443, "haproxy https"));
                }
                Role::Worker => ports.push(fixed(raw.worker.port, "the worker (worker.port)")),
                Role::Backend => {
                    ports.push(fixed(raw.backend.port, "the backend (backend.port)"));
                    ports.push(fixed(
                        raw.backend.worker_port,
                        "the backend (backend.worker_port)",
                    ));
                }
                Role::Logd => {
                    ports.push(fixed(raw.logd.port, "logd (logd.port)"));
                    ports.push(fixed(raw.logd.http_port, "logd (logd.http_port)"));
                }
                _ => {}
            }
        }
        let mut seen: BTreeMap<u16, (&str, &SetAt)> = BTreeMap::new();
        for (p, who, at) in &ports {
            if let Some((other, other_at)) = seen.insert(*p, (who, at)) {
                // At whichever of the two the inventory set, else at the host.
                let (pos, path) = at
                    .clone()
                    .or_else(|| other_at.clone())
                    .unwrap_or((h.pos.clone(), host_path.clone()));
                v.err(
                    &pos,
                    &path,
                    format!(
                        "port {p} is wanted by both {other} and {who} on host `{}`",
                        h.name
                    ),
                    "give one of them another port in the inventory".to_string(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_label;

    #[test]
    fn labels() {
        assert!(is_label("web1"));
        assert!(is_label("a-b"));
        assert!(!is_label("-a"));
        assert!(!is_label("Web1"));
        assert!(!is_label("a_b"));
        assert!(!is_label(""));
        assert!(!is_label(&"a".repeat(64)));
    }
}
