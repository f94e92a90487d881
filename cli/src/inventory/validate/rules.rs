//! Rules between hosts: one or two databases, the roles each role needs somewhere, and groups
//! naming hosts that exist under names of their own.

use std::collections::{BTreeMap, BTreeSet};

use super::super::raw::RawInventory;
use super::super::{Host, Role};
use super::{LABEL_HINT, V, is_label};
use crate::diag::{Pos, suggest};
use crate::yaml::{index, join};

/// Each role that needs another somewhere, and why.
const NEEDS: [(Role, Role, &str); 7] = [
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

/// The rules between roles; `hosts_pos` is where a missing role is reported.
pub(super) fn check_roles(v: &mut V<'_>, hosts: &[Host], hosts_pos: &Pos) {
    let count = |role: Role| hosts.iter().filter(|h| h.roles.contains(&role)).count();
    match count(Role::Database) {
        1 => {}
        0 => v.err(
            hosts_pos,
            "hosts",
            "no host has the `database` role",
            "exactly one host must run PostgreSQL".to_string(),
        ),
        // Two: a primary and its standby (`database.standby`, checked with the database
        // settings).
        2 => {}
        n => {
            for h in hosts.iter().filter(|h| h.has(Role::Database)).skip(2) {
                v.err(
                    &h.pos,
                    &join("hosts", &h.name),
                    format!("{n} hosts have the `database` role"),
                    "at most two: a primary and its standby (`database.standby`)".to_string(),
                );
            }
        }
    }
    for (has, needs, why) in NEEDS {
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

/// Groups: names that are labels and not those of a host or role, members that are hosts.
/// A group may be extended by included files.
pub(super) fn check_groups(
    v: &mut V<'_>,
    raw: &RawInventory,
    names: &BTreeSet<String>,
) -> BTreeMap<String, Vec<String>> {
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
            groups.get_mut(&g.v).expect("inserted").extend(prev);
        }
    }
    groups
}
