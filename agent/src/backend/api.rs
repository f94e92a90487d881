//! A browser's SockJS session: its requests (`msg::Request`, one at a time, in order), each
//! answered by one reply `{"id": N, "ok": true, ...msg::Reply}` or `{"id": N, "ok": false,
//! "error": "...", "status": N}`; the events of the workspaces it has open (`msg::BrowserEvent`)
//! go out between replies. The messages themselves are typed in `msg.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::accounts::Account;
use super::msg::{self, Op, Reply, Request, WorkspaceInfo};
use super::sockjs::Outbound;
use super::{ApiError, Backend};
use crate::proto::{FileOp, FileResult};

struct Conn {
    backend: Arc<Backend>,
    id: u64,
    account: Option<Account>,
    token: Option<String>,
    open: HashSet<String>,
    viewer: super::open::Viewer,
    /// The browser's address as HAProxy saw it (sign-in limits).
    client: Option<std::net::IpAddr>,
}

/// Serves one SockJS session until it ends; then leaves every workspace it had open.
pub async fn run(
    backend: Arc<Backend>,
    id: u64,
    mut inbound: mpsc::Receiver<String>,
    out: Outbound,
    account: Option<Account>,
    client: Option<std::net::IpAddr>,
) {
    let (viewer, mut events) =
        super::open::Viewer::new(out.clone(), backend.config.max_queued_bytes);
    let mut c = Conn {
        backend: backend.clone(),
        id,
        account,
        token: None,
        open: HashSet::new(),
        viewer,
        client,
    };
    // Requests one at a time, in order; workspace events go out between them (an event that
    // arrives during a request waits for its reply, which keeps replies before their output).
    loop {
        tokio::select! {
            m = inbound.recv() => {
                let Some(text) = m else { break };
                backend.metrics.inc(&backend.metrics.messages);
                // Boxed: the request's state lives only while it runs, not in every idle
                // session (this task's size is what an idle session costs).
                backend.handling.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let reply = Box::pin(c.handle(&text)).await;
                backend.handling.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                out.send(reply.to_string());
            }
            Some(v) = events.recv() => out.send(v.to_string()),
        }
    }
    for ws in std::mem::take(&mut c.open) {
        Box::pin(backend.leave(&ws, id)).await;
    }
}

/// Workspace names: 1 to 100 characters, no control characters. Anything else (quotes,
/// semicolons) is stored as given: every query takes parameters.
fn check_ws_name(name: &str) -> Result<(), ApiError> {
    let n = name.chars().count();
    if n == 0 || n > 100 || name.chars().any(char::is_control) || name.trim() != name {
        return Err(ApiError::bad(
            "a workspace name is 1 to 100 characters, without control characters or surrounding spaces",
        ));
    }
    Ok(())
}

/// A file path of a file op: the workspace's path rules, and not the workspace itself.
fn file_path(p: &str) -> Result<String, ApiError> {
    let p = crate::proto::workspace_path(p).map_err(ApiError::bad)?;
    if p.is_empty() {
        return Err(ApiError::bad("a file path is required"));
    }
    Ok(p)
}

/// A worker answered a file op with another op's result.
fn unexpected(r: FileResult) -> ApiError {
    match r {
        FileResult::Failed { message } => ApiError::bad(message),
        other => ApiError::internal(format!("the worker answered {other:?}")),
    }
}

fn new_workspace_id() -> String {
    let b = super::accounts::random_bytes::<8>();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("w{}", &hex[..15])
}

impl Conn {
    async fn handle(&mut self, text: &str) -> Value {
        let max = self.backend.config.max_message_bytes;
        if text.len() > max {
            self.backend.metrics.inc(&self.backend.metrics.bad_messages);
            return json!({"id": null, "ok": false, "error": format!(
                "message of {} bytes refused: the limit is {max} bytes (upload large bundles with POST /api/workspaces)",
                text.len())});
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                self.backend.metrics.inc(&self.backend.metrics.bad_messages);
                return json!({"id": null, "ok": false, "error": "a message must be a JSON object"});
            }
            Err(e) => {
                self.backend.metrics.inc(&self.backend.metrics.bad_messages);
                return json!({"id": null, "ok": false, "error": format!("invalid JSON: {e}")});
            }
        };
        let req = match Request::from_value(v) {
            Ok(r) => r,
            Err((id, error)) => {
                self.backend.metrics.inc(&self.backend.metrics.bad_messages);
                return json!({"id": id, "ok": false, "error": error, "status": 400});
            }
        };
        let id = req.id;
        if self
            .backend
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Nothing of it was done: the client sends it again once reconnected.
            return json!({"id": id, "ok": false, "code": "restarting", "status": 503,
                "error": "this server is restarting: the request is sent again once reconnected"});
        }
        match self.op(req).await {
            Ok(reply) => {
                let mut r = serde_json::to_value(reply).expect("replies serialise");
                r["id"] = id.into();
                r["ok"] = true.into();
                r
            }
            Err(e) => {
                let mut r = json!({"id": id, "ok": false, "error": e.message, "status": e.status});
                if let Some(s) = e.retry_after {
                    r["retry_after"] = s.into();
                }
                r
            }
        }
    }

    fn account(&self) -> Result<&Account, ApiError> {
        self.account
            .as_ref()
            .ok_or_else(|| ApiError::unauthorized("sign in first"))
    }

    /// The workspace `id` if it belongs to this account.
    async fn owned(&self, id: &str) -> Result<(String, String), ApiError> {
        let acct = self.account()?;
        let row = self
            .backend
            .db()
            .await?
            .query_opt(
                "SELECT name FROM workspaces WHERE id = $1 AND account_id = $2",
                &[&id, &acct.id],
            )
            .await?;
        match row {
            Some(r) => Ok((id.to_string(), r.get(0))),
            None => Err(ApiError::not_found(format!(
                "no workspace {id:?} in your account"
            ))),
        }
    }

    async fn op(&mut self, req: Request) -> Result<Reply, ApiError> {
        let b = self.backend.clone();
        let ws_reply = |workspace: String| Reply::Workspace(msg::WorkspaceReply { workspace });
        match req.op {
            Op::Ping => Ok(Reply::Pong(msg::Pong { pong: true })),
            op @ (Op::Signup { .. } | Op::Signin { .. }) => {
                let (acct, token) = match &op {
                    Op::Signup { name, password } => b.signup(name, password, self.client).await?,
                    Op::Signin { name, password } => b.signin(name, password, self.client).await?,
                    _ => unreachable!("matched above"),
                };
                self.account = Some(acct.clone());
                self.token = Some(token);
                Ok(Reply::Account(msg::AccountReply {
                    account: Some(acct.name),
                }))
            }
            Op::Signout => {
                if let Some(t) = self.token.take() {
                    b.signout(&t).await?;
                }
                for ws in std::mem::take(&mut self.open) {
                    Box::pin(b.leave(&ws, self.id)).await;
                }
                self.account = None;
                Ok(Reply::Empty(msg::Empty {}))
            }
            Op::Whoami => Ok(Reply::Account(msg::AccountReply {
                account: self.account.as_ref().map(|a| a.name.clone()),
            })),
            Op::List => {
                let acct = self.account()?;
                let rows = b
                    .db()
                    .await?
                    .query(
                        "SELECT id, name, version, extract(epoch FROM updated)::int8, published IS NOT NULL
                         FROM workspaces WHERE account_id = $1 ORDER BY name",
                        &[&acct.id],
                    )
                    .await?;
                let workspaces = rows
                    .iter()
                    .map(|r| WorkspaceInfo {
                        workspace: r.get(0),
                        name: r.get(1),
                        version: r.get(2),
                        updated: r.get(3),
                        published: r.get(4),
                    })
                    .collect();
                Ok(Reply::Workspaces(msg::Workspaces { workspaces }))
            }
            Op::Create { name, bundle } => {
                let acct = self.account()?.clone();
                let bundle = match bundle {
                    Some(b64) => Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| ApiError::bad(format!("the bundle is not base64: {e}")))?,
                    ),
                    None => None,
                };
                Ok(ws_reply(b.create_workspace(&acct, &name, bundle).await?))
            }
            Op::Rename { workspace, name } => {
                let (ws, _) = self.owned(&workspace).await?;
                check_ws_name(&name)?;
                let n = b
                    .db()
                    .await?
                    .execute(
                        "UPDATE workspaces SET name = $2, updated = now() WHERE id = $1
                         AND NOT EXISTS (SELECT 1 FROM workspaces w WHERE w.account_id = workspaces.account_id AND w.name = $2)",
                        &[&ws, &name],
                    )
                    .await?;
                if n == 0 {
                    return Err(ApiError::conflict(format!(
                        "you already have a workspace named {name:?}"
                    )));
                }
                Ok(Reply::Renamed(msg::Renamed {
                    workspace: ws,
                    name,
                }))
            }
            Op::Delete { workspace } => {
                let (ws, name) = self.owned(&workspace).await?;
                b.discard(&ws).await;
                self.open.remove(&ws);
                b.db()
                    .await?
                    .execute("DELETE FROM workspaces WHERE id = $1", &[&ws])
                    .await?;
                b.audit(
                    "workspace deleted",
                    self.account()?,
                    json!({"workspace": ws, "name": name}),
                );
                Ok(ws_reply(ws))
            }
            Op::Open { workspace } => {
                let (ws, name) = self.owned(&workspace).await?;
                let acct = self.account()?.id;
                let (_, worker) = b
                    .open_workspace(acct, &ws, self.id, self.viewer.clone())
                    .await?;
                self.open.insert(ws.clone());
                Ok(Reply::Opened(msg::Opened {
                    workspace: ws,
                    name,
                    worker,
                }))
            }
            Op::Close { workspace } => {
                let (ws, _) = self.owned(&workspace).await?;
                if self.open.remove(&ws) {
                    b.leave(&ws, self.id).await;
                }
                Ok(ws_reply(ws))
            }
            Op::Fleet => {
                let account = self.account()?.clone();
                let (workers, backends, audit, audit_error) = b.fleet(&account).await?;
                Ok(Reply::Fleet(msg::FleetReply {
                    workers,
                    backends,
                    audit,
                    audit_error,
                }))
            }
            Op::DrainWorker { worker, drain } => {
                let account = self.account()?.clone();
                let draining = b.drain_worker(&account, &worker, drain).await?;
                Ok(Reply::WorkerDrain(msg::WorkerDrain { worker, draining }))
            }
            Op::Execute { workspace, code } => {
                let ws = self.opened(&workspace).await?;
                b.execute(&ws, req.id, code).await?;
                Ok(ws_reply(ws.id.clone()))
            }
            Op::Files { workspace } => {
                let ws = self.opened(&workspace).await?;
                match b.file_op(&ws, FileOp::List).await? {
                    FileResult::Listed { files } => Ok(Reply::Files(msg::FilesReply {
                        workspace: ws.id.clone(),
                        files,
                    })),
                    other => Err(unexpected(other)),
                }
            }
            Op::Read { workspace, path } => {
                let ws = self.opened(&workspace).await?;
                let path = file_path(&path)?;
                match b.file_op(&ws, FileOp::Read { path }).await? {
                    FileResult::Read { path, data, size } => Ok(Reply::FileRead(msg::FileRead {
                        workspace: ws.id.clone(),
                        path,
                        data,
                        size,
                    })),
                    other => Err(unexpected(other)),
                }
            }
            Op::Write {
                workspace,
                path,
                data,
            } => {
                let ws = self.opened(&workspace).await?;
                let path = file_path(&path)?;
                match b.file_op(&ws, FileOp::Write { path, data }).await? {
                    FileResult::Written { path, size } => {
                        Ok(Reply::FileWritten(msg::FileWritten {
                            workspace: ws.id.clone(),
                            path,
                            size,
                        }))
                    }
                    other => Err(unexpected(other)),
                }
            }
            Op::Remove { workspace, path } => {
                let ws = self.opened(&workspace).await?;
                let path = file_path(&path)?;
                match b.file_op(&ws, FileOp::Remove { path }).await? {
                    FileResult::Removed { path } => Ok(Reply::FileRemoved(msg::FileRemoved {
                        workspace: ws.id.clone(),
                        path,
                    })),
                    other => Err(unexpected(other)),
                }
            }
            Op::Interrupt { workspace } => {
                let ws = self.opened(&workspace).await?;
                b.interrupt(&ws).await?;
                Ok(ws_reply(ws.id.clone()))
            }
            Op::Save { workspace, message } => {
                let ws = self.opened(&workspace).await?;
                let message: String = message
                    .as_deref()
                    .unwrap_or("Save")
                    .chars()
                    .take(1000)
                    .collect();
                let changed = b.save(&ws, &message).await?;
                b.audit(
                    "workspace saved",
                    self.account()?,
                    json!({"workspace": ws.id, "changed": changed, "message": message}),
                );
                Ok(Reply::Saved(msg::Saved {
                    workspace: ws.id.clone(),
                    changed,
                }))
            }
            Op::History { workspace } => {
                let (ws, _) = self.owned(&workspace).await?;
                b.save_if_open(&ws).await?;
                let history = match b.stored_bundle(&ws).await? {
                    Some(bundle) => super::git::history(&bundle, 200).await?,
                    None => Vec::new(),
                };
                Ok(Reply::History(msg::HistoryReply {
                    workspace: ws,
                    history,
                }))
            }
            Op::Revert { workspace, commit } => {
                let (ws, _) = self.owned(&workspace).await?;
                b.save_if_open(&ws).await?;
                let bundle = b
                    .stored_bundle(&ws)
                    .await?
                    .ok_or_else(|| ApiError::not_found("the workspace has no saved history yet"))?;
                let (new_bundle, new_commit) = super::git::revert(&bundle, &commit).await?;
                b.store_bundle(&ws, &new_bundle).await?;
                if let Some(open) = b.open_ws(&ws) {
                    b.reload(&open).await?;
                }
                b.audit(
                    "workspace reverted",
                    self.account()?,
                    json!({"workspace": ws, "to": commit, "commit": new_commit}),
                );
                Ok(Reply::Reverted(msg::Reverted {
                    workspace: ws,
                    commit: new_commit,
                }))
            }
            Op::Publish { workspace, path } => {
                let (ws, _) = self.owned(&workspace).await?;
                b.save_if_open(&ws).await?;
                let r = b.publish(&ws, path.as_deref().unwrap_or("")).await?;
                b.audit(
                    "workspace published",
                    self.account()?,
                    json!({"workspace": ws, "url": r.url}),
                );
                Ok(Reply::Published(r))
            }
        }
    }

    /// The open workspace a request names; it must have been opened on this connection.
    async fn opened(&self, id: &str) -> Result<Arc<super::open::OpenWs>, ApiError> {
        self.account()?;
        if !self.open.contains(id) {
            return Err(ApiError::bad(format!(
                "workspace {id:?} is not open on this connection: send \"open\" first"
            )));
        }
        self.backend
            .open_ws(id)
            .ok_or_else(|| ApiError::busy("the workspace was closed; open it again"))
    }
}

impl Backend {
    pub async fn create_workspace(
        &self,
        acct: &Account,
        name: &str,
        bundle: Option<Vec<u8>>,
    ) -> Result<String, ApiError> {
        check_ws_name(name)?;
        let bundle = match bundle {
            Some(b) if b.len() > self.config.max_bundle_bytes() => {
                return Err(ApiError::too_large(format!(
                    "the bundle is {} bytes, over the limit of {} MB",
                    b.len(),
                    self.config.max_bundle_mb
                )));
            }
            Some(b) => Some(super::git::normalize(&b).await?),
            None => None,
        };
        let id = new_workspace_id();
        let mut db = self.db().await?;
        let tx = db.transaction().await?;
        // One creation at a time per account, so the cap holds under concurrency.
        tx.execute(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&acct.id],
        )
        .await?;
        let n: i64 = tx
            .query_one(
                "SELECT count(*) FROM workspaces WHERE account_id = $1",
                &[&acct.id],
            )
            .await?
            .get(0);
        let max = self.config.accounts.max_workspaces;
        if n >= i64::from(max) {
            return Err(ApiError::forbidden(format!(
                "you have {n} workspaces, the most an account may have ({max}): delete one first"
            )));
        }
        let inserted = tx
            .execute(
                "INSERT INTO workspaces (id, account_id, name, bundle) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account_id, name) DO NOTHING",
                &[&id, &acct.id, &name, &bundle],
            )
            .await?;
        if inserted == 0 {
            return Err(ApiError::conflict(format!(
                "you already have a workspace named {name:?}"
            )));
        }
        tx.commit().await?;
        self.audit(
            "workspace created",
            acct,
            json!({"workspace": id, "name": name, "from_bundle": bundle.is_some()}),
        );
        Ok(id)
    }

    pub async fn stored_bundle(&self, id: &str) -> Result<Option<Vec<u8>>, ApiError> {
        Ok(self
            .db()
            .await?
            .query_opt("SELECT bundle FROM workspaces WHERE id = $1", &[&id])
            .await?
            .and_then(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_names_and_ids() {
        assert!(check_ws_name("x'); DROP TABLE workspaces; --").is_ok());
        assert!(check_ws_name("").is_err());
        assert!(check_ws_name("a\nb").is_err());
        assert!(check_ws_name(&"x".repeat(101)).is_err());
        let id = new_workspace_id();
        assert!(crate::proto::valid_session_id(&id), "{id}");
        assert_ne!(id, new_workspace_id());
    }
}
