//! Plan: a host's steps against its facts give, for each step, either nothing to do (with the
//! reason) or the change to make. Pure: facts in, changes out, so every case is a unit test.

use std::collections::HashSet;
use std::sync::Arc;

use crate::facts::{Facts, Query};
use crate::inventory::Role;
use crate::pki::Secret;
use crate::render::{HandlerStep, Step, StepKind};
use crate::roles::Attrs;

/// What one step will do.
#[derive(Clone, Debug)]
pub enum Change {
    /// Nothing to do, and why.
    None(String),
    /// One apt call for every missing package of the host.
    Install(Vec<String>),
    User {
        name: String,
        home: String,
    },
    MakeDir {
        path: String,
        attrs: Attrs,
    },
    /// Only mode or ownership differ.
    FixAttrs {
        path: String,
        attrs: Attrs,
    },
    /// New or different content.
    Upload(Upload),
    Unit {
        name: String,
        enable: bool,
        start: bool,
    },
    Postgres {
        database: String,
        owner: String,
        password: Secret,
    },
    /// Set the replication role's password (making it) and the slot as wanted.
    PgReplication {
        role: String,
        password: Secret,
        /// Make this slot (a standby is declared).
        make_slot: Option<String>,
        /// Drop these slots: not wanted, or lost (the standby must be cloned again).
        drop_slots: Vec<String>,
    },
    /// Clone the primary into the data directory (the old one moved aside).
    PgStandby {
        data_dir: String,
        service: String,
        conninfo: String,
        slot: String,
    },
}

#[derive(Clone, Debug)]
pub struct Upload {
    pub path: String,
    pub attrs: Attrs,
    pub content: Arc<Vec<u8>>,
    pub secret: bool,
    pub validate: Option<Vec<String>>,
    /// The file's sha256 on the host now (`None`: missing).
    pub old_sha: Option<String>,
}

impl Change {
    pub fn is_change(&self) -> bool {
        !matches!(self, Change::None(_))
    }

    /// One line saying what happens.
    pub fn describe(&self) -> String {
        match self {
            Change::None(why) => format!("ok: {why}"),
            Change::Install(p) => format!("install {}", p.join(" ")),
            Change::User { name, .. } => format!("create user {name}"),
            Change::MakeDir { path, attrs } => format!(
                "create directory {path} ({:04o} {}:{})",
                attrs.mode, attrs.owner, attrs.group
            ),
            Change::FixAttrs { path, attrs } => format!(
                "set {path} to {:04o} {}:{}",
                attrs.mode, attrs.owner, attrs.group
            ),
            Change::Upload(u) => format!(
                "{} {}",
                if u.old_sha.is_some() {
                    "update"
                } else {
                    "create"
                },
                u.path
            ),
            Change::Unit {
                name,
                enable,
                start,
            } => {
                let mut v = Vec::new();
                if *enable {
                    v.push("enable");
                }
                if *start {
                    v.push("start");
                }
                format!("{} {name}", v.join(" and "))
            }
            Change::Postgres {
                database, owner, ..
            } => format!("set up role {owner} and database {database}"),
            Change::PgReplication {
                role,
                make_slot,
                drop_slots,
                ..
            } => {
                let mut v = vec![format!("set up replication role {role}")];
                if let Some(s) = make_slot {
                    v.push(format!("make replication slot {s}"));
                }
                for s in drop_slots {
                    v.push(format!("drop replication slot {s}"));
                }
                v.join(", ")
            }
            Change::PgStandby { data_dir, .. } => format!(
                "clone the primary into {data_dir} as a streaming standby (what is there now is moved aside, not removed)"
            ),
        }
    }
}

/// One planned step.
#[derive(Clone, Debug)]
pub struct Item {
    pub role: Role,
    pub task: String,
    pub notify: Vec<String>,
    pub change: Change,
}

#[derive(Clone, Debug)]
pub struct HostPlan {
    pub items: Vec<Item>,
    pub handlers: Vec<HandlerStep>,
    /// Handlers an earlier run notified and could not run (replayed this time).
    pub pending: Vec<String>,
}

impl HostPlan {
    pub fn changes(&self) -> usize {
        self.items.iter().filter(|i| i.change.is_change()).count()
    }
}

/// What facts the plan of `steps` needs.
pub fn query(steps: &[Step]) -> Query {
    let mut q = Query::default();
    for s in steps {
        match &s.kind {
            StepKind::Packages(p) => q.packages.extend(p.iter().cloned()),
            StepKind::User { name, .. } => {
                q.users.insert(name.clone());
            }
            StepKind::Dir { path, .. } => {
                q.dirs.insert(path.clone());
            }
            StepKind::File(f) => {
                q.files.insert(f.path.clone());
            }
            StepKind::Binary { path, .. } => {
                q.files.insert(path.clone());
            }
            StepKind::Service { name, .. } => {
                q.units.insert(name.clone());
            }
            StepKind::Postgres { .. } | StepKind::PgReplication { .. } => q.postgres = true,
            StepKind::PgStandby { data_dir, .. } => {
                q.files.insert(format!("{data_dir}/standby.signal"));
            }
        }
    }
    q
}

/// Hex sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file_change(
    path: &str,
    attrs: &Attrs,
    content: Arc<Vec<u8>>,
    secret: bool,
    validate: Option<Vec<String>>,
    facts: &Facts,
) -> Change {
    let want = sha256(&content);
    match facts.files.get(path).cloned().flatten() {
        Some(f) if f.sha256 == want => {
            if f.mode == attrs.mode && f.owner == attrs.owner && f.group == attrs.group {
                Change::None(format!("{path} is up to date"))
            } else {
                Change::FixAttrs {
                    path: path.to_string(),
                    attrs: attrs.clone(),
                }
            }
        }
        other => Change::Upload(Upload {
            path: path.to_string(),
            attrs: attrs.clone(),
            content,
            secret,
            validate,
            old_sha: other.map(|f| f.sha256),
        }),
    }
}

const ENABLED: [&str; 6] = [
    "enabled",
    "enabled-runtime",
    "static",
    "indirect",
    "generated",
    "alias",
];

/// Plans `steps` against `facts`.
pub fn plan(steps: &[Step], handlers: &[HandlerStep], facts: &Facts) -> HostPlan {
    // Every missing package goes into the first apt step.
    let mut missing: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for s in steps {
        if let StepKind::Packages(p) = &s.kind {
            for pkg in p {
                if !facts.packages.contains_key(pkg) && seen.insert(pkg.clone()) {
                    missing.push(pkg.clone());
                }
            }
        }
    }
    let mut install_done = false;
    let mut items = Vec::new();
    for s in steps {
        let change = match &s.kind {
            StepKind::Packages(p) => {
                if !missing.is_empty() && !install_done {
                    install_done = true;
                    Change::Install(missing.clone())
                } else {
                    Change::None(format!("{} installed", p.join(", ")))
                }
            }
            StepKind::User { name, home } => match facts.users.get(name) {
                Some(Some(_)) => Change::None(format!("user {name} exists")),
                _ => Change::User {
                    name: name.clone(),
                    home: home.clone(),
                },
            },
            StepKind::Dir { path, attrs } => match facts.dirs.get(path).cloned().flatten() {
                None => Change::MakeDir {
                    path: path.clone(),
                    attrs: attrs.clone(),
                },
                Some(d)
                    if d.mode == attrs.mode && d.owner == attrs.owner && d.group == attrs.group =>
                {
                    Change::None(format!("{path} exists"))
                }
                Some(_) => Change::FixAttrs {
                    path: path.clone(),
                    attrs: attrs.clone(),
                },
            },
            StepKind::File(f) => file_change(
                &f.path,
                &f.attrs,
                Arc::new(f.content.clone()),
                f.secret,
                f.validate.clone(),
                facts,
            ),
            StepKind::Binary { path, content } => {
                let attrs = Attrs {
                    mode: 0o755,
                    owner: "root".into(),
                    group: "root".into(),
                };
                file_change(path, &attrs, content.clone(), false, None, facts)
            }
            StepKind::Service {
                name,
                enabled,
                started,
            } => {
                let u = facts.units.get(name).cloned().unwrap_or_default();
                let enable = *enabled && !ENABLED.contains(&u.enabled.as_str());
                let start = *started && u.active != "active";
                if enable || start {
                    Change::Unit {
                        name: name.clone(),
                        enable,
                        start,
                    }
                } else {
                    Change::None(format!("{name} is enabled and running"))
                }
            }
            StepKind::Postgres {
                database,
                owner,
                password,
            } => {
                let ready = facts.pg_roles.as_ref().is_some_and(|roles| {
                    roles
                        .get(owner)
                        .is_some_and(|v| crate::scram::matches(v, password.expose()))
                        && facts.pg_databases.get(database) == Some(owner)
                });
                if ready {
                    Change::None(format!("role {owner} has its password and owns {database}"))
                } else {
                    Change::Postgres {
                        database: database.clone(),
                        owner: owner.clone(),
                        password: password.clone(),
                    }
                }
            }
            StepKind::PgReplication {
                role,
                password,
                slot,
            } => {
                let role_ok = facts.pg_replication_roles.contains(role)
                    && facts.pg_roles.as_ref().is_some_and(|roles| {
                        roles
                            .get(role)
                            .is_some_and(|v| crate::scram::matches(v, password.expose()))
                    });
                // A slot the standby can no longer use (its WAL gone) is dropped and made
                // again; the standby then needs a fresh clone (`sagectl up` makes one when it
                // finds no `standby.signal`: the operator removes it, see README).
                let drop_slots: Vec<String> = facts
                    .pg_slots
                    .iter()
                    .filter(|(name, status)| {
                        name.starts_with("sagews_")
                            && (Some(*name) != slot.as_ref() || status.as_str() == "lost")
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                let make_slot = slot
                    .as_ref()
                    .filter(|s| !facts.pg_slots.contains_key(*s) || drop_slots.contains(s))
                    .cloned();
                if role_ok && make_slot.is_none() && drop_slots.is_empty() {
                    Change::None(match slot {
                        Some(s) => format!("replication role {role} and slot {s} are there"),
                        None => format!("replication role {role} is there, no slot held"),
                    })
                } else {
                    Change::PgReplication {
                        role: role.clone(),
                        password: password.clone(),
                        make_slot,
                        drop_slots,
                    }
                }
            }
            StepKind::PgStandby {
                data_dir,
                service,
                conninfo,
                slot,
            } => {
                if matches!(
                    facts.files.get(&format!("{data_dir}/standby.signal")),
                    Some(Some(_))
                ) {
                    Change::None(format!("{data_dir} is a standby (standby.signal)"))
                } else {
                    Change::PgStandby {
                        data_dir: data_dir.clone(),
                        service: service.clone(),
                        conninfo: conninfo.clone(),
                        slot: slot.clone(),
                    }
                }
            }
        };
        items.push(Item {
            role: s.role,
            task: s.task.clone(),
            notify: s.notify.clone(),
            change,
        });
    }
    HostPlan {
        items,
        handlers: handlers.to_vec(),
        pending: facts.pending.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{FileFact, UnitFact};
    use crate::render::DesiredFile;

    fn step(kind: StepKind) -> Step {
        Step {
            role: Role::Loadbalancer,
            task: "t".into(),
            notify: vec!["reload haproxy".into()],
            kind,
        }
    }

    fn file(path: &str, content: &str) -> StepKind {
        StepKind::File(DesiredFile {
            path: path.into(),
            attrs: Attrs {
                mode: 0o644,
                owner: "root".into(),
                group: "root".into(),
            },
            content: content.as_bytes().to_vec(),
            secret: false,
            validate: None,
            role: Role::Loadbalancer,
            task: "t".into(),
            notify: vec![],
        })
    }

    #[test]
    fn fresh_host_installs_everything_once() {
        let steps = vec![
            step(StepKind::Packages(vec!["nftables".into()])),
            step(StepKind::Packages(vec!["haproxy".into(), "curl".into()])),
            step(file("/etc/haproxy/haproxy.cfg", "x")),
            step(StepKind::Service {
                name: "haproxy".into(),
                enabled: true,
                started: true,
            }),
        ];
        let p = plan(&steps, &[], &Facts::default());
        let c: Vec<String> = p.items.iter().map(|i| i.change.describe()).collect();
        assert_eq!(
            c,
            [
                "install nftables haproxy curl",
                "ok: haproxy, curl installed",
                "create /etc/haproxy/haproxy.cfg",
                "enable and start haproxy"
            ]
        );
        assert_eq!(p.changes(), 3);
    }

    #[test]
    fn converged_host_changes_nothing() {
        let mut f = Facts::default();
        f.packages.insert("haproxy".into(), "2.6".into());
        f.files.insert(
            "/etc/haproxy/haproxy.cfg".into(),
            Some(FileFact {
                sha256: sha256(b"x"),
                mode: 0o644,
                owner: "root".into(),
                group: "root".into(),
            }),
        );
        f.units.insert(
            "haproxy".into(),
            UnitFact {
                enabled: "enabled".into(),
                active: "active".into(),
            },
        );
        let steps = vec![
            step(StepKind::Packages(vec!["haproxy".into()])),
            step(file("/etc/haproxy/haproxy.cfg", "x")),
            step(StepKind::Service {
                name: "haproxy".into(),
                enabled: true,
                started: true,
            }),
        ];
        let p = plan(&steps, &[], &f);
        assert_eq!(p.changes(), 0, "{:?}", p.items);

        // Mode only: attributes fixed, content not uploaded.
        f.files
            .get_mut("/etc/haproxy/haproxy.cfg")
            .unwrap()
            .as_mut()
            .unwrap()
            .mode = 0o600;
        let p = plan(&steps, &[], &f);
        assert!(matches!(p.items[1].change, Change::FixAttrs { .. }));

        // Content differs: upload, with the old checksum kept for --diff.
        let steps2 = vec![step(file("/etc/haproxy/haproxy.cfg", "y"))];
        let p = plan(&steps2, &[], &f);
        let Change::Upload(u) = &p.items[0].change else {
            panic!()
        };
        assert_eq!(u.old_sha.as_deref(), Some(sha256(b"x").as_str()));
    }

    #[test]
    fn units_start_and_postgres_checks_the_verifier() {
        let steps = vec![
            step(StepKind::Service {
                name: "sage-worker".into(),
                enabled: true,
                started: true,
            }),
            step(StepKind::Postgres {
                database: "sagews".into(),
                owner: "sagews_backend".into(),
                password: test_secret("pw"),
            }),
        ];
        let mut f = Facts::default();
        let p = plan(&steps, &[], &f);
        assert_eq!(p.items[0].change.describe(), "enable and start sage-worker");
        assert!(matches!(p.items[1].change, Change::Postgres { .. }));
        f.pg_roles = Some(
            [(
                "sagews_backend".to_string(),
                crate::scram::verifier("pw", b"salt"),
            )]
            .into(),
        );
        f.pg_databases
            .insert("sagews".into(), "sagews_backend".into());
        let p = plan(&steps, &[], &f);
        assert_eq!(p.items[0].change.describe(), "enable and start sage-worker");
        assert_eq!(
            p.items[1].change.describe(),
            "ok: role sagews_backend has its password and owns sagews"
        );
        f.pg_roles = Some(
            [(
                "sagews_backend".to_string(),
                crate::scram::verifier("old", b"salt"),
            )]
            .into(),
        );
        assert!(matches!(
            plan(&steps, &[], &f).items[1].change,
            Change::Postgres { .. }
        ));
    }

    fn test_secret(s: &str) -> Secret {
        crate::pki::Secret::new_for_tests(s)
    }
}
