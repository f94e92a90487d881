//! `sagectl inventory show INVENTORY [--host H] [--json] [--all]`: the inventory as sagectl
//! resolves it (included files merged, `~/.ssh/config` applied where the inventory is silent,
//! the implied firewall role, groups) and each host's effective variables with where each
//! value comes from (a role's default, the inventory's `vars`, the host's own), as
//! `ansible-inventory --list`/`--host` and `kamal config` show theirs.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::inventory::{Host, Inventory};
use crate::render::VarSource;
use crate::roles::Catalog;

/// `sagectl inventory ...` (a subcommand of its own, so more can follow `show`).
#[derive(clap::Subcommand)]
pub enum Opts {
    /// Print the resolved inventory and each host's effective variables.
    Show(Show),
}

#[derive(clap::Args)]
pub struct Show {
    pub inventory: PathBuf,
    /// Only this host.
    #[arg(long)]
    pub host: Option<String>,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
    /// Every variable templates see, also those of roles the host does not have.
    #[arg(long)]
    pub all: bool,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let Opts::Show(Show {
        inventory,
        host,
        json,
        all,
    }) = o;
    let mut inv = match super::load(&inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    crate::pipeline::connect::apply_ssh_config(&mut inv);
    let catalog = Catalog::embedded()?;
    if let Some(h) = &host {
        if inv.host(h).is_none() {
            let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
            anyhow::bail!(
                "no host `{h}` in {}\n  hint: {}",
                inventory.display(),
                crate::diag::suggest(h, &names)
            );
        }
    }
    let v = resolved(&inv, catalog, all);
    let shown = match &host {
        Some(h) => v["hosts"][h].clone(),
        None => v,
    };
    let out = if json {
        serde_json::to_string_pretty(&shown).expect("serializable") + "\n"
    } else {
        text(&inv, &shown, host.is_some())
    };
    crate::ui::stdout(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// The host's variables shown: those of its roles, and any the inventory sets (`all`: every
/// one), each as `{"value", "from"}`.
fn host_vars(inv: &Inventory, catalog: &Catalog, h: &Host, all: bool) -> Value {
    let own: Vec<_> = h
        .all_roles()
        .filter_map(|r| catalog.roles.get(&r))
        .collect();
    let vars = crate::render::host_vars_from(inv, catalog, h)
        .into_iter()
        .filter(|(k, (_, from))| {
            all || !matches!(from, VarSource::Default(_))
                || own.iter().any(|d| d.defaults.contains_key(k))
        })
        .map(|(k, (value, from))| (k, json!({"value": value, "from": from.to_string()})))
        .collect::<serde_json::Map<_, _>>();
    Value::Object(vars)
}

/// The inventory as JSON, its hosts by name with their groups and variables.
pub fn resolved(inv: &Inventory, catalog: &Catalog, all: bool) -> Value {
    let mut v = serde_json::to_value(inv).expect("serializable");
    v["file"] = json!(inv.file.display().to_string());
    v["include_dirs"] = json!(
        inv.include_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
    );
    let hosts = inv
        .hosts
        .iter()
        .map(|h| {
            let groups: Vec<&String> = inv
                .groups
                .iter()
                .filter(|(_, members)| members.contains(&h.name))
                .map(|(g, _)| g)
                .collect();
            let roles: Vec<&str> = h.all_roles().map(|r| r.name()).collect();
            (
                h.name.clone(),
                json!({
                    "address": h.address.to_string(),
                    "roles": roles,
                    "groups": groups,
                    "ssh": h.ssh,
                    "vars": host_vars(inv, catalog, h, all),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>();
    v["hosts"] = Value::Object(hosts);
    v
}

/// The text form: the inventory's settings, then each host and its variables (values as
/// JSON, so no control character reaches the terminal).
fn text(inv: &Inventory, v: &Value, one_host: bool) -> String {
    let mut out = String::new();
    let host_text = |out: &mut String, name: &str, h: &Value| {
        let list = |x: &Value| {
            x.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        out.push_str(&format!(
            "{name}  {}  ssh {}@{}:{}\n  roles: {}\n",
            h["address"].as_str().unwrap_or(""),
            h["ssh"]["user"].as_str().unwrap_or(""),
            h["address"].as_str().unwrap_or(""),
            h["ssh"]["port"],
            list(&h["roles"])
        ));
        if h["groups"].as_array().is_some_and(|g| !g.is_empty()) {
            out.push_str(&format!("  groups: {}\n", list(&h["groups"])));
        }
        let vars = h["vars"].as_object().cloned().unwrap_or_default();
        let width = vars.keys().map(String::len).max().unwrap_or(0);
        for (k, x) in &vars {
            out.push_str(&format!(
                "  {k:<width$} = {}  ({})\n",
                x["value"],
                x["from"].as_str().unwrap_or("")
            ));
        }
    };
    if one_host {
        let name = inv
            .hosts
            .iter()
            .find(|h| v["address"] == json!(h.address.to_string()))
            .map(|h| h.name.as_str())
            .unwrap_or("");
        host_text(&mut out, name, v);
        return out;
    }
    out.push_str(&format!(
        "inventory {} ({})\n  public name: {}\n",
        inv.name,
        crate::diag::escape(&inv.file.display().to_string()),
        inv.tls.public_name
    ));
    if let Some(lab) = &inv.lab {
        out.push_str(&format!("  lab: subnet {}\n", lab.subnet));
    }
    for (g, members) in &inv.groups {
        out.push_str(&format!("  group {g}: {}\n", members.join(", ")));
    }
    for key in ["worker", "backend", "logd"] {
        out.push_str(&format!("  {key}: {}\n", v[key]));
    }
    for (name, h) in v["hosts"].as_object().into_iter().flatten() {
        out.push('\n');
        host_text(&mut out, name, h);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::inventory::Inventory;
    use crate::roles::Catalog;

    /// Every host of the example inventory, with its effective variables and where each comes
    /// from; the JSON parses back.
    #[test]
    fn the_example_resolves_with_every_host_and_its_variables() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventories/example.yaml");
        let inv = Inventory::load(&file).unwrap();
        let catalog = Catalog::embedded().unwrap();
        let v = super::resolved(&inv, catalog, false);
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        let hosts = v["hosts"].as_object().unwrap();
        assert_eq!(hosts.len(), inv.hosts.len());
        for h in &inv.hosts {
            let shown = &hosts[&h.name];
            assert_eq!(shown["address"], h.address.to_string());
            assert_eq!(shown["roles"][0], "firewall");
            let vars = shown["vars"].as_object().unwrap();
            // Every role's variables, each with a source.
            for r in h.all_roles() {
                for k in catalog.roles[&r].defaults.keys() {
                    assert!(vars.contains_key(k), "{}: {k}", h.name);
                }
            }
            let all = crate::render::host_vars(&inv, catalog, h);
            for (k, x) in vars {
                assert_eq!(x["value"], all[k], "{}: {k}", h.name);
                assert!(x["from"].as_str().is_some_and(|f| !f.is_empty()));
            }
            for k in h.vars.keys() {
                assert_eq!(vars[k]["from"], "host vars", "{}: {k}", h.name);
            }
            for k in inv.vars.keys().filter(|k| !h.vars.contains_key(*k)) {
                assert_eq!(vars[k]["from"], "inventory vars", "{}: {k}", h.name);
            }
        }
        // Text form names each host.
        let text = super::text(&inv, &v, false);
        for h in &inv.hosts {
            assert!(text.contains(&format!("\n{}  ", h.name)), "{text}");
        }
    }
}
