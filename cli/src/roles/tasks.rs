//! A role's tasks and handlers (`tasks/main.yaml`, `handlers/main.yaml`): each task one typed
//! action, with the modes of files holding secrets checked.

use super::{
    Action, Attrs, Handler, HandlerAction, PkiItem, Task, known_secret, one_of, req_string,
};
use crate::diag::suggest;
use crate::yaml::{Decoder, Fields, Node};

const ACTIONS: &[&str] = &[
    "apt",
    "user",
    "directory",
    "template",
    "pki",
    "static_files",
    "agent_binary",
    "postgres_database",
    "postgres_replication",
    "postgres_standby",
    "service",
];

pub(super) fn task(d: &mut Decoder, node: &Node, path: &str) -> Option<Task> {
    let mut keys = vec!["name", "notify", "when"];
    keys.extend_from_slice(ACTIONS);
    let f = d.fields(node, path, &keys)?;
    let name = req_string(d, &f, "name")?;
    let notify = f
        .get("notify")
        .map(|n| {
            d.strings(n, &f.path_of("notify"))
                .unwrap_or_default()
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        })
        .unwrap_or_default();
    let when = match f.get("when") {
        Some(n) => Some(d.string(n, &f.path_of("when"))?),
        None => None,
    };
    let (kind, body, p) = one_of(d, &f, ACTIONS, "a task needs exactly one action")?;
    let action = match kind {
        "apt" => Action::Apt(d.strings(body, &p)?.into_iter().map(|(s, _)| s).collect()),
        "user" => {
            let f = d.fields(body, &p, &["name", "home"])?;
            Action::User {
                name: req_string(d, &f, "name")?,
                home: req_string(d, &f, "home")?,
            }
        }
        "directory" => {
            let f = d.fields(body, &p, &["path", "mode", "owner", "group"])?;
            Action::Directory {
                path: req_string(d, &f, "path")?,
                attrs: attrs(d, &f, 0o755)?,
            }
        }
        "template" => {
            let f = d.fields(
                body,
                &p,
                &[
                    "src", "dest", "mode", "owner", "group", "validate", "secrets",
                ],
            )?;
            let validate = match f.get("validate") {
                Some(v) => Some(
                    d.strings(v, &f.path_of("validate"))?
                        .into_iter()
                        .map(|(s, _)| s)
                        .collect(),
                ),
                None => None,
            };
            let secrets = match f.get("secrets") {
                Some(v) => d.bool(v, &f.path_of("secrets"))?,
                None => false,
            };
            let attrs = attrs(d, &f, if secrets { 0o600 } else { 0o644 })?;
            if secrets && !private_mode_ok(&attrs) {
                d.error(
                    body,
                    &p,
                    "a template with secrets must not be readable by others",
                    Some(PRIVATE_HINT.into()),
                );
            }
            Action::Template {
                src: req_string(d, &f, "src")?,
                dest: req_string(d, &f, "dest")?,
                attrs,
                validate,
                secrets,
            }
        }
        "pki" => {
            let f = d.fields(body, &p, &["item", "dest", "mode", "owner", "group"])?;
            let item_name = req_string(d, &f, "item")?;
            let Some(item) = PkiItem::from_name(&item_name) else {
                d.error(
                    body,
                    &f.path_of("item"),
                    format!("unknown pki item `{item_name}`"),
                    Some(suggest(&item_name, &PkiItem::NAMES)),
                );
                return None;
            };
            let attrs = attrs(d, &f, if item.is_secret() { 0o600 } else { 0o644 })?;
            if item.is_secret() && !private_mode_ok(&attrs) {
                d.error(
                    body,
                    &p,
                    "a private key must not be readable by others",
                    Some(PRIVATE_HINT.into()),
                );
            }
            Action::Pki {
                item,
                dest: req_string(d, &f, "dest")?,
                attrs,
            }
        }
        "static_files" => {
            let f = d.fields(body, &p, &["dest"])?;
            Action::StaticFiles {
                dest: req_string(d, &f, "dest")?,
            }
        }
        "agent_binary" => {
            let f = d.fields(body, &p, &["dest"])?;
            Action::AgentBinary {
                dest: req_string(d, &f, "dest")?,
            }
        }
        "postgres_database" => {
            let f = d.fields(body, &p, &["name", "owner", "password_secret"])?;
            let secret = req_string(d, &f, "password_secret")?;
            known_secret(d, body, &f, &secret);
            Action::PostgresDatabase {
                name: req_string(d, &f, "name")?,
                owner: req_string(d, &f, "owner")?,
                password_secret: secret,
            }
        }
        "postgres_replication" => {
            let f = d.fields(body, &p, &["role", "password_secret", "slot"])?;
            let secret = req_string(d, &f, "password_secret")?;
            known_secret(d, body, &f, &secret);
            Action::PostgresReplication {
                role: req_string(d, &f, "role")?,
                password_secret: secret,
                slot: req_string(d, &f, "slot")?,
            }
        }
        "postgres_standby" => {
            let f = d.fields(body, &p, &["data_dir", "service", "conninfo", "slot"])?;
            Action::PostgresStandby {
                data_dir: req_string(d, &f, "data_dir")?,
                service: req_string(d, &f, "service")?,
                conninfo: req_string(d, &f, "conninfo")?,
                slot: req_string(d, &f, "slot")?,
            }
        }
        "service" => {
            let f = d.fields(body, &p, &["name", "enabled", "started"])?;
            let enabled = f
                .get("enabled")
                .map_or(Some(true), |n| d.bool(n, &f.path_of("enabled")))?;
            let started = f
                .get("started")
                .map_or(Some(true), |n| d.bool(n, &f.path_of("started")))?;
            Action::Service {
                name: req_string(d, &f, "name")?,
                enabled,
                started,
            }
        }
        _ => unreachable!("ACTIONS lists every arm"),
    };
    Some(Task {
        name,
        action,
        notify,
        when,
    })
}

pub(super) fn handler(d: &mut Decoder, node: &Node, path: &str) -> Option<Handler> {
    let f = d.fields(node, path, &["name", "restart", "reload", "check_login"])?;
    let name = req_string(d, &f, "name")?;
    let (action, key) = match (f.get("restart"), f.get("reload")) {
        (Some(_), None) => (HandlerAction::Restart, "restart"),
        (None, Some(_)) => (HandlerAction::Reload, "reload"),
        _ => {
            d.error(
                node,
                path,
                "a handler needs exactly one of `restart` or `reload`",
                None,
            );
            return None;
        }
    };
    let check_login = match f.get("check_login") {
        Some(v) => d.bool(v, &f.path_of("check_login"))?,
        None => false,
    };
    Some(Handler {
        name,
        service: req_string(d, &f, key)?,
        action,
        check_login,
    })
}

const PRIVATE_HINT: &str = "use mode 0600, or 0640 with the service's own group";

/// A file holding secrets: nothing for others, and group access only for a service's own group.
fn private_mode_ok(a: &Attrs) -> bool {
    a.mode & 0o007 == 0 && (a.mode & 0o070 == 0 || a.group != "root")
}

fn attrs(d: &mut Decoder, f: &Fields<'_>, default_mode: u32) -> Option<Attrs> {
    let mode = match f.get("mode") {
        Some(n) => {
            let s = d.string(n, &f.path_of("mode"))?;
            match u32::from_str_radix(&s, 8) {
                Ok(m) if m <= 0o7777 && s.len() == 4 => m,
                _ => {
                    d.error(
                        n,
                        &f.path_of("mode"),
                        format!("`{s}` is not a file mode"),
                        Some("write four octal digits in quotes, like \"0644\"".into()),
                    );
                    return None;
                }
            }
        }
        None => default_mode,
    };
    let owner = match f.get("owner") {
        Some(n) => d.string(n, &f.path_of("owner"))?,
        None => "root".into(),
    };
    let group = match f.get("group") {
        Some(n) => d.string(n, &f.path_of("group"))?,
        None => owner.clone(),
    };
    Some(Attrs { mode, owner, group })
}
