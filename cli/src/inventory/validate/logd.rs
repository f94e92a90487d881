//! The logd settings: the allow-list (address blocks, never covering a worker), the replica,
//! and alert rules naming hosts that exist.

use std::collections::BTreeSet;

use super::super::raw::RawInventory;
use super::super::{Cidr, Host, LogdSettings, Role};
use super::V;
use crate::diag::suggest;
use crate::yaml::{index, join};

/// `roles_complete`: every host and role was understood, so counting logd hosts means something.
pub(super) fn check_logd(
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
