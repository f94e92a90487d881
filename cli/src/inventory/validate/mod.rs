//! Stage two: names, addresses, roles and the rules between hosts. Every problem is collected
//! with its position and path; an [`Inventory`] comes out only when there are none. One module
//! per concern, called in a fixed order (the order problems are reported in):
//!
//! ```text
//!  validate ─┬─ name, inventory vars (vars)
//!            ├─ hosts: names, addresses, roles, host vars, SSH settings (hosts)
//!            ├─ rules between roles (rules), TLS (site), groups (rules)
//!            ├─ logd settings (logd), lab subnet and addresses (lab)
//!            └─ ports per host (vars)
//! ```

mod database;
mod hosts;
mod lab;
mod logd;
mod rules;
mod site;
mod vars;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::constraint::Constraint;
use super::raw::{RawInventory, RawSsh, Sp};
use super::{Inventory, Role, Ssh};
use crate::diag::{Diagnostics, Pos};
use crate::roles::Catalog;

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

    /// `n`'s value when `ok` accepts it; otherwise reported as not `what`, and empty.
    fn accepted(
        &mut self,
        n: &Sp<String>,
        ok: fn(&str) -> bool,
        path: &str,
        what: &str,
        hint: &str,
    ) -> String {
        if ok(&n.v) {
            return n.v.clone();
        }
        self.err(
            &n.pos,
            path,
            format!("`{}` is not {what}", n.v),
            hint.to_string(),
        );
        String::new()
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
    let catalog = Catalog::embedded().map_err(|e| e.0)?;
    let stage_one_clean = diags.is_empty();
    let mut v = V {
        diags,
        known_vars: catalog.defaults(),
        types: catalog.types(),
        reported: &raw.reported,
    };
    let name = check_name(&mut v, &raw);
    let defaults = Ssh {
        user: "root".into(),
        port: 22,
        identity_file: None,
        user_set: false,
        port_set: false,
    };
    let ssh = merge_ssh(&defaults, &raw.ssh);
    let inventory_vars = vars::check_vars(&mut v, &raw.vars, "vars");
    let hosts::Hosts {
        hosts,
        names,
        roles_known,
    } = hosts::check_hosts(&mut v, &raw, &ssh);
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
    // Every host made it, with every role understood: counting hosts by role means something.
    let roles_complete = roles_known && hosts.len() == raw.hosts.len();
    if !raw.hosts.is_empty() && stage_one_clean && roles_complete {
        rules::check_roles(&mut v, &hosts, &hosts_pos);
    }
    let tls = site::check_tls(
        &mut v,
        &raw,
        hosts.iter().any(|h| h.has(Role::Loadbalancer)),
    );
    let groups = rules::check_groups(&mut v, &raw, &names);
    let logd = logd::check_logd(&mut v, &raw, &hosts, roles_complete);
    let database = database::check_database(&mut v, &raw, &hosts, roles_complete);
    let lab = lab::check_lab(&mut v, &raw, &hosts);
    vars::check_ports(&mut v, &raw, catalog, &hosts, &inventory_vars);

    if !v.diags.is_empty() {
        return Err(v.diags);
    }
    Ok(Inventory {
        name,
        file: raw.file,
        ssh,
        tls,
        vars: inventory_vars,
        groups,
        hosts,
        worker: raw.worker,
        backend: raw.backend,
        logd,
        database,
        lab,
        include_dirs: raw.include_dirs,
    })
}

/// The inventory's name: a label (it names the state directory).
fn check_name(v: &mut V<'_>, raw: &RawInventory) -> String {
    match &raw.name {
        Some(n) => v.accepted(n, is_label, "name", "a valid inventory name", LABEL_HINT),
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
    }
}

fn role_names() -> Vec<&'static str> {
    Role::DECLARABLE.iter().map(|r| r.name()).collect()
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
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
        user_set: o.user.is_some() || base.user_set,
        port_set: o.port.is_some() || base.port_set,
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
