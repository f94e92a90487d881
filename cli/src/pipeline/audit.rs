//! The audit record of a run: who ran which command (`up`, or any other that converges hosts
//! through the pipeline) on which inventory and what changed, sent to logd with sagectl's
//! admin certificate.

use std::collections::BTreeMap;

use super::{Pipeline, Recap};
use crate::inventory::Role;

/// Records who ran which command on which inventory and what changed, in logd (spooled in the state
/// directory when logd cannot take it, and sent with the next run's).
pub(super) async fn audit(p: &Pipeline, recap: &Recap) -> Option<String> {
    use sagews_wire::proto::Level;
    let logd = p
        .inv
        .with_role(Role::Logd)
        .find(|h| Some(&h.name) != p.inv.logd.replica.as_ref())?;
    let dir = p.state.dir();
    if let Err(e) = p.state.admin() {
        return Some(format!("not recorded: {e}"));
    }
    let identity = match sagews_wire::tls::Identity::load(
        &dir.join("ca.crt"),
        &dir.join("admin.crt"),
        &dir.join("admin.key"),
    ) {
        Ok(i) => i,
        Err(e) => return Some(format!("not recorded: {e}")),
    };
    let me = &p.holder;
    let user = &me.user;
    let changed: usize = recap.hosts.iter().map(|h| h.changed).sum();
    let failed: Vec<&str> = recap
        .hosts
        .iter()
        .filter(|h| h.failed || h.unreachable)
        .map(|h| h.host.as_str())
        .collect();
    let mut fields = serde_json::Map::new();
    fields.insert("user".into(), serde_json::json!(user));
    fields.insert("from".into(), serde_json::json!(me.host));
    fields.insert("command".into(), serde_json::json!(me.command));
    fields.insert(
        "inventory".into(),
        serde_json::json!(p.inv.file.display().to_string()),
    );
    fields.insert(
        "changed".into(),
        serde_json::json!(
            recap
                .hosts
                .iter()
                .map(|h| (h.host.clone(), h.changed))
                .collect::<BTreeMap<_, _>>()
        ),
    );
    fields.insert("failed".into(), serde_json::json!(failed));
    let message = format!(
        "{user} ran sagectl {} on {}: {changed} changes on {} hosts, {} failed",
        p.settings.command,
        p.inv.name,
        recap.hosts.len(),
        failed.len()
    );
    let level = if failed.is_empty() {
        Level::Info
    } else {
        Level::Warn
    };
    let record = sagews_wire::logclient::record(
        "sagectl",
        level,
        &format!("sagectl::{}", p.settings.command),
        &message,
        fields,
    );
    let settings = sagews_wire::logclient::Settings {
        address: format!("{}:{}", logd.address, p.inv.logd.port),
        server_name: logd.name.clone(),
        identity,
        spool_dir: dir.join("audit-spool"),
        host: "sagectl".into(),
        queue: 16,
        batch: 100,
    };
    Some(
        match sagews_wire::logclient::deliver_or_spool(&settings, vec![record]).await {
            Ok(true) => format!("recorded in logd on {}", logd.name),
            Ok(false) => format!(
                "logd on {} did not take it: kept in {}, sent next time",
                logd.name,
                dir.join("audit-spool").display()
            ),
            Err(e) => format!("not recorded: {e}"),
        },
    )
}
