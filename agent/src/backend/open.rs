//! Workspaces open on this backend: each is one session on one worker, shared by every browser
//! connection viewing it. Output events go to all viewers; control requests (open, save, close)
//! are answered in order, so each waits on a queue. When the worker's link breaks, running
//! executes end as `killed`, the viewers are told, and the workspace reopens on another worker
//! from its last save. When the last viewer leaves, the workspace is saved and closed. A
//! workspace on a draining worker moves between cells: saved, reopened elsewhere, closed there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::sync::{mpsc, oneshot};

use super::msg::BrowserEvent;
use super::workers::Link;
use super::{ApiError, Backend};
use crate::proto::{Event, FileOp, FileResult, Request, Status};

/// A viewer's connection: JSON messages for the browser, serialised once for every viewer.
/// What waits for the connection is counted; past `max_queued_bytes` the viewer is not reading
/// and its browser session is closed (so a stalled browser cannot grow this process).
#[derive(Clone)]
pub struct Viewer {
    tx: mpsc::UnboundedSender<Arc<str>>,
    waiting: Arc<AtomicUsize>,
    out: super::sockjs::Outbound,
    max: usize,
}

/// The receiving end of a [`Viewer`].
pub struct ViewerRx {
    rx: mpsc::UnboundedReceiver<Arc<str>>,
    waiting: Arc<AtomicUsize>,
}

impl Viewer {
    pub fn new(out: super::sockjs::Outbound, max: usize) -> (Viewer, ViewerRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        (
            Viewer {
                tx,
                waiting: waiting.clone(),
                out,
                max,
            },
            ViewerRx { rx, waiting },
        )
    }

    /// False when this viewer is gone (or has just been dropped for not reading).
    fn send(&self, text: &Arc<str>) -> bool {
        let waiting = self.waiting.fetch_add(text.len(), Ordering::Relaxed) + text.len();
        if waiting > self.max {
            self.out.close(
                3001,
                &format!("closed: this browser did not read its messages ({waiting} bytes waiting); reconnect"),
            );
            return false;
        }
        self.tx.send(text.clone()).is_ok()
    }
}

impl ViewerRx {
    pub async fn recv(&mut self) -> Option<Arc<str>> {
        let v = self.rx.recv().await?;
        self.waiting.fetch_sub(v.len(), Ordering::Relaxed);
        Some(v)
    }
}

#[derive(Default)]
pub struct OpenWorkspaces {
    map: Mutex<HashMap<String, Arc<OpenWs>>>,
}

impl OpenWorkspaces {
    pub fn count(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<Arc<OpenWs>> {
        self.map.lock().unwrap().values().cloned().collect()
    }
}

pub struct OpenWs {
    pub id: String,
    pub account_id: i64,
    /// The session's worker; locked while opening, saving, closing or moving.
    pub(super) state: tokio::sync::Mutex<Placement>,
    viewers: Mutex<Vec<(u64, Viewer)>>,
    control: Mutex<VecDeque<oneshot::Sender<Event>>>,
    running: Mutex<HashSet<u64>>,
    /// Output bytes of each running execute, for the per-cell cap.
    output: Mutex<HashMap<u64, usize>>,
    /// The stored version this session's files descend from (`workspaces.version`: read when
    /// it was placed, bumped by each of its saves; -1: unknown). A save stores its bundle only
    /// over that version: a session that fell behind (the workspace saved from another
    /// session meanwhile) must not overwrite the newer history with its older one.
    pub(super) version: std::sync::atomic::AtomicI64,
    /// The session holds a commit that is not stored yet (a save whose store failed or never
    /// finished): the next save stores its bundle even if the worker has nothing new to
    /// commit, and a close keeps the session rather than lose that commit.
    unstored: AtomicBool,
}

#[derive(Default)]
pub(super) struct Placement {
    pub(super) link: Option<Arc<Link>>,
    /// Bumped at each placement so a stale pump knows it is stale.
    generation: u64,
    pub(super) closing: bool,
}

impl OpenWs {
    pub(super) fn broadcast(&self, ev: BrowserEvent) {
        let text: Arc<str> = serde_json::to_string(&ev).expect("events serialise").into();
        self.viewers.lock().unwrap().retain(|(_, v)| v.send(&text));
    }

    /// Whether a cell's output may still go out: past `cap` bytes it is dropped, and the
    /// viewers are told once.
    fn within_cap(&self, id: u64, len: usize, cap: usize) -> bool {
        let mut m = self.output.lock().unwrap();
        let n = m.entry(id).or_insert(0);
        let before = *n;
        *n = n.saturating_add(len);
        if *n <= cap {
            return true;
        }
        drop(m);
        if before <= cap {
            self.broadcast(BrowserEvent::Truncated {
                workspace: self.id.clone(),
                id,
                message: format!("output truncated: this cell printed more than {cap} bytes (the rest is not shown; interrupt it to stop it)"),
            });
        }
        false
    }

    pub fn viewers(&self) -> usize {
        self.viewers.lock().unwrap().len()
    }

    /// Executes sent and not done yet.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    pub async fn worker(&self) -> Option<String> {
        self.state
            .lock()
            .await
            .link
            .as_ref()
            .map(|l| l.host.clone())
    }
}

const OPEN_TIMEOUT: Duration = Duration::from_secs(90);
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

impl Backend {
    /// Opens (or joins) a workspace for a viewer; returns the worker it runs on.
    pub async fn open_workspace(
        self: &Arc<Self>,
        account_id: i64,
        id: &str,
        viewer_id: u64,
        viewer: Viewer,
    ) -> Result<(Arc<OpenWs>, String), ApiError> {
        let ws = {
            let mut map = self.open.map.lock().unwrap();
            map.entry(id.to_string())
                .or_insert_with(|| {
                    Arc::new(OpenWs {
                        id: id.to_string(),
                        account_id,
                        state: Default::default(),
                        viewers: Mutex::new(Vec::new()),
                        control: Mutex::new(VecDeque::new()),
                        running: Mutex::new(HashSet::new()),
                        output: Mutex::new(HashMap::new()),
                        version: std::sync::atomic::AtomicI64::new(-1),
                        unstored: AtomicBool::new(false),
                    })
                })
                .clone()
        };
        if ws.account_id != account_id {
            return Err(ApiError::not_found(format!(
                "no workspace {id} in your account"
            )));
        }
        {
            let mut v = ws.viewers.lock().unwrap();
            if !v.iter().any(|(i, _)| *i == viewer_id) {
                v.push((viewer_id, viewer));
            }
        }
        let mut st = ws.state.lock().await;
        if st.link.as_ref().is_none_or(|l| l.is_dead()) {
            if let Err(e) = self.place(&ws, &mut st, &[]).await {
                drop(st);
                self.leave(&ws.id, viewer_id).await;
                return Err(e);
            }
            self.metrics.inc(&self.metrics.workspaces_opened);
        }
        let host = st.link.as_ref().map(|l| l.host.clone()).unwrap_or_default();
        drop(st);
        Ok((ws, host))
    }

    /// Starts the workspace's session on the least loaded worker (not in `exclude`), from its
    /// last save.
    pub(super) async fn place(
        self: &Arc<Self>,
        ws: &Arc<OpenWs>,
        st: &mut Placement,
        exclude: &[String],
    ) -> Result<(), ApiError> {
        let row = self
            .db()
            .await?
            .query_opt(
                "SELECT bundle, version FROM workspaces WHERE id = $1",
                &[&ws.id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("workspace {} was deleted", ws.id)))?;
        let bundle: Option<Vec<u8>> = row.get(0);
        let version: i64 = row.get(1);
        let b64 = bundle.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
        // Still open on a worker through another backend (one that died without handing it
        // over): that worker first, so the session is taken over ("already open" below) with
        // what was typed since the last save and the engine's state. Read before
        // `fair_shares` claims the row for this backend.
        // Any backend's record counts, this one's too: this process does not hold the session
        // (else it would not be placing it), so a record naming this host is from before a
        // restart, or from a stop whose save failed.
        let mut still_open = None;
        if exclude.is_empty() {
            let row = self
                .db()
                .await?
                .query_opt(
                    "SELECT worker FROM open_sessions WHERE workspace = $1",
                    &[&ws.id],
                )
                .await?;
            if let Some(r) = row {
                let worker: String = r.get(0);
                still_open = self.workers.take(&worker);
                // A worker this backend has not heard from yet, just after it started: opening
                // elsewhere from the last save would fork the workspace (two sessions, the
                // newer work in the one left behind). Wait for the announcements instead.
                if still_open.is_none()
                    && !self.workers.knows(&worker)
                    && self.born.elapsed() < super::workers::STALE
                {
                    return Err(ApiError::busy(format!(
                        "the workspace is still open on worker {worker}, which this backend has not heard from yet; try again shortly"
                    )));
                }
            }
        }
        let account_on = self.fair_shares(ws).await?;
        let mut tried: Vec<String> = exclude.to_vec();
        let mut last_err = String::from("no worker is available");
        for attempt in 0..4 {
            if attempt > 0 {
                // A failed attempt's waiter must not take the next attempt's answer.
                ws.control.lock().unwrap().clear();
            }
            let picked = match still_open.take() {
                Some(w) => Ok(w),
                None => self.workers.pick(&tried, &account_on),
            };
            let (host, address) = match picked {
                Ok(w) => w,
                Err(share) => {
                    if share {
                        last_err = "your open workspaces already hold half of every worker with room (the share one account may have, so others always find room): close one".into();
                    }
                    break;
                }
            };
            tried.push(host.clone());
            let link = match self.link(&host, &address).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(worker = %host, workspace = %ws.id, "cannot reach the worker to place a workspace: {e}");
                    self.workers.down(&host);
                    last_err = e;
                    continue;
                }
            };
            self.watch(ws, st, &link);
            let (tx, wait) = oneshot::channel();
            ws.control.lock().unwrap().push_back(tx);
            let sent = link
                .send(Request::Open {
                    session: ws.id.clone(),
                    bundle: b64.clone(),
                    limits: None,
                })
                .await;
            if let Err(e) = sent {
                last_err = e;
                continue;
            }
            match tokio::time::timeout(OPEN_TIMEOUT, wait).await {
                Ok(Ok(Event::Opened { .. })) => {}
                // Still open there from before (another backend, or this one before a restart):
                // its files are newer than the last save, so keep it.
                Ok(Ok(Event::Error { message, .. })) if message.contains("already open") => {}
                Ok(Ok(Event::Error { message, .. })) => {
                    tracing::warn!(worker = %host, workspace = %ws.id, "the worker refused to open the workspace: {message}");
                    last_err = format!("worker {host}: {message}");
                    link.unroute(&ws.id);
                    continue;
                }
                Ok(Ok(other)) => {
                    last_err = format!("worker {host} answered {other:?}");
                    link.unroute(&ws.id);
                    continue;
                }
                Ok(Err(_)) => {
                    last_err = format!("lost worker {host} while opening");
                    continue;
                }
                Err(_) => {
                    last_err = format!("worker {host} did not open the workspace in time");
                    link.unroute(&ws.id);
                    // It may still finish there: close it, or it runs unseen until its idle
                    // timeout.
                    let _ = link
                        .send(Request::Close {
                            session: ws.id.clone(),
                        })
                        .await;
                    continue;
                }
            }
            st.link = Some(link);
            st.closing = false;
            ws.version
                .store(version, std::sync::atomic::Ordering::SeqCst);
            self.record_open(ws, &host).await?;
            tracing::info!(workspace = %ws.id, worker = %host, "workspace opened");
            return Ok(());
        }
        ws.control.lock().unwrap().clear();
        st.link = None;
        self.forget_open(&ws.id).await;
        Err(ApiError::busy(format!(
            "cannot open the workspace: {last_err}; try again shortly"
        )))
    }

    /// Routes `link`'s events for `ws` to a new pump: the placement's next generation.
    pub(super) fn watch(self: &Arc<Self>, ws: &Arc<OpenWs>, st: &mut Placement, link: &Link) {
        st.generation += 1;
        let rx = link.route(&ws.id);
        tokio::spawn(pump(
            self.clone(),
            ws.clone(),
            rx,
            st.generation,
            link.host.clone(),
        ));
    }

    /// `ws` is open on worker `host` (for the per-account cap and shares).
    pub(super) async fn record_open(&self, ws: &OpenWs, host: &str) -> Result<(), ApiError> {
        self.db()
            .await?
            .execute(
                "INSERT INTO open_sessions (workspace, account_id, backend, worker) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (workspace) DO UPDATE SET account_id = $2, backend = $3, worker = $4, since = now()",
                &[&ws.id, &ws.account_id, &self.config.host, &host],
            )
            .await?;
        Ok(())
    }

    /// The account's open workspaces per worker (but `ws`), across backends; refuses when the
    /// account is at its cap of open workspaces, and otherwise reserves `ws`'s place (a row with
    /// no worker yet) in the same transaction, under a lock per account, so opens started at
    /// once cannot all pass the count.
    async fn fair_shares(&self, ws: &OpenWs) -> Result<HashMap<String, u32>, ApiError> {
        let mut db = self.db().await?;
        let tx = db.transaction().await?;
        tx.execute(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&ws.account_id],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT worker, count(*) FROM open_sessions WHERE account_id = $1 AND workspace <> $2 GROUP BY worker",
                &[&ws.account_id, &ws.id],
            )
            .await?;
        let on: HashMap<String, u32> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
            .collect();
        let open: u32 = on.values().sum();
        let cap = self.config.accounts.max_open_workspaces;
        if open >= cap {
            return Err(ApiError::new(
                409,
                format!(
                    "you have {open} workspaces open, the most one account may have at once ({cap}): close one first"
                ),
            ));
        }
        tx.execute(
            "INSERT INTO open_sessions (workspace, account_id, backend, worker) VALUES ($1, $2, $3, '')
             ON CONFLICT (workspace) DO UPDATE SET account_id = $2, backend = $3, since = now()",
            &[&ws.id, &ws.account_id, &self.config.host],
        )
        .await?;
        tx.commit().await?;
        Ok(on)
    }

    /// This backend no longer holds `ws` open.
    async fn forget_open(&self, ws: &str) {
        let r = async {
            self.db()
                .await?
                .execute(
                    "DELETE FROM open_sessions WHERE workspace = $1 AND backend = $2",
                    &[&ws, &self.config.host],
                )
                .await
                .map_err(ApiError::from)
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(workspace = %ws, "forgetting an open session: {}", e.message);
        }
    }

    /// `place` behind a box: the failover in `pump` calls it, and `place` spawns `pump`.
    fn place_boxed<'a>(
        self: &'a Arc<Self>,
        ws: &'a Arc<OpenWs>,
        st: &'a mut Placement,
        exclude: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send + 'a>>
    {
        Box::pin(self.place(ws, st, exclude))
    }

    /// Sends a control request and waits for its answer.
    async fn control(
        &self,
        ws: &OpenWs,
        st: &Placement,
        req: Request,
        timeout: Duration,
    ) -> Result<Event, ApiError> {
        let link = st
            .link
            .as_ref()
            .filter(|l| !l.is_dead())
            .ok_or_else(|| ApiError::busy("the workspace's worker is gone; it will reopen"))?;
        let (tx, rx) = oneshot::channel();
        ws.control.lock().unwrap().push_back(tx);
        link.send(req).await.map_err(ApiError::busy)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(_)) => Err(ApiError::busy("lost the worker during the request")),
            Err(_) => Err(ApiError::busy("the worker did not answer in time")),
        }
    }

    /// Runs code; output arrives as events with the request's `id`, ending with `done`.
    pub async fn execute(
        self: &Arc<Self>,
        ws: &Arc<OpenWs>,
        id: u64,
        code: String,
    ) -> Result<(), ApiError> {
        let mut st = ws.state.lock().await;
        if st.link.as_ref().is_none_or(|l| l.is_dead()) {
            self.place(ws, &mut st, &[]).await?;
            let worker = st.link.as_ref().map(|l| l.host.clone());
            ws.broadcast(BrowserEvent::Reopened {
                workspace: ws.id.clone(),
                worker,
                message: "the workspace was reopened from its last save".into(),
            });
        }
        let link = st.link.clone().expect("placed above");
        ws.running.lock().unwrap().insert(id);
        self.metrics.inc(&self.metrics.executes);
        link.send(Request::Execute {
            session: ws.id.clone(),
            id,
            code,
        })
        .await
        .map_err(ApiError::busy)
    }

    pub async fn interrupt(&self, ws: &OpenWs) -> Result<(), ApiError> {
        let st = ws.state.lock().await;
        if let Some(l) = &st.link {
            l.send(Request::Interrupt {
                session: ws.id.clone(),
            })
            .await
            .map_err(ApiError::busy)?;
        }
        Ok(())
    }

    /// Commits the worker's changes and stores the bundle; returns whether anything changed.
    pub async fn save(&self, ws: &OpenWs, message: &str) -> Result<bool, ApiError> {
        let st = ws.state.lock().await;
        self.save_locked(ws, &st, message).await
    }

    pub(super) async fn save_locked(
        &self,
        ws: &OpenWs,
        st: &Placement,
        message: &str,
    ) -> Result<bool, ApiError> {
        let req = Request::Save {
            session: ws.id.clone(),
            message: message.to_string(),
        };
        match self.control(ws, st, req, SAVE_TIMEOUT).await? {
            Event::Saved {
                bundle, changed, ..
            } => {
                if changed {
                    ws.unstored.store(true, Ordering::SeqCst);
                }
                if ws.unstored.load(Ordering::SeqCst) {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(bundle)
                        .map_err(|e| ApiError::internal(format!("the worker's bundle: {e}")))?;
                    if bytes.len() > self.config.max_bundle_bytes() {
                        return Err(ApiError::too_large(format!(
                            "the workspace is {} MB, over the limit of {} MB: remove files and save again",
                            bytes.len() >> 20,
                            self.config.max_bundle_mb
                        )));
                    }
                    self.store_session_bundle(ws, &bytes).await?;
                    ws.unstored.store(false, Ordering::SeqCst);
                }
                Ok(changed)
            }
            Event::Error { message, .. } => Err(ApiError::internal(message)),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// A file operation in an open workspace, done by its worker as the workspace's user.
    pub async fn file_op(&self, ws: &OpenWs, op: FileOp) -> Result<FileResult, ApiError> {
        let st = ws.state.lock().await;
        if st.link.as_ref().is_none_or(|l| l.is_dead()) {
            return Err(ApiError::busy(
                "the workspace's session is not running: run a cell to reopen it, then retry",
            ));
        }
        let req = Request::File {
            session: ws.id.clone(),
            op,
        };
        match self.control(ws, &st, req, FILE_TIMEOUT).await? {
            Event::FileResult {
                result: FileResult::Failed { message },
                ..
            } => Err(ApiError::bad(message)),
            Event::FileResult { result, .. } => Ok(result),
            Event::Error { message, .. } => Err(ApiError::internal(message)),
            other => Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Stores what `ws`'s session saved, over the version it descends from only.
    async fn store_session_bundle(&self, ws: &OpenWs, bytes: &[u8]) -> Result<(), ApiError> {
        use std::sync::atomic::Ordering;
        let base = ws.version.load(Ordering::SeqCst);
        let db = self.db().await?;
        let row = if base < 0 {
            db.query_opt(
                "UPDATE workspaces SET bundle = $2, version = version + 1, updated = now() WHERE id = $1 RETURNING version",
                &[&ws.id, &bytes],
            )
            .await?
        } else {
            db.query_opt(
                "UPDATE workspaces SET bundle = $2, version = version + 1, updated = now() WHERE id = $1 AND version = $3 RETURNING version",
                &[&ws.id, &bytes, &base],
            )
            .await?
        };
        match row {
            Some(r) => {
                ws.version.store(r.get(0), Ordering::SeqCst);
                Ok(())
            }
            None => {
                tracing::warn!(workspace = %ws.id, base, "a save from a session that fell behind was not stored: the workspace was saved from another session since");
                Err(ApiError::conflict(
                    "the workspace was saved from another window or session since this one opened: this copy was not stored; reopen the workspace to continue from the saved one",
                ))
            }
        }
    }

    pub async fn store_bundle(&self, id: &str, bytes: &[u8]) -> Result<(), ApiError> {
        self.db()
            .await?
            .execute(
                "UPDATE workspaces SET bundle = $2, version = version + 1, updated = now() WHERE id = $1",
                &[&id, &bytes],
            )
            .await?;
        Ok(())
    }

    /// Closes the session on its worker (without saving) and opens it again from the stored
    /// bundle: after a revert.
    pub async fn reload(self: &Arc<Self>, ws: &Arc<OpenWs>) -> Result<(), ApiError> {
        let mut st = ws.state.lock().await;
        self.end_session(ws, &mut st).await;
        self.place(ws, &mut st, &[]).await
    }

    /// Saves if open (so stored = latest), for history, publish and download.
    pub async fn save_if_open(&self, id: &str) -> Result<(), ApiError> {
        let ws = self.open.map.lock().unwrap().get(id).cloned();
        if let Some(ws) = ws {
            let st = ws.state.lock().await;
            if st.link.as_ref().is_some_and(|l| !l.is_dead()) {
                self.save_locked(&ws, &st, "Save").await?;
            }
        }
        Ok(())
    }

    pub fn open_ws(&self, id: &str) -> Option<Arc<OpenWs>> {
        self.open.map.lock().unwrap().get(id).cloned()
    }

    /// A viewer leaves; the last one out saves and closes the session.
    pub async fn leave(self: &Arc<Self>, id: &str, viewer_id: u64) {
        let Some(ws) = self.open_ws(id) else { return };
        let empty = {
            let mut v = ws.viewers.lock().unwrap();
            v.retain(|(i, _)| *i != viewer_id);
            v.is_empty()
        };
        if empty {
            self.close_ws(&ws).await;
        }
    }

    async fn close_ws(&self, ws: &Arc<OpenWs>) {
        let mut st = ws.state.lock().await;
        if ws.viewers() > 0 {
            return; // someone joined meanwhile
        }
        if st.link.as_ref().is_some_and(|l| !l.is_dead()) {
            if let Err(e) = self.save_locked(ws, &st, "Save on close").await {
                tracing::warn!(workspace = %ws.id, "saving on close: {}", e.message);
                if e.status != 409 {
                    // Not saved (the database did not answer): the session stays on its
                    // worker, recorded, so whichever backend opens the workspace next takes it
                    // over with the work since the last save (`place`).
                    st.closing = true;
                    if let Some(l) = st.link.take() {
                        l.unroute(&ws.id);
                    }
                    let mut map = self.open.map.lock().unwrap();
                    if ws.viewers() == 0 {
                        map.remove(&ws.id);
                    }
                    return;
                }
            }
        }
        self.end_session(ws, &mut st).await;
        let mut map = self.open.map.lock().unwrap();
        if ws.viewers() == 0 {
            map.remove(&ws.id);
        }
    }

    /// Closes the session on its worker (without saving) and forgets the placement.
    async fn end_session(&self, ws: &OpenWs, st: &mut Placement) {
        st.closing = true;
        if st.link.as_ref().is_some_and(|l| !l.is_dead()) {
            let close = Request::Close {
                session: ws.id.clone(),
            };
            let _ = self.control(ws, st, close, SAVE_TIMEOUT).await;
        }
        if let Some(l) = st.link.take() {
            l.unroute(&ws.id);
        }
        self.forget_open(&ws.id).await;
    }

    /// At shutdown: save and close everything open.
    pub async fn close_all(&self) {
        let all: Vec<_> = self.open.map.lock().unwrap().values().cloned().collect();
        for ws in all {
            ws.viewers.lock().unwrap().clear();
            self.close_ws(&ws).await;
        }
    }

    /// The workspace was deleted: close its session without saving.
    pub async fn discard(&self, id: &str) {
        let Some(ws) = self.open.map.lock().unwrap().remove(id) else {
            return;
        };
        ws.broadcast(BrowserEvent::Closed {
            workspace: id.to_string(),
            reason: "deleted".into(),
            message: None,
        });
        ws.viewers.lock().unwrap().clear();
        let mut st = ws.state.lock().await;
        self.end_session(&ws, &mut st).await;
    }
}

/// Moves one placement's events to the viewers and the control waiters; when the link breaks,
/// fails the workspace over to another worker.
async fn pump(
    backend: Arc<Backend>,
    ws: Arc<OpenWs>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    generation: u64,
    host: String,
) {
    let cap = backend.config.max_cell_output_bytes;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Stdout { id, data, .. } => {
                if ws.within_cap(id, data.len(), cap) {
                    ws.broadcast(BrowserEvent::Stdout {
                        workspace: ws.id.clone(),
                        id,
                        data,
                    })
                }
            }
            Event::Stderr { id, data, .. } => {
                if ws.within_cap(id, data.len(), cap) {
                    ws.broadcast(BrowserEvent::Stderr {
                        workspace: ws.id.clone(),
                        id,
                        data,
                    })
                }
            }
            Event::Done {
                id,
                status,
                message,
                ..
            } => {
                ws.running.lock().unwrap().remove(&id);
                ws.output.lock().unwrap().remove(&id);
                ws.broadcast(BrowserEvent::Done {
                    workspace: ws.id.clone(),
                    id,
                    status,
                    message,
                });
            }
            Event::Image { id, mime, data, .. } => {
                if ws.within_cap(id, data.len(), cap) {
                    ws.broadcast(BrowserEvent::Image {
                        workspace: ws.id.clone(),
                        id,
                        mime,
                        data,
                    })
                }
            }
            ev @ (Event::Opened { .. }
            | Event::Saved { .. }
            | Event::FileResult { .. }
            | Event::Closed { .. }
            | Event::Error { .. }) => {
                let waiter = ws.control.lock().unwrap().pop_front();
                match (waiter, ev) {
                    (Some(w), ev) => {
                        let _ = w.send(ev);
                    }
                    (None, Event::Closed { reason, .. }) => {
                        // The session ended on its own (a limit, idle): reopen on next use.
                        ws.broadcast(BrowserEvent::Closed {
                            workspace: ws.id.clone(),
                            reason,
                            message: Some(
                                "the session ended; the next execute reopens it from the last save"
                                    .into(),
                            ),
                        });
                        let mut st = ws.state.lock().await;
                        if st.generation == generation {
                            if let Some(l) = st.link.take() {
                                l.unroute(&ws.id);
                            }
                        }
                        return;
                    }
                    (None, Event::Error { message, .. }) => ws.broadcast(BrowserEvent::Error {
                        workspace: ws.id.clone(),
                        message,
                    }),
                    (None, _) => {}
                }
            }
            Event::Pong { .. } => {}
        }
    }
    // The route was dropped: the link broke, or we closed the session ourselves.
    let mut st = ws.state.lock().await;
    if st.generation != generation || st.closing {
        return;
    }
    tracing::warn!(workspace = %ws.id, worker = %host, "worker lost; reopening elsewhere");
    backend.metrics.inc(&backend.metrics.worker_failovers);
    // Waiters get an error (their senders drop); running executes end as killed.
    ws.control.lock().unwrap().clear();
    let running: Vec<u64> = ws.running.lock().unwrap().drain().collect();
    ws.output.lock().unwrap().clear();
    for id in running {
        ws.broadcast(BrowserEvent::Done {
            workspace: ws.id.clone(),
            id,
            status: Status::Killed,
            message: Some(format!("worker {host} was lost")),
        });
    }
    ws.broadcast(BrowserEvent::WorkerLost {
        workspace: ws.id.clone(),
        worker: host.clone(),
    });
    st.link = None;
    if ws.viewers() == 0 {
        return;
    }
    match backend
        .place_boxed(&ws, &mut st, std::slice::from_ref(&host))
        .await
    {
        Ok(()) => {
            let worker = st.link.as_ref().map(|l| l.host.clone());
            ws.broadcast(BrowserEvent::Moved {
                workspace: ws.id.clone(),
                worker,
                message: format!(
                    "worker {host} was lost; the workspace was reopened from its last save"
                ),
            });
        }
        Err(e) => ws.broadcast(BrowserEvent::Error {
            workspace: ws.id.clone(),
            message: format!("worker {host} was lost and {}", e.message),
        }),
    }
}
