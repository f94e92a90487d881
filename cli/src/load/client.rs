//! The browser client's rules (static/sagews.js; testkit's `person` keeps the same ones over
//! xhr-polling for the lab drills), over either transport: requests `{"id", "op", ...}`
//! answered by one reply each, an execute's output as events with its id. A session the
//! server closes, forgets or cuts is replaced (at once after a 1012 or 2010 close or a
//! forgotten session, otherwise after an exponential backoff with jitter), the open workspace
//! opened again on it first (a backend without a worker yet answers 503: tried again for a
//! minute), then the requests a stopping backend refused as `restarting` are sent again with
//! their ids. A request in flight when the connection dropped is lost (it may or may not have
//! been done) unless it only reads, which is sent again; an execute whose `done` had not come
//! is lost too. Nothing panics on a network error: what a browser would have seen is returned
//! and counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::{Failure, Jar, KeepAlive, Site};
use super::proto::{Event, Frame, Incoming, Op, Reply};
use super::stats::{Kind, Shared};
use super::transport::{self, Conn, Ctx, Got, OpenFailure};

/// How long a request may go unanswered, reconnects included (testkit's `person` waits as
/// long).
pub const PATIENCE: Duration = Duration::from_secs(120);

/// How long a workspace is opened again after a reconnect while the backend has no worker
/// for it (sagews.js's `REOPEN_PATIENCE`).
pub const REOPEN_PATIENCE: Duration = Duration::from_secs(60);

/// The reconnect delay before attempt `n` (0-based): exponential from 0.5 s, capped at 30 s,
/// half of it jitter (`r` in [0, 1)), as sagews.js's `backoffDelay`.
pub fn backoff(n: u32, r: f64) -> Duration {
    let d = (500.0 * 2f64.powi(n.min(16) as i32)).min(30_000.0);
    Duration::from_millis((d / 2.0 + r * d / 2.0) as u64)
}

/// Why a request or an execute has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The connection was lost before the answer: it may or may not have been done.
    Lost,
    /// No answer within the patience given.
    Timeout,
    /// No session could be opened (or the workspace reopened) within the patience.
    NoSession(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Lost => {
                f.write_str("the connection was lost before the server answered; it may or may not have been done")
            }
            CallError::Timeout => f.write_str("no answer in time"),
            CallError::NoSession(why) => write!(f, "no session: {why}"),
        }
    }
}

/// An execute's end.
#[derive(Debug, Clone)]
pub struct Done {
    pub id: u64,
    pub status: String,
    pub message: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// When the `done` event arrived.
    pub at: Instant,
}

/// A request sent or to send.
struct Pending {
    id: u64,
    text: String,
    reads: bool,
}

/// What this client saw, for the user's record.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Seen {
    /// SockJS sessions opened (the first, then one per reconnect).
    pub sessions: u32,
    /// Sessions the server closed (or forgot, or cut) while open.
    pub closed: u32,
    /// Requests refused as `restarting` and sent again after reconnecting.
    pub restarted_requests: u32,
    pub moved: u32,
    pub worker_lost: u32,
    /// Errors by kind this client (and its user) counted.
    pub errors: std::collections::BTreeMap<&'static str, u32>,
}

/// Output kept per execute at most (the cells print a number).
const MAX_OUTPUT: usize = 4096;

pub struct Client {
    shared: Arc<Shared>,
    site: Arc<Site>,
    source: Option<IpAddr>,
    jar: Arc<Mutex<Jar>>,
    kind: transport::Kind,
    conn: Option<Conn>,
    rest: KeepAlive,
    /// The open workspace, opened again on every new session.
    pub workspace: Option<String>,
    next_id: u64,
    /// Sent, not answered.
    inflight: Vec<Pending>,
    /// Not taken or refused as `restarting`: sent again, in order, on the next session.
    held: Vec<Pending>,
    replies: Vec<Reply>,
    /// Executes whose `done` is awaited: whether the connection was lost under them.
    running: HashMap<u64, bool>,
    output: HashMap<u64, (String, String)>,
    /// `done` events not taken yet.
    pub dones: Vec<Done>,
    /// Failed attempts since the last stable session.
    attempt: u32,
    opened_at: Option<Instant>,
    connected: bool,
    rng: u64,
    /// The next connect tries at once (the server asked for it: 1012, 2010, forgotten).
    at_once: bool,
    /// The id of the `open` a reconnect sent, while its reply is awaited.
    reopen_id: Option<u64>,
    pub seen: Seen,
}

impl Client {
    pub fn new(
        shared: Arc<Shared>,
        site: Arc<Site>,
        source: Option<IpAddr>,
        kind: transport::Kind,
        seed: u64,
    ) -> Client {
        Client {
            shared,
            rest: KeepAlive::new(site.clone(), source),
            site,
            source,
            jar: Arc::new(Mutex::new(Jar::default())),
            kind,
            conn: None,
            workspace: None,
            next_id: 1,
            inflight: Vec::new(),
            held: Vec::new(),
            replies: Vec::new(),
            running: HashMap::new(),
            output: HashMap::new(),
            dones: Vec::new(),
            attempt: 0,
            opened_at: None,
            connected: false,
            rng: seed | 1,
            at_once: false,
            reopen_id: None,
            seen: Seen::default(),
        }
    }

    /// Counts an error for the run and for this user.
    pub fn error(&mut self, kind: Kind, text: impl Into<String>) {
        *self.seen.errors.entry(kind.as_str()).or_default() += 1;
        self.shared.error(kind, text);
    }

    fn random(&mut self) -> f64 {
        // xorshift64*: jitter and session ids need no more.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn set_connected(&mut self, on: bool) {
        if on != self.connected {
            self.connected = on;
            if on {
                self.shared.connected.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.connected.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// A JSON request to the REST API with this browser's cookies (sign-up, sign-in).
    pub async fn rest(
        &mut self,
        path: &str,
        body: &str,
    ) -> Result<sagews_wire::http1::Response, Failure> {
        let cookie = self.jar.lock().unwrap().header();
        let mut headers = vec![("Content-Type", "application/json")];
        if !cookie.is_empty() {
            headers.push(("Cookie", cookie.as_str()));
        }
        let r = self
            .rest
            .request(
                "POST",
                path,
                &headers,
                body.as_bytes(),
                Duration::from_secs(60),
            )
            .await?;
        self.jar.lock().unwrap().keep_response(&r);
        Ok(r)
    }

    fn cx(&self) -> Ctx {
        Ctx {
            site: self.site.clone(),
            source: self.source,
            jar: self.jar.clone(),
        }
    }

    /// Drops the REST connection (kept alive between sign-up and sign-in only).
    pub fn rest_done(&mut self) {
        self.rest.close();
    }

    fn session_id(&mut self) -> String {
        let server = (self.random() * 1000.0) as u32 % 1000;
        let a = (self.random() * (1u64 << 53) as f64) as u64;
        let b = (self.random() * (1u64 << 53) as f64) as u64;
        format!("{server:03}/{a:014x}{b:014x}")
    }

    /// Opens a new session (backing off between failures), the workspace opened again on it,
    /// then the held requests sent again. Gives up after `deadline`.
    pub async fn connect(&mut self, deadline: Instant) -> Result<(), CallError> {
        'session: loop {
            self.conn = None;
            self.set_connected(false);
            if Instant::now() > deadline {
                return Err(CallError::NoSession(format!(
                    "none opened within {} s",
                    PATIENCE.as_secs()
                )));
            }
            if self.attempt > 0 && !std::mem::take(&mut self.at_once) {
                let d = backoff(self.attempt - 1, self.random());
                tokio::time::sleep(d.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
            let id = self.session_id();
            let opened = transport::open(self.kind, &self.cx(), &id).await;
            let conn = match opened {
                Ok(c) => c,
                Err(e) => {
                    self.attempt += 1;
                    let kind = match &e {
                        OpenFailure::Http(f) => f.kind(),
                        OpenFailure::Closed(..) => Kind::Closed,
                        OpenFailure::Other(_) => Kind::Other,
                    };
                    self.error(kind, format!("opening a session: {e}"));
                    continue;
                }
            };
            self.conn = Some(conn);
            self.seen.sessions += 1;
            if self.seen.sessions > 1 {
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            self.opened_at = Some(Instant::now());
            // The workspace first, as the client does: the server runs requests in order.
            if let Some(ws) = self.workspace.clone() {
                let until = (Instant::now() + REOPEN_PATIENCE).min(deadline);
                let mut wait = Duration::from_millis(500);
                loop {
                    let id = self.next_id;
                    self.next_id += 1;
                    let text = Op::Open {
                        workspace: ws.clone(),
                    }
                    .to_text(id);
                    self.reopen_id = Some(id);
                    if self.send_now(&[&text]).await.is_err() {
                        self.attempt += 1;
                        continue 'session;
                    }
                    let reply = match self.reply_on_this_session(id, deadline).await {
                        Some(r) => r,
                        None => {
                            self.attempt += 1;
                            continue 'session;
                        }
                    };
                    if reply.ok {
                        break;
                    }
                    if (reply.status == Some(503)) && Instant::now() < until {
                        self.error(Kind::Rejected, format!("reopening: {}", reply.refusal()));
                        if !self.linger(Instant::now() + wait).await {
                            self.attempt += 1;
                            continue 'session;
                        }
                        wait = (wait * 2).min(Duration::from_secs(8));
                        continue;
                    }
                    return Err(CallError::NoSession(format!(
                        "reopening {ws}: {}",
                        reply.refusal()
                    )));
                }
            }
            let held = std::mem::take(&mut self.held);
            if !held.is_empty() {
                let texts: Vec<&str> = held.iter().map(|p| p.text.as_str()).collect();
                if self.send_now(&texts).await.is_err() {
                    self.held = held;
                    self.attempt += 1;
                    continue 'session;
                }
                self.inflight.extend(held);
            }
            self.set_connected(true);
            return Ok(());
        }
    }

    /// Sends on the current session; an error when there is none or it did not take them.
    async fn send_now(&mut self, texts: &[&str]) -> Result<(), ()> {
        let cx = self.cx();
        let Some(conn) = self.conn.as_mut() else {
            return Err(());
        };
        match transport::send(conn, &cx, texts).await {
            Ok(()) => Ok(()),
            Err((kind, why)) => {
                self.error(kind, why);
                Err(())
            }
        }
    }

    /// Waits for reply `id` on the current session without replacing it: None when the
    /// session ended first (or the deadline passed).
    async fn reply_on_this_session(&mut self, id: u64, deadline: Instant) -> Option<Reply> {
        loop {
            if let Some(i) = self.replies.iter().position(|r| r.id == Some(id)) {
                self.reopen_id = None;
                return Some(self.replies.remove(i));
            }
            if Instant::now() > deadline {
                return None;
            }
            let (at, got) = self.recv(deadline).await?;
            if !self.took(at, got) {
                return None;
            }
        }
    }

    /// Receives on the current session until `until`, without replacing it: false when the
    /// session ended first.
    async fn linger(&mut self, until: Instant) -> bool {
        while Instant::now() < until {
            let Some((at, got)) = self.recv(until).await else {
                return self.conn.is_some();
            };
            if !self.took(at, got) {
                return false;
            }
        }
        true
    }

    /// Handles what the session gave: false when it ended the session (counted).
    fn took(&mut self, at: Instant, got: Got) -> bool {
        match got {
            Got::Frame(Frame::Messages(m)) => self.arrived(m, at),
            Got::Frame(Frame::Heartbeat) => {}
            Got::Retry(e) => self.error(e.kind(), format!("polling: {e}")),
            other => {
                self.lost_note(&other);
                self.conn = None;
                return false;
            }
        }
        true
    }

    /// One receive from the current session, at most until `deadline` (None then, or when
    /// there is no session).
    async fn recv(&mut self, deadline: Instant) -> Option<(Instant, Got)> {
        self.conn.as_mut()?.recv(deadline).await
    }

    /// Counts why a session ended.
    fn lost_note(&mut self, got: &Got) {
        self.seen.closed += 1;
        let text = match got {
            Got::Frame(Frame::Close(code, reason)) => {
                format!("the server closed the session: c[{code}, {reason:?}]")
            }
            Got::Frame(Frame::Open) => "the server forgot the session (a new `o`)".into(),
            Got::Forgotten => "the server forgot the session (404)".into(),
            Got::Lost(why) => why.clone(),
            other => format!("{other:?}"),
        };
        self.error(Kind::Closed, text);
    }

    /// Messages in: replies and `done`s kept, output gathered per execute, workspace events
    /// counted.
    fn arrived(&mut self, msgs: Vec<Incoming>, at: Instant) {
        for m in msgs {
            match m {
                Incoming::Reply(r) => {
                    // Only awaited replies are kept (one to a request given up on is not).
                    let awaited = r.id.is_some_and(|id| {
                        Some(id) == self.reopen_id
                            || self.inflight.iter().any(|p| p.id == id)
                            || self.held.iter().any(|p| p.id == id)
                    });
                    if awaited {
                        self.replies.push(r);
                    }
                }
                Incoming::Event(e) => match e {
                    Event::Stdout { id, data } => {
                        let o = &mut self.output.entry(id).or_default().0;
                        if o.len() < MAX_OUTPUT {
                            o.push_str(&data);
                        }
                    }
                    Event::Stderr { id, data } => {
                        let o = &mut self.output.entry(id).or_default().1;
                        if o.len() < MAX_OUTPUT {
                            o.push_str(&data);
                        }
                    }
                    Event::Done {
                        id,
                        status,
                        message,
                    } => {
                        let (stdout, stderr) = self.output.remove(&id).unwrap_or_default();
                        self.dones.push(Done {
                            id,
                            status,
                            message,
                            stdout,
                            stderr,
                            at,
                        });
                    }
                    Event::Moved { worker, message } => {
                        self.seen.moved += 1;
                        self.shared.moved.fetch_add(1, Ordering::Relaxed);
                        self.error(
                            Kind::Moved,
                            format!("to {}: {message}", worker.as_deref().unwrap_or("?")),
                        );
                    }
                    Event::WorkerLost { worker } => {
                        self.seen.worker_lost += 1;
                        self.error(Kind::WorkerLost, format!("worker {worker} was lost"));
                    }
                    Event::Reopened { message } => {
                        self.error(Kind::Other, format!("reopened: {message}"))
                    }
                    // What the user's own `delete` says.
                    Event::Closed { reason } if reason == "deleted" => {}
                    Event::Closed { reason } => {
                        self.error(Kind::Other, format!("workspace closed: {reason}"))
                    }
                    Event::Error { message } => {
                        self.error(Kind::Other, format!("workspace error: {message}"))
                    }
                    Event::Other => {}
                },
            }
        }
    }

    /// The session ended: what was in flight is lost unless it only reads (sent again), a
    /// running execute too; then a new session, at once or after the backoff.
    async fn reconnect(&mut self, at_once: bool, deadline: Instant) -> Result<(), CallError> {
        self.conn = None;
        self.set_connected(false);
        if self
            .opened_at
            .is_some_and(|t| t.elapsed() > Duration::from_secs(10))
        {
            self.attempt = 0;
        }
        let mut again = Vec::new();
        for p in std::mem::take(&mut self.inflight) {
            if p.reads {
                again.push(p);
            }
        }
        again.append(&mut self.held);
        self.held = again;
        // Executes that will be sent on the next session have not run: not lost.
        for (id, lost) in self.running.iter_mut() {
            let done = self.dones.iter().any(|d| d.id == *id);
            let waiting = self.held.iter().any(|p| p.id == *id);
            *lost |= !done && !waiting;
        }
        let lost: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, l)| **l)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.output.remove(&id);
        }
        if at_once {
            self.at_once = true;
        } else {
            self.attempt += 1;
        }
        self.connect(deadline).await
    }

    /// One receive, until `until` at most: messages kept; a closed, forgotten or cut session
    /// replaced (trying until `deadline`).
    async fn pump(&mut self, until: Instant, deadline: Instant) -> Result<(), CallError> {
        let Some((at, got)) = self.recv(until).await else {
            if self.conn.is_none() {
                return self.reconnect(false, deadline).await;
            }
            return Ok(()); // the deadline passed
        };
        match got {
            Got::Frame(Frame::Messages(m)) => self.arrived(m, at),
            Got::Frame(Frame::Heartbeat) => {}
            Got::Retry(e) => self.error(e.kind(), format!("polling: {e}")),
            // 2010: another connection holds the session; 1012: the server restarts (it has
            // handed this session over); a second `o` or a 404: it forgot the session. Again
            // at once; anything else after the backoff.
            g @ (Got::Frame(Frame::Close(1012 | 2010, _))
            | Got::Frame(Frame::Open)
            | Got::Forgotten) => {
                self.lost_note(&g);
                self.reconnect(true, deadline).await?;
            }
            g => {
                self.lost_note(&g);
                self.reconnect(false, deadline).await?;
            }
        }
        Ok(())
    }

    /// Receives until `until` (events counted, a lost session replaced), as a browser keeps
    /// listening between a person's actions.
    pub async fn idle(&mut self, until: Instant) -> Result<(), CallError> {
        while Instant::now() < until {
            self.pump(until, Instant::now() + PATIENCE).await?;
        }
        Ok(())
    }

    /// Sends `op` and waits for its reply (an `ok: false` one included) until `deadline`.
    pub async fn call(&mut self, op: &Op, deadline: Instant) -> Result<Reply, CallError> {
        let id = self.start(op, deadline).await?;
        self.reply(id, deadline).await
    }

    /// Sends `op`: its id. A session that does not take it is replaced and the request sent
    /// on the next one.
    pub async fn start(&mut self, op: &Op, deadline: Instant) -> Result<u64, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let p = Pending {
            id,
            text: op.to_text(id),
            reads: op.only_reads(),
        };
        if matches!(op, Op::Execute { .. }) {
            self.running.insert(id, false);
        }
        if self.conn.is_some() && self.send_now(&[&p.text]).await.is_ok() {
            self.inflight.push(p);
            return Ok(id);
        }
        // Not taken: nothing was done with it; it goes on the next session.
        let had_session = self.conn.is_some();
        self.held.push(p);
        if let Err(e) = self.reconnect(!had_session, deadline).await {
            self.held.retain(|p| p.id != id);
            self.running.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Waits for the reply to request `id`.
    pub async fn reply(&mut self, id: u64, deadline: Instant) -> Result<Reply, CallError> {
        let r = loop {
            if let Some(i) = self.replies.iter().position(|r| r.id == Some(id)) {
                let r = self.replies.remove(i);
                if r.restarting() {
                    // A stopping backend did nothing with it: again once reconnected (its
                    // close, 1012, comes next).
                    self.seen.restarted_requests += 1;
                    if let Some(i) = self.inflight.iter().position(|p| p.id == id) {
                        let p = self.inflight.remove(i);
                        self.held.push(p);
                    }
                    continue;
                }
                self.inflight.retain(|p| p.id != id);
                break Ok(r);
            }
            let waiting =
                self.inflight.iter().any(|p| p.id == id) || self.held.iter().any(|p| p.id == id);
            if !waiting {
                break Err(CallError::Lost);
            }
            if Instant::now() > deadline {
                self.inflight.retain(|p| p.id != id);
                self.held.retain(|p| p.id != id);
                break Err(CallError::Timeout);
            }
            if let Err(e) = self.pump(deadline, deadline).await {
                self.held.retain(|p| p.id != id);
                break Err(e);
            }
        };
        match &r {
            Ok(reply) if reply.ok => {}
            _ => {
                self.running.remove(&id);
            }
        }
        r
    }

    /// Waits for execute `id`'s `done` until `deadline`.
    pub async fn done(&mut self, id: u64, deadline: Instant) -> Result<Done, CallError> {
        loop {
            if let Some(i) = self.dones.iter().position(|d| d.id == id) {
                self.running.remove(&id);
                return Ok(self.dones.remove(i));
            }
            if self.running.get(&id) != Some(&false) {
                self.running.remove(&id);
                return Err(CallError::Lost);
            }
            if Instant::now() > deadline {
                self.running.remove(&id);
                return Err(CallError::Timeout);
            }
            self.pump(deadline, deadline).await?;
        }
    }

    /// Takes the `done`s that arrived for executes no longer awaited (late or lost ones).
    pub fn take_dones(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.dones)
    }

    /// Ends the session.
    pub fn close(&mut self) {
        self.conn = None;
        self.set_connected(false);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_doubles_and_caps_with_half_jitter() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(0, 0.999_999), Duration::from_millis(499));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 0.5), Duration::from_millis(3000));
        assert_eq!(backoff(6, 0.0), Duration::from_millis(15_000));
        assert_eq!(backoff(40, 0.0), Duration::from_millis(15_000));
        assert!(backoff(40, 0.999) <= Duration::from_secs(30));
    }
}
