//! Desired files of a host: its roles' templates rendered with the host's variables, the
//! certificates and keys it needs from the state directory, and the static site. Rendering is
//! deterministic: the same inventory and state give the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::inventory::{Host, Inventory, Role};
use crate::pki::{PkiError, State};
use crate::roles::{Action, Attrs, Catalog, PkiItem, asset, assets_under};

/// One file as it should be on a host.
#[derive(Clone, Debug)]
pub struct DesiredFile {
    /// Absolute path on the host.
    pub path: String,
    pub attrs: Attrs,
    pub content: Vec<u8>,
    /// Holds a password or key: written 0600 locally and masked in diffs.
    pub secret: bool,
    /// Command checking the file before it goes live (`{path}` is the file).
    pub validate: Option<Vec<String>>,
    pub role: Role,
    /// The task that made it.
    pub task: String,
    pub notify: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    // The cause is in the message and not also a `source`, which `{:#}` would print again.
    #[error("host {host}: role {role}: task `{task}`: {error:#}")]
    Template {
        host: String,
        role: Role,
        task: String,
        error: minijinja::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "host {host}: role {role} installs sage-agent, and no sage-agent binary was found\n  hint: build it (`cargo build --release -p sage-agent`; it is looked for beside sagectl) or set SAGECTL_AGENT_BINARY"
    )]
    NoAgent { host: String, role: Role },
    #[error(
        "host {host}: role {role}: task `{task}`: the path `{path}` {why}\n  hint: a path made from variables must stay an absolute path to where it says"
    )]
    UnsafePath {
        host: String,
        role: Role,
        task: String,
        path: String,
        why: &'static str,
    },
    #[error("host {host}: reading the site certificate {path}: {error}")]
    SiteCert {
        host: String,
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Why a rendered path on a host is unsafe to write, if it is: not absolute, or holding a
/// `.`, `..` or empty component, a NUL or another control character. Variables are checked
/// when the inventory is validated; this is the second line, on what templates produced.
pub fn path_problem(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        return Some("is not absolute");
    }
    if p.chars().any(char::is_control) {
        return Some("holds a control character");
    }
    if p.len() > 4096 {
        return Some("is too long");
    }
    if p[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("has an empty, `.` or `..` component");
    }
    None
}

/// Host data as templates see it.
#[derive(Serialize)]
struct HostView<'a> {
    name: &'a str,
    address: String,
    roles: Vec<Role>,
    ssh_port: u16,
    vars: BTreeMap<String, serde_json::Value>,
}

/// The environment templates render in: strict undefined (a typo is an error, not an empty
/// string), no auto-escaping (these are config files, not HTML), Ansible-like whitespace.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);
    env.set_loader(|name| {
        Ok(asset(&format!("templates/{name}")).map(|b| String::from_utf8_lossy(b).into_owned()))
    });
    env
}

/// A host's variables: every role's defaults, under the inventory's, under the host's own.
pub fn host_vars(
    inv: &Inventory,
    catalog: &Catalog,
    host: &Host,
) -> BTreeMap<String, serde_json::Value> {
    host_vars_from(inv, catalog, host)
        .into_iter()
        .map(|(k, (v, _))| (k, v))
        .collect()
}

/// Where a host's variable takes its value from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarSource {
    /// The default of the role declaring it.
    Default(Role),
    /// The inventory's `vars`.
    Inventory,
    /// The host's own `vars`.
    Host,
}

impl std::fmt::Display for VarSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VarSource::Default(r) => write!(f, "default of role {r}"),
            VarSource::Inventory => f.write_str("inventory vars"),
            VarSource::Host => f.write_str("host vars"),
        }
    }
}

/// [`host_vars`] with where each value comes from.
pub fn host_vars_from(
    inv: &Inventory,
    catalog: &Catalog,
    host: &Host,
) -> BTreeMap<String, (serde_json::Value, VarSource)> {
    let mut vars = BTreeMap::new();
    for def in catalog.roles.values() {
        for (k, v) in &def.defaults {
            vars.insert(k.clone(), (v.clone(), VarSource::Default(def.role)));
        }
    }
    for (source, given) in [
        (VarSource::Inventory, &inv.vars),
        (VarSource::Host, &host.vars),
    ] {
        vars.extend(given.iter().map(|(k, v)| (k.clone(), (v.clone(), source))));
    }
    vars
}

fn view<'a>(inv: &Inventory, catalog: &Catalog, h: &'a Host) -> HostView<'a> {
    HostView {
        name: &h.name,
        address: h.address.to_string(),
        roles: h.roles.clone(),
        ssh_port: h.ssh.port,
        vars: host_vars(inv, catalog, h),
    }
}

/// The template context of `host` (without secrets).
pub fn context(inv: &Inventory, catalog: &Catalog, host: &Host) -> BTreeMap<&'static str, Value> {
    let views: Vec<HostView<'_>> = inv.hosts.iter().map(|h| view(inv, catalog, h)).collect();
    let mut role_hosts: BTreeMap<&str, Vec<&HostView<'_>>> = Role::DECLARABLE
        .iter()
        .map(|r| (r.name(), Vec::new()))
        .collect();
    for v in &views {
        for r in &v.roles {
            role_hosts.get_mut(r.name()).expect("every role").push(v);
        }
    }
    let logd_primary = inv
        .with_role(Role::Logd)
        .find(|h| Some(&h.name) != inv.logd.replica.as_ref())
        .map(|h| h.name.clone());
    let mut c = BTreeMap::new();
    c.insert(
        "inventory",
        Value::from(Serde(
            serde_json::json!({"name": inv.name, "public_name": inv.tls.public_name}),
        )),
    );
    c.insert("host", Value::from(Serde(view(inv, catalog, host))));
    c.insert("vars", Value::from(Serde(host_vars(inv, catalog, host))));
    c.insert("hosts", Value::from(Serde(&views)));
    c.insert("role_hosts", Value::from(Serde(&role_hosts)));
    c.insert("worker", Value::from(Serde(&inv.worker)));
    c.insert("backend", Value::from(Serde(&inv.backend)));
    c.insert("logd", Value::from(Serde(&inv.logd)));
    c.insert("logd_primary", Value::from(Serde(&logd_primary)));
    // The primary's and the standby's addresses, for configs naming the database.
    let db_view = |name: Option<&String>| {
        name.and_then(|n| inv.host(n))
            .map(|h| view(inv, catalog, h))
    };
    c.insert(
        "database",
        Value::from(Serde(serde_json::json!({
            "primary": db_view(Some(&inv.database.primary)),
            "standby": db_view(inv.database.standby.as_ref()),
            "backups": inv.database.backups,
            "backup_host": inv.database.backup_host(),
        }))),
    );
    c.insert("lab", Value::from(Serde(inv.lab.as_ref().map(|l| {
        serde_json::json!({"subnet": l.subnet.to_string(), "gateway": l.gateway().to_string(), "apt_proxy_port": crate::lab::APT_PROXY_PORT})
    }))));
    c
}

/// What one task wants on a host.
#[derive(Clone, Debug)]
pub enum StepKind {
    /// Debian packages (every apt task of the host is merged into one apt call).
    Packages(Vec<String>),
    User {
        name: String,
        home: String,
    },
    Dir {
        path: String,
        attrs: Attrs,
    },
    File(DesiredFile),
    /// The sage-agent binary.
    Binary {
        path: String,
        content: Arc<Vec<u8>>,
    },
    Service {
        name: String,
        enabled: bool,
        started: bool,
    },
    /// The primary's replication role, and its slot (`None`: none wanted, dropped if there).
    PgReplication {
        role: String,
        password: crate::pki::Secret,
        slot: Option<String>,
    },
    /// The standby: cloned from the primary unless `data_dir/standby.signal` exists.
    PgStandby {
        data_dir: String,
        service: String,
        conninfo: String,
        slot: String,
    },
    /// A login role with a password, and a database it owns.
    Postgres {
        database: String,
        owner: String,
        password: crate::pki::Secret,
    },
}

/// One task of one role, rendered for a host.
#[derive(Clone, Debug)]
pub struct Step {
    pub role: Role,
    pub task: String,
    pub notify: Vec<String>,
    pub kind: StepKind,
}

/// A handler of a role, rendered for a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerStep {
    pub role: Role,
    pub name: String,
    pub service: String,
    pub action: crate::roles::HandlerAction,
    /// See [`crate::roles::Handler::check_login`].
    pub check_login: bool,
}

impl HandlerStep {
    /// How a handler is named across roles (and in the host's pending-handlers file).
    pub fn key(&self) -> String {
        format!("{}:{}", self.role, self.name)
    }
}

/// Every step of `host`, in role order then task order, and its roles' handlers.
/// `agent` is the sage-agent binary, needed only by hosts with an agent role.
pub fn host_steps(
    inv: &Inventory,
    catalog: &Catalog,
    state: &State,
    host: &Host,
    agent: Option<&Arc<Vec<u8>>>,
) -> Result<(Vec<Step>, Vec<HandlerStep>), RenderError> {
    let env = environment();
    let ctx = context(inv, catalog, host);
    let mut out = Vec::new();
    let mut handlers = Vec::new();
    for role in host.all_roles() {
        let def = catalog.role(role);
        for h in &def.handlers {
            let service =
                env.render_str(&h.service, &ctx)
                    .map_err(|error| RenderError::Template {
                        host: host.name.clone(),
                        role,
                        task: format!("handler {}", h.name),
                        error,
                    })?;
            handlers.push(HandlerStep {
                role,
                name: h.name.clone(),
                service,
                action: h.action,
                check_login: h.check_login,
            });
        }
        for task in &def.tasks {
            let terr = |error| RenderError::Template {
                host: host.name.clone(),
                role,
                task: task.name.clone(),
                error,
            };
            if let Some(w) = &task.when {
                let on = env
                    .compile_expression(w)
                    .and_then(|e| e.eval(&ctx))
                    .map_err(terr)?;
                if !on.is_true() {
                    continue;
                }
            }
            let render_str = |s: &str| env.render_str(s, &ctx).map_err(terr);
            // A path on the host, rendered then checked.
            let render_path = |s: &str| {
                let p = render_str(s)?;
                match path_problem(&p) {
                    None => Ok(p),
                    Some(why) => Err(RenderError::UnsafePath {
                        host: host.name.clone(),
                        role,
                        task: task.name.clone(),
                        path: p,
                        why,
                    }),
                }
            };
            let mut push = |kind: StepKind| {
                out.push(Step {
                    role,
                    task: task.name.clone(),
                    notify: task.notify.clone(),
                    kind,
                });
            };
            let file = |path: String,
                        attrs: &Attrs,
                        content: Vec<u8>,
                        secret: bool,
                        validate: Option<Vec<String>>| {
                StepKind::File(DesiredFile {
                    path,
                    attrs: attrs.clone(),
                    content,
                    secret,
                    validate,
                    role,
                    task: task.name.clone(),
                    notify: task.notify.clone(),
                })
            };
            match &task.action {
                Action::Template {
                    src,
                    dest,
                    attrs,
                    validate,
                    secrets,
                } => {
                    let tmpl = env.get_template(src).map_err(terr)?;
                    let mut ctx = ctx.clone();
                    if *secrets {
                        let s: BTreeMap<String, String> = state
                            .secrets()?
                            .into_iter()
                            .map(|(k, v)| (k, v.expose().to_string()))
                            .collect();
                        ctx.insert("secrets", Value::from(Serde(&s)));
                    }
                    let text = tmpl.render(&ctx).map_err(terr)?;
                    push(file(
                        render_path(dest)?,
                        attrs,
                        text.into_bytes(),
                        *secrets,
                        validate.clone(),
                    ));
                }
                Action::Pki { item, dest, attrs } => {
                    let content = pki_item(inv, state, host, *item)?;
                    push(file(
                        render_path(dest)?,
                        attrs,
                        content,
                        item.is_secret(),
                        None,
                    ));
                }
                Action::StaticFiles { dest } => {
                    let dest = render_path(dest)?;
                    let attrs = Attrs {
                        mode: 0o644,
                        owner: "root".into(),
                        group: "root".into(),
                    };
                    for (rel, content) in assets_under("static/") {
                        push(file(
                            format!("{}/{rel}", dest.trim_end_matches('/')),
                            &attrs,
                            content.to_vec(),
                            false,
                            None,
                        ));
                    }
                }
                Action::Apt(pkgs) => {
                    // A name that renders empty is no package (`"{{ 'x' if ... else '' }}"`); a
                    // task left with none has nothing to do on this host.
                    let pkgs: Vec<String> = pkgs
                        .iter()
                        .map(|p| render_str(p))
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .filter(|p| !p.trim().is_empty())
                        .collect();
                    if !pkgs.is_empty() {
                        push(StepKind::Packages(pkgs));
                    }
                }
                Action::User { name, home } => push(StepKind::User {
                    name: render_str(name)?,
                    home: render_path(home)?,
                }),
                Action::Directory { path, attrs } => push(StepKind::Dir {
                    path: render_path(path)?,
                    attrs: attrs.clone(),
                }),
                Action::AgentBinary { dest } => match agent {
                    Some(content) => push(StepKind::Binary {
                        path: render_path(dest)?,
                        content: content.clone(),
                    }),
                    None => {
                        return Err(RenderError::NoAgent {
                            host: host.name.clone(),
                            role,
                        });
                    }
                },
                Action::Service {
                    name,
                    enabled,
                    started,
                } => push(StepKind::Service {
                    name: render_str(name)?,
                    enabled: *enabled,
                    started: *started,
                }),
                Action::PostgresReplication {
                    role,
                    password_secret,
                    slot,
                } => {
                    let password = state
                        .secrets()?
                        .get(password_secret)
                        .cloned()
                        .expect("catalog checks secret names");
                    push(StepKind::PgReplication {
                        role: render_str(role)?,
                        password,
                        slot: match inv.database.standby {
                            Some(_) => Some(render_str(slot)?),
                            None => None,
                        },
                    });
                }
                Action::PostgresStandby {
                    data_dir,
                    service,
                    conninfo,
                    slot,
                } => push(StepKind::PgStandby {
                    data_dir: render_path(data_dir)?,
                    service: render_str(service)?,
                    conninfo: render_str(conninfo)?,
                    slot: render_str(slot)?,
                }),
                Action::PostgresDatabase {
                    name,
                    owner,
                    password_secret,
                } => {
                    let secrets = state.secrets()?;
                    let password = secrets
                        .get(password_secret)
                        .cloned()
                        .expect("catalog checks secret names");
                    push(StepKind::Postgres {
                        database: render_str(name)?,
                        owner: render_str(owner)?,
                        password,
                    });
                }
            }
        }
    }
    Ok((out, handlers))
}

/// Every file `host` should have, in role order then task order.
pub fn host_files(
    inv: &Inventory,
    catalog: &Catalog,
    state: &State,
    host: &Host,
) -> Result<Vec<DesiredFile>, RenderError> {
    let placeholder = Arc::new(Vec::new());
    let (steps, _) = host_steps(inv, catalog, state, host, Some(&placeholder))?;
    Ok(steps
        .into_iter()
        .filter_map(|s| match s.kind {
            StepKind::File(f) => Some(f),
            _ => None,
        })
        .collect())
}

fn pki_item(
    inv: &Inventory,
    state: &State,
    host: &Host,
    item: PkiItem,
) -> Result<Vec<u8>, RenderError> {
    Ok(match item {
        PkiItem::CaCert => state.ca_cert_pem().as_bytes().to_vec(),
        PkiItem::HostCert => crate::pki::host(state, host)?.chain_pem.into_bytes(),
        PkiItem::HostKey => crate::pki::host(state, host)?
            .key_pem
            .expose()
            .as_bytes()
            .to_vec(),
        PkiItem::HostPem => {
            let c = crate::pki::host(state, host)?;
            format!("{}{}", c.chain_pem, c.key_pem.expose()).into_bytes()
        }
        PkiItem::SitePem => match (&inv.tls.certificate, &inv.tls.key) {
            (Some(c), Some(k)) => {
                let read = |p: &std::path::PathBuf| {
                    let cap = crate::inventory::files::MAX_INVENTORY_FILE;
                    crate::inventory::files::read_regular(p, cap).map_err(|error| {
                        RenderError::SiteCert {
                            host: host.name.clone(),
                            path: p.clone(),
                            error,
                        }
                    })
                };
                let mut v = read(c)?;
                if !v.ends_with(b"\n") {
                    v.push(b'\n');
                }
                v.extend(read(k)?);
                v
            }
            _ => {
                let c = crate::pki::site(state, inv)?;
                format!("{}{}", c.chain_pem, c.key_pem.expose()).into_bytes()
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::path_problem;

    #[test]
    fn errors_print_their_cause_once() {
        let e = super::RenderError::SiteCert {
            host: "lb".into(),
            path: "site.crt".into(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            "host lb: reading the site certificate site.crt: gone"
        );
    }

    #[test]
    fn rendered_paths_must_stay_where_they_say() {
        assert_eq!(
            path_problem("/etc/postgresql/15/main/postgresql.conf"),
            None
        );
        for bad in [
            "/etc/postgresql/../../../../ESCAPED/main/postgresql.conf",
            "/../../ESCAPED2/site",
            "/a/./b",
            "/a//b",
            "/a/",
            "relative/x",
            "/a\0b",
            "/a\nb",
        ] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
    }
}
