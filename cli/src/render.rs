//! Desired files of a host: its roles' templates rendered with the host's variables, the
//! certificates and keys it needs from the state directory, and the static site. Rendering is
//! deterministic: the same inventory and state give the same bytes.

use std::collections::BTreeMap;

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
    #[error("host {host}: role {role}: task `{task}`: {source:#}")]
    Template {
        host: String,
        role: Role,
        task: String,
        source: minijinja::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("host {host}: reading the site certificate {path}: {source}")]
    SiteCert {
        host: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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
    let mut vars: BTreeMap<String, serde_json::Value> = catalog
        .defaults()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    vars.extend(inv.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.extend(host.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
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
    c.insert("lab", Value::from(Serde(inv.lab.as_ref().map(|l| {
        serde_json::json!({"subnet": l.subnet.to_string(), "gateway": l.gateway().to_string(), "apt_proxy_port": crate::lab::APT_PROXY_PORT})
    }))));
    c
}

/// Every file `host` should have, in role order then task order.
pub fn host_files(
    inv: &Inventory,
    catalog: &Catalog,
    state: &State,
    host: &Host,
) -> Result<Vec<DesiredFile>, RenderError> {
    let env = environment();
    let ctx = context(inv, catalog, host);
    let mut out = Vec::new();
    for role in host.all_roles() {
        for task in &catalog.role(role).tasks {
            let terr = |source| RenderError::Template {
                host: host.name.clone(),
                role,
                task: task.name.clone(),
                source,
            };
            let render_str = |s: &str| env.render_str(s, &ctx).map_err(terr);
            let mut push = |path: String,
                            attrs: &Attrs,
                            content: Vec<u8>,
                            secret: bool,
                            validate: Option<Vec<String>>| {
                out.push(DesiredFile {
                    path,
                    attrs: attrs.clone(),
                    content,
                    secret,
                    validate,
                    role,
                    task: task.name.clone(),
                    notify: task.notify.clone(),
                });
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
                    push(
                        render_str(dest)?,
                        attrs,
                        text.into_bytes(),
                        *secrets,
                        validate.clone(),
                    );
                }
                Action::Pki { item, dest, attrs } => {
                    let content = pki_item(inv, state, host, *item)?;
                    push(render_str(dest)?, attrs, content, item.is_secret(), None);
                }
                Action::StaticFiles { dest } => {
                    let dest = render_str(dest)?;
                    let attrs = Attrs {
                        mode: 0o644,
                        owner: "root".into(),
                        group: "root".into(),
                    };
                    for (rel, content) in assets_under("static/") {
                        push(
                            format!("{}/{rel}", dest.trim_end_matches('/')),
                            &attrs,
                            content.to_vec(),
                            false,
                            None,
                        );
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn pki_item(
    inv: &Inventory,
    state: &State,
    host: &Host,
    item: PkiItem,
) -> Result<Vec<u8>, RenderError> {
    Ok(match item {
        PkiItem::CaCert => state.ca_cert_pem().as_bytes().to_vec(),
        PkiItem::HostCert => state.host(inv, host)?.chain_pem.into_bytes(),
        PkiItem::HostKey => state.host(inv, host)?.key_pem.expose().as_bytes().to_vec(),
        PkiItem::HostPem => {
            let c = state.host(inv, host)?;
            format!("{}{}", c.chain_pem, c.key_pem.expose()).into_bytes()
        }
        PkiItem::SitePem => match (&inv.tls.certificate, &inv.tls.key) {
            (Some(c), Some(k)) => {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p).map_err(|source| RenderError::SiteCert {
                        host: host.name.clone(),
                        path: p.clone(),
                        source,
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
                let c = state.host(inv, host)?;
                format!("{}{}", c.chain_pem, c.key_pem.expose()).into_bytes()
            }
        },
    })
}
