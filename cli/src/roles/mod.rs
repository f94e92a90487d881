//! Roles as data: `roles/<role>/{tasks,handlers,defaults}/main.yaml` (Ansible's layout) and the
//! templates they name, embedded in the binary at build time and interpreted here. A role's tasks
//! are a list of typed actions; this module parses and checks them (unknown keys, missing
//! templates, notify naming no handler, health checks that do not compile) so a broken role
//! fails the tests, not a deploy. The catalog is loaded once per process ([`Catalog::embedded`]).

pub mod health;
mod tasks;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::diag::{Diagnostics, suggest};
use crate::inventory::Role;
use crate::inventory::constraint::Constraint;
use crate::yaml::{self, Decoder, Fields, Node, index, join};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// An embedded file by its path relative to the workspace (`templates/haproxy.cfg.j2`).
pub fn asset(path: &str) -> Option<&'static [u8]> {
    assets::FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, c)| *c)
}

/// Embedded files under a directory prefix (`static/`), with paths relative to it.
pub fn assets_under(prefix: &str) -> impl Iterator<Item = (&'static str, &'static [u8])> + '_ {
    assets::FILES
        .iter()
        .filter_map(move |(p, c)| p.strip_prefix(prefix).map(|rel| (rel, *c)))
}

/// Ownership and permissions of a managed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

/// Certificates and keys from the state directory that a role installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkiItem {
    /// The deployment's CA certificate.
    CaCert,
    /// The host's certificate followed by the CA's.
    HostCert,
    /// The host's private key.
    HostKey,
    /// The host's chain then its key in one file (HAProxy's client certificate).
    HostPem,
    /// HAProxy's bundle for the public site: chain then key (the user's own when given).
    SitePem,
}

impl PkiItem {
    const NAMES: [&'static str; 5] = ["ca_cert", "host_cert", "host_key", "host_pem", "site_pem"];

    fn from_name(s: &str) -> Option<PkiItem> {
        Some(match s {
            "ca_cert" => PkiItem::CaCert,
            "host_cert" => PkiItem::HostCert,
            "host_key" => PkiItem::HostKey,
            "host_pem" => PkiItem::HostPem,
            "site_pem" => PkiItem::SitePem,
            _ => return None,
        })
    }

    /// Whether the item is secret (rendered 0600, masked in diffs).
    pub fn is_secret(self) -> bool {
        matches!(self, PkiItem::HostKey | PkiItem::HostPem | PkiItem::SitePem)
    }
}

/// What a task does. Paths may hold template expressions (`{{ vars.pg_version }}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Debian packages installed with one apt call per host.
    Apt(Vec<String>),
    /// A system user (and its group of the same name).
    User {
        name: String,
        home: String,
    },
    Directory {
        path: String,
        attrs: Attrs,
    },
    /// A file rendered from `templates/<src>`. `secrets` gives the template the generated
    /// passwords; only such files may contain them. `validate` runs on the uploaded temp file,
    /// `{path}` standing for it, before it replaces the live one.
    Template {
        src: String,
        dest: String,
        attrs: Attrs,
        validate: Option<Vec<String>>,
        secrets: bool,
    },
    Pki {
        item: PkiItem,
        dest: String,
        attrs: Attrs,
    },
    /// The embedded `static/` tree copied under `dest`.
    StaticFiles {
        dest: String,
    },
    /// The sage-agent binary sagectl was built with.
    AgentBinary {
        dest: String,
    },
    /// A PostgreSQL login role with a generated password (one of `pki::SECRET_NAMES`), and a
    /// database it owns.
    PostgresDatabase {
        name: String,
        owner: String,
        password_secret: String,
    },
    /// On the primary: a replication role with a generated password, and a physical
    /// replication slot when the inventory has a standby (dropped when it has none, so no WAL
    /// is held for a standby that is gone).
    PostgresReplication {
        role: String,
        password_secret: String,
        slot: String,
    },
    /// On the standby: a copy of the primary (pg_basebackup over `conninfo` through `slot`)
    /// kept in recovery by `standby.signal`; made when the data directory has no such file
    /// (a fresh host, or a former primary: its data is moved aside, never removed).
    PostgresStandby {
        data_dir: String,
        service: String,
        conninfo: String,
        slot: String,
    },
    Service {
        name: String,
        enabled: bool,
        started: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub action: Action,
    /// Handlers to run once at the end of the host's run when this task changed something.
    pub notify: Vec<String>,
    /// An expression in the host's template context; the task is for hosts where it is true.
    pub when: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerAction {
    Restart,
    Reload,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    pub service: String,
    pub action: HandlerAction,
    /// After running it, a fresh SSH login must succeed, or the files that notified it are
    /// put back and it runs again (for sshd's own configuration: never lock sagectl out).
    pub check_login: bool,
}

#[derive(Clone, Debug)]
pub struct RoleDef {
    pub role: Role,
    pub tasks: Vec<Task>,
    pub handlers: Vec<Handler>,
    /// Variables the role reads, with their defaults.
    pub defaults: BTreeMap<String, serde_json::Value>,
    /// What each of those variables may hold (the defaults file's `_types:`).
    pub types: BTreeMap<String, Constraint>,
    /// Checks its hosts must pass after a run (`health/main.yaml`).
    pub health: Vec<health::HealthCheck>,
}

/// The key of a defaults file holding the variables' constraints rather than a variable.
pub const TYPES_KEY: &str = "_types";

/// Every role, parsed from the embedded files.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub roles: BTreeMap<Role, RoleDef>,
}

/// The embedded roles failed their checks: a bug of this build, which the tests catch.
#[derive(Debug, thiserror::Error)]
#[error("embedded roles are broken:\n{0}")]
pub struct BrokenRoles(pub Diagnostics);

impl Catalog {
    /// The roles embedded in this binary, parsed and checked once per process. They are
    /// checked by the tests, so failing here is a bug.
    pub fn embedded() -> Result<&'static Catalog, BrokenRoles> {
        static CATALOG: OnceLock<Result<Catalog, Diagnostics>> = OnceLock::new();
        CATALOG
            .get_or_init(Catalog::load)
            .as_ref()
            .map_err(|d| BrokenRoles(d.clone()))
    }

    fn load() -> Result<Catalog, Diagnostics> {
        let mut d = Decoder::default();
        let mut roles = BTreeMap::new();
        for role in std::iter::once(Role::Firewall).chain(Role::DECLARABLE) {
            roles.insert(role, load_role(&mut d, role));
        }
        let cat = Catalog { roles };
        cat.check(&mut d);
        if d.diags.is_empty() {
            Ok(cat)
        } else {
            Err(d.diags)
        }
    }

    pub fn role(&self, role: Role) -> &RoleDef {
        &self.roles[&role]
    }

    /// Every variable some role declares, with its default.
    pub fn defaults(&self) -> BTreeMap<&str, &serde_json::Value> {
        self.roles
            .values()
            .flat_map(|r| r.defaults.iter().map(|(k, v)| (k.as_str(), v)))
            .collect()
    }

    /// Every variable some role declares, with its constraint.
    pub fn types(&self) -> BTreeMap<&str, &Constraint> {
        self.roles
            .values()
            .flat_map(|r| r.types.iter().map(|(k, v)| (k.as_str(), v)))
            .collect()
    }

    fn check(&self, d: &mut Decoder) {
        let mut seen_vars: BTreeMap<&str, Role> = BTreeMap::new();
        let env = crate::render::environment();
        for def in self.roles.values() {
            let file = format!("roles/{}/health/main.yaml", def.role);
            let pos = crate::diag::Pos::file_start(Path::new(&file));
            for (i, c) in def.health.iter().enumerate() {
                for (expression, text) in c.sources() {
                    let compiled = if expression {
                        env.compile_expression(text).map(drop)
                    } else {
                        env.template_from_str(text).map(drop)
                    };
                    if let Err(e) = compiled {
                        d.diags
                            .push(&pos, &index("", i), format!("`{text}`: {e}"), None);
                    }
                }
            }
            let file = format!("roles/{}/tasks/main.yaml", def.role);
            let pos = crate::diag::Pos::file_start(Path::new(&file));
            for k in def.defaults.keys() {
                if let Some(other) = seen_vars.insert(k, def.role) {
                    d.diags.push(
                        &pos,
                        k,
                        format!("variable declared by both {other} and {}", def.role),
                        None,
                    );
                }
            }
            for (i, t) in def.tasks.iter().enumerate() {
                for n in &t.notify {
                    if !def.handlers.iter().any(|h| &h.name == n) {
                        d.diags.push(
                            &pos,
                            &index("", i),
                            format!("notify names no handler of this role: `{n}`"),
                            None,
                        );
                    }
                }
                if let Some(w) = &t.when {
                    if let Err(e) = env.compile_expression(w) {
                        d.diags
                            .push(&pos, &index("", i), format!("when `{w}`: {e}"), None);
                    }
                }
                if let Action::Template { src, .. } = &t.action {
                    if asset(&format!("templates/{src}")).is_none() {
                        d.diags.push(
                            &pos,
                            &index("", i),
                            format!("no template `templates/{src}`"),
                            None,
                        );
                    }
                }
            }
        }
    }
}

fn load_node(d: &mut Decoder, path: &str) -> Option<Node> {
    let bytes = asset(path)?;
    let text = String::from_utf8_lossy(bytes);
    match yaml::parse(Path::new(path), &text) {
        Ok(n) => Some(n),
        Err(e) => {
            d.diags.0.extend(e.0);
            None
        }
    }
}

fn load_role(d: &mut Decoder, role: Role) -> RoleDef {
    let base = format!("roles/{role}");
    let mut def = RoleDef {
        role,
        tasks: Vec::new(),
        handlers: Vec::new(),
        defaults: BTreeMap::new(),
        types: BTreeMap::new(),
        health: Vec::new(),
    };
    if let Some(n) = load_node(d, &format!("{base}/health/main.yaml")) {
        for (i, c) in d.seq(&n, "").unwrap_or_default().iter().enumerate() {
            if let Some(c) = health::check(d, c, &index("", i)) {
                def.health.push(c);
            }
        }
    }
    if let Some(n) = load_node(d, &format!("{base}/tasks/main.yaml")) {
        for (i, t) in d.seq(&n, "").unwrap_or_default().iter().enumerate() {
            if let Some(task) = tasks::task(d, t, &index("", i)) {
                def.tasks.push(task);
            }
        }
    }
    if let Some(n) = load_node(d, &format!("{base}/handlers/main.yaml")) {
        for (i, h) in d.seq(&n, "").unwrap_or_default().iter().enumerate() {
            if let Some(handler) = tasks::handler(d, h, &index("", i)) {
                def.handlers.push(handler);
            }
        }
    }
    if let Some(n) = load_node(d, &format!("{base}/defaults/main.yaml")) {
        defaults(d, &n, &mut def);
    }
    def
}

/// A defaults file: `name: default` entries, and `_types:` giving each one's constraint. Every
/// variable needs a type and its default must satisfy it, so a role cannot ship a variable
/// that validation would let through unchecked.
fn defaults(d: &mut Decoder, n: &Node, def: &mut RoleDef) {
    let mut types = None;
    let mut values = Vec::new();
    for (k, kn, v) in d.mapping(n, "").unwrap_or_default() {
        if k == TYPES_KEY {
            types = Some(v);
        } else {
            def.defaults.insert(k.to_string(), yaml::to_json(v));
            values.push((k, kn, v));
        }
    }
    let declared = match types {
        Some(t) => d.mapping(t, TYPES_KEY).unwrap_or_default(),
        None => Vec::new(),
    };
    for (k, kn, t) in &declared {
        let path = join(TYPES_KEY, k);
        let Some((_, _, value)) = values.iter().find(|(name, _, _)| name == k) else {
            d.error(
                kn,
                &path,
                format!("a type for `{k}`, which has no default"),
                None,
            );
            continue;
        };
        if let Some(c) = Constraint::parse(d, t, &path) {
            // The default is checked like an inventory's value.
            if c.check(d, value, k) {
                def.types.insert(k.to_string(), c);
            }
        }
    }
    for (k, kn, _) in &values {
        if !declared.iter().any(|(name, _, _)| name == k) {
            d.error(
                kn,
                k,
                format!("variable `{k}` has no type"),
                Some(format!(
                    "declare it under `{TYPES_KEY}:`, e.g. `{k}: {{type: int, min: 1, max: 100}}`"
                )),
            );
        }
    }
}

/// The one key of `kinds` present in `f` (a task's action, a check's kind), its value and
/// path; reported unless exactly one is.
fn one_of<'n, 'k>(
    d: &mut Decoder,
    f: &Fields<'n>,
    kinds: &[&'k str],
    what: &str,
) -> Option<(&'k str, &'n Node, String)> {
    let present: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| f.get(k).is_some())
        .collect();
    if let [kind] = present[..] {
        return Some((kind, f.get(kind)?, f.path_of(kind)));
    }
    d.diags.push(
        &f.pos,
        &f.path,
        format!("{what}, found {}", present.len()),
        Some(format!("one of: {}", kinds.join(", "))),
    );
    None
}

/// Whether `secret` (under `password_secret` in `f`) is one sagectl generates; reported if not.
fn known_secret(d: &mut Decoder, body: &Node, f: &Fields<'_>, secret: &str) -> bool {
    if crate::pki::SECRET_NAMES.contains(&secret) {
        return true;
    }
    d.error(
        body,
        &f.path_of("password_secret"),
        format!("unknown secret `{secret}`"),
        Some(suggest(secret, &crate::pki::SECRET_NAMES)),
    );
    false
}

fn req_string(d: &mut Decoder, f: &Fields<'_>, key: &str) -> Option<String> {
    match f.get(key) {
        Some(n) => d.string(n, &f.path_of(key)),
        None => {
            d.diags
                .push(&f.pos, &f.path, format!("missing `{key}`"), None);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (RoleDef, Diagnostics) {
        let n = yaml::parse(Path::new("defaults.yaml"), text).unwrap();
        let mut d = Decoder::default();
        let mut def = RoleDef {
            role: Role::Static,
            tasks: Vec::new(),
            handlers: Vec::new(),
            defaults: BTreeMap::new(),
            types: BTreeMap::new(),
            health: Vec::new(),
        };
        defaults(&mut d, &n, &mut def);
        (def, d.diags)
    }

    #[test]
    fn every_variable_has_a_type_its_default_satisfies() {
        let (def, d) =
            load("a: 80\nb: \"/x\"\n_types:\n  a: {type: port, listener: x}\n  b: abs_path\n");
        assert!(d.is_empty(), "{d}");
        assert_eq!(def.defaults.len(), 2, "`_types` is not a variable");
        assert_eq!(def.types["a"].listener(), Some("x"));

        let (_, d) = load("a: 0\nb: 1\nc: \"x\"\n_types:\n  a: port\n  c: version\n  z: bool\n");
        let msgs: Vec<String> =
            d.0.iter()
                .map(|p| format!("{}:{} {}", p.pos.line, p.pos.col, p.message))
                .collect();
        assert_eq!(
            msgs,
            [
                "1:4 port 0 is out of range",
                "3:4 `x` is not a version",
                "7:3 a type for `z`, which has no default",
                "2:1 variable `b` has no type",
            ]
        );
    }

    #[test]
    fn the_embedded_roles_declare_every_variable() {
        let c = Catalog::embedded().unwrap();
        let (defaults, types) = (c.defaults(), c.types());
        assert_eq!(
            defaults.keys().collect::<Vec<_>>(),
            types.keys().collect::<Vec<_>>()
        );
    }
}
