//! The inventory: what to deploy where. Read in two stages: `raw` turns YAML files (the main one
//! and its `include:`s) into typed values, refusing unknown keys; `validate` checks names,
//! addresses, roles and the cross-host rules, producing an [`Inventory`]. Both stages collect
//! every problem, each with file:line:column and a path, before giving up.

pub mod constraint;
pub mod files;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::diag::{Diagnostics, Pos};
pub use crate::net::Cidr;

/// Every role sagectl knows, in the order roles are applied on a host. `firewall` is implied on
/// every host and never written in an inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Firewall,
    Database,
    Cache,
    Logd,
    Worker,
    Backend,
    Static,
    Loadbalancer,
}

impl Role {
    /// Roles an inventory may name (all but the implied firewall), in apply order.
    pub const DECLARABLE: [Role; 7] = [
        Role::Database,
        Role::Cache,
        Role::Logd,
        Role::Worker,
        Role::Backend,
        Role::Static,
        Role::Loadbalancer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Firewall => "firewall",
            Role::Database => "database",
            Role::Cache => "cache",
            Role::Logd => "logd",
            Role::Worker => "worker",
            Role::Backend => "backend",
            Role::Static => "static",
            Role::Loadbalancer => "loadbalancer",
        }
    }

    pub fn from_name(s: &str) -> Option<Role> {
        Role::DECLARABLE
            .into_iter()
            .chain([Role::Firewall])
            .find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated inventory.
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    /// Names the deployment and its state directory.
    pub name: String,
    /// The main inventory file.
    #[serde(skip)]
    pub file: PathBuf,
    pub ssh: Ssh,
    pub tls: Tls,
    /// Global variables (over role defaults, under host variables).
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Free-form groups for targeting: name → host names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Hosts in the order the files declare them.
    pub hosts: Vec<Host>,
    pub worker: WorkerSettings,
    pub backend: BackendSettings,
    pub logd: LogdSettings,
    pub database: DatabaseSettings,
    pub lab: Option<Lab>,
    /// Directories named by `include:` (where `add-worker` writes new host files).
    #[serde(skip)]
    pub include_dirs: Vec<PathBuf>,
}

impl Inventory {
    /// Reads and validates the inventory at `path` with every file it includes.
    pub fn load(path: &Path) -> Result<Inventory, Diagnostics> {
        let (raw, diags) = raw::read(path)?;
        validate::validate(raw, diags).map_err(|mut d| {
            // Main file first, then included files in name order; by position within each.
            d.0.sort_by(|a, b| {
                let key = |x: &crate::diag::Diagnostic| {
                    (
                        *x.pos.file != *path.display().to_string(),
                        x.pos.file.clone(),
                        x.pos.line,
                        x.pos.col,
                    )
                };
                key(a).cmp(&key(b))
            });
            d
        })
    }

    /// The directory holding the inventory file (relative paths in it start here).
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Hosts holding `role`, in inventory order.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |h| h.roles.contains(&role))
    }
}

/// SSH connection settings; the inventory's defaults merged with a host's overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ssh {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    /// Whether the inventory gave `user` and `port` (else `~/.ssh/config` may, when
    /// connecting: `pipeline::connect`).
    #[serde(skip)]
    pub user_set: bool,
    #[serde(skip)]
    pub port_set: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Tls {
    /// The site's public name, served by HAProxy.
    pub public_name: String,
    /// A user-provided certificate chain and key for HAProxy (PEM), instead of one from the CA.
    pub certificate: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Host {
    pub name: String,
    pub address: IpAddr,
    /// Declared roles in apply order, without the implied firewall.
    pub roles: Vec<Role>,
    pub vars: BTreeMap<String, serde_json::Value>,
    pub ssh: Ssh,
    /// Where the host is declared (for messages of later stages).
    #[serde(skip)]
    pub pos: Pos,
}

impl Host {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Every role applied to the host, the firewall first.
    pub fn all_roles(&self) -> impl Iterator<Item = Role> + '_ {
        std::iter::once(Role::Firewall).chain(self.roles.iter().copied())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Python3,
    Sage,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkerSettings {
    pub engine: Engine,
    pub port: u16,
    /// Sessions one worker runs at once.
    pub max_sessions: u32,
    /// First and last uid of the per-workspace unix users.
    pub uid_min: u32,
    pub uid_max: u32,
    /// Close every session when no backend has been heard from for this long.
    pub backend_timeout_seconds: u32,
    pub limits: Limits,
    /// Sessions only with their cgroup (memory, pids, CPU for all their processes together);
    /// false lets a machine without the controllers run sessions under per-process rlimits.
    pub require_cgroups: bool,
    /// How engines start: `zygote` (forked from an engine server per worker) or `fresh`.
    pub engine_server: String,
    /// Modules the python3 engine server imports once for every session.
    pub preload: Vec<String>,
}

/// Resource limits applied to every session process: the worker protocol's own type, so the
/// inventory and the wire cannot drift apart.
pub use sagews_wire::proto::Limits;

#[derive(Clone, Debug, Serialize)]
pub struct BackendSettings {
    /// HTTPS port HAProxy sends `/api` and `/sockjs` to.
    pub port: u16,
    /// Port workers register on (worker certificates only).
    pub worker_port: u16,
    /// Browser sessions one backend holds at once.
    pub max_sessions: u32,
    pub max_bundle_mb: u64,
    pub accounts: Accounts,
    /// Accounts that see the operators' page (workers, backends, the latest audit records) and
    /// may drain and undrain workers from it.
    pub admins: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Accounts {
    /// Whether anyone may sign up.
    pub signup: bool,
    pub max_workspaces: u32,
    /// Workspaces one account may have open (sessions on workers) at once, across backends.
    pub max_open_workspaces: u32,
    pub session_days: u32,
    pub min_password_length: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct LogdSettings {
    /// Port of the TLS frame listener that takes records.
    pub port: u16,
    /// Port of the HTTPS query API and web page.
    pub http_port: u16,
    /// Who may send records, besides backend and logd hosts (always allowed). Workers never.
    pub allow: Vec<Cidr>,
    pub retention_days: u32,
    pub alerts: Vec<AlertRule>,
    /// Another logd host that committed records are replicated to.
    pub replica: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AlertRule {
    pub name: String,
    /// Least level that matches: trace, debug, info, warn, error.
    pub level: String,
    pub target: Option<String>,
    /// A regular expression matched against the message.
    pub message: Option<String>,
    pub host: Option<String>,
    pub count: u32,
    pub window_seconds: u32,
    pub action: AlertAction,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertAction {
    /// Run a program (argument list) with the alert as JSON on stdin.
    Command(Vec<String>),
    /// POST the alert as JSON to this URL.
    Webhook(String),
}

/// PostgreSQL: which `database` host is the primary, its streaming standby, scheduled backups.
#[derive(Clone, Debug, Serialize)]
pub struct DatabaseSettings {
    /// The database host backends and logd write to.
    pub primary: String,
    /// The second `database` host, a hot standby streaming from the primary.
    pub standby: Option<String>,
    pub backups: Option<Backups>,
}

impl DatabaseSettings {
    /// Where scheduled backups are taken: the standby when there is one (no load on the
    /// primary), else the primary.
    pub fn backup_host(&self) -> &str {
        self.standby.as_deref().unwrap_or(&self.primary)
    }
}

/// Scheduled backups on the database host (a systemd timer).
#[derive(Clone, Debug, Serialize)]
pub struct Backups {
    /// systemd's `OnCalendar=` (`daily`, `hourly`, `*-*-* 03:00:00`).
    pub schedule: String,
    /// How many backups are kept; older ones are removed after a new one is complete.
    pub keep: u32,
    /// Where on the database host.
    pub dir: String,
}

/// Local lab machines (systemd-nspawn) stand in for the hosts of this inventory.
#[derive(Clone, Debug, Serialize)]
pub struct Lab {
    pub subnet: Cidr,
    /// Debian suite of the base image.
    pub suite: String,
}

impl Lab {
    /// The bridge's address on the local box: the subnet's first address.
    pub fn gateway(&self) -> IpAddr {
        self.subnet
            .nth(1)
            .expect("validated subnets hold at least 4 addresses")
    }
}
