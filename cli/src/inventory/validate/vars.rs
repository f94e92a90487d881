//! Variables and what they configure: every variable is one some role declares, holding what
//! its constraint allows; no two services of a host want one port.

use std::collections::BTreeMap;

use super::super::raw::{RawInventory, Vars};
use super::super::{Host, Role};
use super::V;
use crate::diag::Pos;
use crate::roles::Catalog;
use crate::yaml::{Decoder, join};

/// Variables must be ones some role reads (a typo would otherwise be silently ignored), with a
/// value its role's constraint allows.
pub(super) fn check_vars(
    v: &mut V<'_>,
    vars: &Vars,
    path: &str,
) -> BTreeMap<String, serde_json::Value> {
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

/// Where the inventory set a port, and its path; `None` for a default or a fixed port.
type SetAt = Option<(Pos, String)>;

/// Two services of one host must not want the same port. The services are the fixed ones of
/// each role, the agents' settings, and every port variable its role declares a `listener` for,
/// with the value the host gets (its own, else the inventory's, else the default).
pub(super) fn check_ports(
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
