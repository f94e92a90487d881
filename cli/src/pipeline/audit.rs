//! The audit record of a run: who ran which command (`up`, or any other that changes
//! machines: those converging through the pipeline, and drain/undrain, through [`record`]) on
//! which inventory, from which machine, and what changed, sent to logd with sagectl's admin
//! certificate.

use std::collections::BTreeMap;

use sagews_wire::proto::Level;

use super::{Pipeline, Recap};
use crate::inventory::Role;

/// Records who ran which command on which inventory and what changed, in logd (spooled in the
/// state directory when logd cannot take it, and sent with the next run's).
pub(super) async fn audit(p: &Pipeline, recap: &Recap) -> Option<String> {
    let changed: usize = recap.hosts.iter().map(|h| h.changed).sum();
    let failed: Vec<&str> = recap
        .hosts
        .iter()
        .filter(|h| h.failed || h.unreachable)
        .map(|h| h.host.as_str())
        .collect();
    let mut fields = serde_json::Map::new();
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
    let what = format!(
        "{changed} changes on {} hosts, {} failed",
        recap.hosts.len(),
        failed.len()
    );
    send(p, failed.is_empty(), &what, fields).await
}

/// Records in logd what a command did to machines outside a converge (`what`: "drained
/// worker1"), as a run's record; `ok` when it did all it meant to. Says where it went.
pub async fn record(p: &Pipeline, ok: bool, what: &str) -> Option<String> {
    send(p, ok, what, serde_json::Map::new()).await
}

/// `<user> ran sagectl <command> on <inventory>: <what>`, with who, from where and the
/// command line as fields.
async fn send(
    p: &Pipeline,
    ok: bool,
    what: &str,
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> Option<String> {
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
    fields.insert("user".into(), serde_json::json!(me.user));
    fields.insert("from".into(), serde_json::json!(me.host));
    fields.insert("command".into(), serde_json::json!(me.command));
    fields.insert(
        "inventory".into(),
        serde_json::json!(p.inv.file.display().to_string()),
    );
    let message = format!(
        "{} ran sagectl {} on {}: {what}",
        me.user, p.settings.command, p.inv.name
    );
    let level = if ok { Level::Info } else { Level::Warn };
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
