//! What a run reports: one [`HostRecap`] per host, the run's [`Recap`], the [`Site`] to open, and
//! the recap as text.

use std::path::PathBuf;

use serde::Serialize;

use crate::inventory::{Inventory, Role};
use crate::pki::State;

/// One host's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostRecap {
    pub host: String,
    pub ok: usize,
    pub changed: usize,
    pub failed: bool,
    pub unreachable: bool,
    pub seconds: f64,
    pub error: Option<String>,
    pub handlers: Vec<String>,
    /// With --check: what would change.
    pub planned: Vec<String>,
    pub notes: Vec<String>,
    pub checks: Vec<crate::health::Check>,
    /// Where this host's time went, in seconds, in order: render, connect, facts (with the
    /// host's lock), plan (with --diff, the diffs), apply (with handlers).
    pub phases: Vec<(&'static str, f64)>,
}

impl HostRecap {
    /// Converged, and every health check passed.
    pub fn succeeded(&self) -> bool {
        !self.failed && !self.unreachable
    }
}

#[derive(Debug, Serialize)]
pub struct Recap {
    pub inventory: String,
    pub check: bool,
    pub success: bool,
    pub seconds: f64,
    pub hosts: Vec<HostRecap>,
    /// What became of the audit record (when the inventory has a logd).
    pub audit: Option<String>,
    /// Where the run's wall time went, in seconds, in order: hosts (every host of every batch
    /// converged, in parallel), health (the checks after each batch), audit (the record to
    /// logd). The setup before (inventory, secrets, agent binary) is the caller's to time.
    pub phases: Vec<(&'static str, f64)>,
    /// How to open the deployed site from this box (after a successful run).
    pub site: Option<Site>,
}

/// The site's address and what this box needs to reach it.
#[derive(Clone, Debug, Serialize)]
pub struct Site {
    pub url: String,
    /// The loadbalancers' addresses, which the public name must resolve to.
    pub addresses: Vec<String>,
    /// The CA a browser must trust (`None` when the inventory brings its own certificate).
    pub ca_file: Option<PathBuf>,
    /// Lab machines are reachable from this box only, by address: map the name locally.
    pub lab: bool,
    /// The operators' accounts (`backend.admins`), which see the operators' page.
    pub operators: Vec<String>,
    /// Where their first password is (`admin_password` in the state directory's secrets).
    pub operator_password_file: Option<PathBuf>,
}

impl Site {
    pub fn of(inv: &Inventory, state: &State) -> Option<Site> {
        let lbs: Vec<String> = inv
            .with_role(Role::Loadbalancer)
            .map(|h| h.address.to_string())
            .collect();
        if lbs.is_empty() || inv.tls.public_name.is_empty() {
            return None;
        }
        Some(Site {
            url: format!("https://{}/", inv.tls.public_name),
            addresses: lbs,
            ca_file: inv.tls.certificate.is_none().then(|| {
                std::path::absolute(state.dir().join("ca.crt"))
                    .unwrap_or_else(|_| state.dir().join("ca.crt"))
            }),
            lab: inv.lab.is_some(),
            operators: inv.backend.admins.clone(),
            operator_password_file: (!inv.backend.admins.is_empty()).then(|| {
                std::path::absolute(state.dir().join("secrets.json"))
                    .unwrap_or_else(|_| state.dir().join("secrets.json"))
            }),
        })
    }

    /// One or two lines a person can act on.
    pub fn advice(&self, public_name: &str) -> String {
        let first = &self.addresses[0];
        let mut s = format!(
            "open {}
",
            self.url
        );
        if self.lab {
            s.push_str(&format!(
                "  from this box (lab machines are reachable from here only): map the name with `echo '{first} {public_name}' >> /etc/hosts`"
            ));
        } else {
            s.push_str(&format!(
                "  the name {public_name} must resolve to {}",
                self.addresses.join(" or ")
            ));
        }
        if let Some(ca) = &self.ca_file {
            s.push_str(&format!(
                ", and have the browser trust the deployment's CA {} (Chromium: certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n sagectl -i {})",
                ca.display(),
                ca.display()
            ));
        }
        s.push('\n');
        if let Some(f) = &self.operator_password_file {
            s.push_str(&format!(
                "  operators' page: sign in as {} with the password `admin_password` in {}\n",
                self.operators.join(" or "),
                f.display()
            ));
        }
        s
    }
}

impl Recap {
    /// Prints the recap on stdout: as JSON, or as a person reads it.
    pub fn print(&self, json: bool, public_name: &str) {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(self).expect("serializable")
            );
        } else {
            print!("{}", self.text(public_name));
        }
    }

    /// The recap as a person reads it (`public_name` for the site's advice).
    pub fn text(&self, public_name: &str) -> String {
        let w = self.hosts.iter().map(|h| h.host.len()).max().unwrap_or(4);
        let mut text = String::new();
        for h in &self.hosts {
            if self.check && !h.planned.is_empty() {
                text.push_str(&format!("{}: would change:\n", h.host));
                for p in &h.planned {
                    text.push_str(&format!("  {p}\n"));
                }
            }
        }
        text.push_str(&format!(
            "\n{} recap{}\n",
            if self.check { "CHECK" } else { "RUN" },
            if self.check {
                " (nothing was changed)"
            } else {
                ""
            }
        ));
        for h in &self.hosts {
            text.push_str(&format!(
                "{:<w$}  ok={:<3} {}={:<3} failed={} unreachable={}  {:.1}s\n",
                h.host,
                h.ok,
                if self.check {
                    "would-change"
                } else {
                    "changed"
                },
                h.changed,
                u8::from(h.failed),
                u8::from(h.unreachable),
                h.seconds
            ));
            for hd in &h.handlers {
                text.push_str(&format!("{:<w$}    handler: {hd}\n", ""));
            }
            for n in &h.notes {
                text.push_str(&format!("{:<w$}    note: {n}\n", ""));
            }
            for c in &h.checks {
                text.push_str(&format!(
                    "{:<w$}    health {}: {} ({})\n",
                    "",
                    c.name,
                    if c.ok { "ok" } else { "FAILED" },
                    c.detail.lines().next().unwrap_or("")
                ));
            }
            if let Some(e) = &h.error {
                text.push_str(&format!(
                    "{:<w$}    error: {}\n",
                    "",
                    e.replace('\n', &format!("\n{:<w$}    ", ""))
                ));
            }
        }
        if let Some(a) = &self.audit {
            text.push_str(&format!("audit: {a}\n"));
        }
        text.push_str(&format!(
            "{} in {:.1}s\n",
            if self.success { "success" } else { "FAILED" },
            self.seconds
        ));
        if let Some(site) = &self.site {
            text.push_str(&site.advice(public_name));
        }
        text
    }
}
