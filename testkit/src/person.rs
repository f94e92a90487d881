//! A person at a browser, for drills on a deployed lab (a rolling upgrade, faults): the client's
//! rules of `static/sagews.js` over SockJS xhr-polling through HAProxy, with cookies kept as a
//! browser keeps them (the sign-in's, and HAProxy's `SAGEWS_BACKEND`, set again when HAProxy
//! sends the browser elsewhere and expired by a backend that stops). A session the server
//! closes or forgets is replaced at once and the open workspace opened again; requests refused
//! as `restarting` are sent again after that, with their ids. Unlike [`Sockjs`], nothing
//! panics on a network error: what a person would have seen is counted in [`Seen`] and
//! returned as errors, for the drill to report and assert.
//!
//! [`Sockjs`]: crate::browser::Sockjs

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::browser::Site;

/// What the person saw, beyond their requests' answers.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// SockJS sessions opened (the first one, then one per reconnect).
    pub sessions: u32,
    /// Sessions the server closed, by close code (1012: a backend restarting).
    pub closed: BTreeMap<u16, u32>,
    /// Sessions the server did not know any more (404, or a new `o`: a backend gone).
    pub forgotten: u32,
    /// Session openings refused before `o` (a stopping backend), tried again.
    pub refused_opens: u32,
    /// Requests refused as `restarting` and sent again after reconnecting.
    pub restarted_requests: u32,
    /// `moved` events (a workspace moved off a draining worker).
    pub moved: u32,
    /// Other workspace events that mean trouble (`worker_lost`, `closed`, `error`).
    pub trouble: Vec<Value>,
    /// HTTP requests that failed (refused, cut, a 5xx from HAProxy) and were tried again.
    pub http_retries: u32,
    /// Requests the connection was lost under before an answer (the client rejects those that
    /// are not reads: "it may or may not have been done").
    pub lost_requests: Vec<String>,
}

pub struct Person<'a> {
    site: &'a Site,
    name: String,
    jar: Vec<(String, String)>,
    base: String,
    inbox: Vec<Value>,
    /// The open workspace, opened again on every new session.
    pub workspace: Option<String>,
    next_id: u64,
    /// Sent, not answered: by id.
    inflight: HashMap<u64, Value>,
    /// Refused as `restarting`: sent again once reconnected.
    held: Vec<Value>,
    /// Executes whose `done` is awaited: whether the connection was lost under them.
    running: HashMap<u64, bool>,
    pub seen: Seen,
}

/// How long one request may go unanswered (reconnects included).
const PATIENCE: Duration = Duration::from_secs(120);

/// One frame of a poll, or what stood for it.
enum Poll {
    Messages(Vec<Value>),
    Heartbeat,
    /// `o`: a session opened (on an open one: the server lost it and made a new one).
    Opened,
    Closed(u16),
    /// 404: the server does not know the session.
    Forgotten,
    /// The request failed (refused, cut, a 5xx): try again.
    Failed,
}

impl<'a> Person<'a> {
    /// Signs up as `name` and opens a SockJS session.
    pub async fn sign_up(site: &'a Site, name: &str, password: &str) -> Result<Person<'a>, String> {
        let mut p = Person {
            site,
            name: name.to_string(),
            jar: Vec::new(),
            base: String::new(),
            inbox: Vec::new(),
            workspace: None,
            next_id: 1,
            inflight: HashMap::new(),
            held: Vec::new(),
            running: HashMap::new(),
            seen: Seen::default(),
        };
        let creds = json!({"name": name, "password": password}).to_string();
        let r = p
            .http("POST", "/api/signup", creds.as_bytes())
            .await
            .ok_or("signing up: the request failed")?;
        if r.status != 200 {
            return Err(format!(
                "signing up: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        p.connect().await?;
        Ok(p)
    }

    fn cookies(&self) -> String {
        let all: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        all.join("; ")
    }

    /// Keeps the response's cookies as a browser does (an empty value or `Max-Age=0` expires).
    fn keep(&mut self, r: &sagews_wire::http1::Response) {
        for (k, v) in &r.headers {
            if !k.eq_ignore_ascii_case("set-cookie") {
                continue;
            }
            let mut parts = v.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
                continue;
            };
            let expired = value.is_empty() || parts.any(|a| a.eq_ignore_ascii_case("max-age=0"));
            self.jar.retain(|(n, _)| n != name);
            if !expired {
                self.jar.push((name.to_string(), value.to_string()));
            }
        }
    }

    /// One request with the cookies; None when it failed (counted).
    async fn http(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Option<sagews_wire::http1::Response> {
        let cookies = self.cookies();
        let mut headers = vec![("Content-Type", "application/json")];
        if !cookies.is_empty() {
            headers.push(("Cookie", cookies.as_str()));
        }
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.site.try_https(method, path, &headers, body),
        )
        .await;
        if std::env::var_os("SAGEWS_PERSON_TRACE").is_some() {
            let what = match &r {
                Ok(Ok(r)) => format!(
                    "{} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(160)])
                ),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(_) => "timed out".into(),
            };
            eprintln!(
                "[{}] {method} {path} ({cookies}) -> {}",
                self.name,
                what.trim_end()
            );
        }
        match r {
            Ok(Ok(r)) => {
                self.keep(&r);
                if r.status >= 500 {
                    self.seen.http_retries += 1;
                    return None;
                }
                Some(r)
            }
            _ => {
                self.seen.http_retries += 1;
                None
            }
        }
    }

    async fn poll_once(&mut self) -> Poll {
        let path = format!("{}/xhr", self.base);
        let Some(r) = self.http("POST", &path, b"").await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Poll::Failed;
        };
        if r.status == 404 {
            return Poll::Forgotten;
        }
        let body = String::from_utf8_lossy(&r.body).trim_end().to_string();
        if let Some(a) = body.strip_prefix('a') {
            let msgs: Vec<String> = serde_json::from_str(a).unwrap_or_default();
            return Poll::Messages(
                msgs.iter()
                    .filter_map(|m| serde_json::from_str(m).ok())
                    .collect(),
            );
        }
        if let Some(c) = body.strip_prefix('c') {
            let (code, _reason): (u16, String) =
                serde_json::from_str(c).unwrap_or((0, String::new()));
            return Poll::Closed(code);
        }
        if body == "o" {
            return Poll::Opened;
        }
        Poll::Heartbeat
    }

    /// Messages in: events counted, everything to the inbox.
    fn arrived(&mut self, msgs: Vec<Value>) {
        for m in msgs {
            match m["event"].as_str() {
                Some("moved") => self.seen.moved += 1,
                Some("worker_lost" | "closed" | "error") => self.seen.trouble.push(m.clone()),
                _ => {}
            }
            self.inbox.push(m);
        }
    }

    /// A new SockJS session (retrying until one opens), the workspace opened again on it, the
    /// held requests sent again.
    async fn connect(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        'session: loop {
            if Instant::now() > deadline {
                return Err(format!("{}: no session for {PATIENCE:?}", self.name));
            }
            self.seen.sessions += 1;
            self.base = format!(
                "/sockjs/000/{}{}",
                self.name.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
                self.seen.sessions
            );
            match self.poll_once().await {
                Poll::Opened => {}
                Poll::Messages(_) | Poll::Heartbeat => continue,
                Poll::Closed(_) => {
                    self.seen.refused_opens += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Poll::Forgotten | Poll::Failed => continue,
            }
            // Open (`o`): the workspace first, as the client does.
            if let Some(ws) = self.workspace.clone() {
                let mut wait = Duration::from_millis(500);
                loop {
                    let id = self.next_id;
                    self.next_id += 1;
                    let open = json!({"id": id, "op": "open", "workspace": ws});
                    if !self.send_raw(&open).await {
                        continue 'session;
                    }
                    let reply = loop {
                        if let Some(i) = self.inbox.iter().position(|v| v["id"] == id) {
                            break self.inbox.remove(i);
                        }
                        match self.poll_once().await {
                            Poll::Messages(m) => self.arrived(m),
                            Poll::Heartbeat | Poll::Failed => {}
                            Poll::Closed(_) | Poll::Forgotten | Poll::Opened => {
                                continue 'session;
                            }
                        }
                        if Instant::now() > deadline {
                            return Err(format!("{}: reopening {ws}: no answer", self.name));
                        }
                    };
                    if reply["ok"] == true {
                        break;
                    }
                    // No worker yet, or restarting: again, backing off, as the client does.
                    if reply["status"] == 503 && Instant::now() < deadline {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(8));
                        continue;
                    }
                    return Err(format!("{}: reopening {ws}: {reply}", self.name));
                }
            }
            for r in std::mem::take(&mut self.held) {
                let id = r["id"].as_u64().unwrap_or(0);
                self.inflight.insert(id, r.clone());
                if !self.send_raw(&r).await {
                    self.inflight.remove(&id);
                    self.held.push(r);
                    continue 'session;
                }
            }
            return Ok(());
        }
    }

    /// Sends one request on the current session: whether the session took it (a 404 or a
    /// failure: it did not, and nothing was done).
    async fn send_raw(&mut self, req: &Value) -> bool {
        let frame = serde_json::to_string(&[req.to_string()]).unwrap();
        let path = format!("{}/xhr_send", self.base);
        matches!(self.http("POST", &path, frame.as_bytes()).await, Some(r) if r.status == 204)
    }

    /// The connection ended: what was in flight is lost (the client rejects it), a running
    /// execute too; then a new session.
    async fn reconnect(&mut self) -> Result<(), String> {
        for (_, r) in self.inflight.drain() {
            self.seen
                .lost_requests
                .push(r["op"].as_str().unwrap_or("?").to_string());
        }
        // Those refused as `restarting` have not run: they are sent again, not lost.
        let held: Vec<u64> = self.held.iter().filter_map(|r| r["id"].as_u64()).collect();
        for (id, lost) in self.running.iter_mut() {
            let done = self
                .inbox
                .iter()
                .any(|v| v["event"] == "done" && v["id"] == *id);
            *lost |= !done && !held.contains(id);
        }
        self.connect().await
    }

    /// One poll: messages to the inbox; a closed or forgotten session is replaced.
    pub async fn poll(&mut self) -> Result<(), String> {
        match self.poll_once().await {
            Poll::Messages(m) => self.arrived(m),
            Poll::Heartbeat | Poll::Failed => {}
            Poll::Closed(code) => {
                *self.seen.closed.entry(code).or_default() += 1;
                self.reconnect().await?;
            }
            // A new session under the old id: the server lost ours (another backend).
            Poll::Forgotten | Poll::Opened => {
                self.seen.forgotten += 1;
                self.reconnect().await?;
            }
        }
        Ok(())
    }

    /// Sends `req` (an op and its fields) and waits for its answer: the reply, or its error.
    pub async fn call(&mut self, req: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = req;
        req["id"] = id.into();
        let op = req["op"].as_str().unwrap_or("?").to_string();
        self.inflight.insert(id, req.clone());
        if !self.send_raw(&req).await {
            // Not taken: the session is gone; sent again on the next one.
            self.inflight.remove(&id);
            self.held.push(req.clone());
            self.reconnect().await?;
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self
                .inbox
                .iter()
                .position(|v| v["id"] == id && v.get("ok").is_some())
            {
                let v = self.inbox.remove(i);
                if v["code"] == "restarting" {
                    self.seen.restarted_requests += 1;
                    if let Some(r) = self.inflight.remove(&id) {
                        self.held.push(r);
                    }
                    continue;
                }
                self.inflight.remove(&id);
                return if v["ok"] == true {
                    Ok(v)
                } else {
                    Err(format!("{op}: {}", v["error"]))
                };
            }
            if !self.inflight.contains_key(&id) && !self.held.iter().any(|r| r["id"] == id) {
                return Err(format!(
                    "{op}: the connection was lost before the server answered"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{op}: no answer within {PATIENCE:?}"));
            }
            self.poll().await?;
        }
    }

    /// Creates a workspace and opens it (opened again on every new session).
    pub async fn create_and_open(&mut self, name: &str) -> Result<String, String> {
        let ws = self.call(json!({"op": "create", "name": name})).await?["workspace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.call(json!({"op": "open", "workspace": ws})).await?;
        self.workspace = Some(ws.clone());
        Ok(ws)
    }

    /// Runs `code` in the open workspace: its stdout and status (`ok`, `error`, `killed`...).
    pub async fn execute(&mut self, code: &str) -> Result<(String, String), String> {
        let id = self.start_execute(code).await?;
        self.finish_execute(id).await
    }

    /// Sends an execute of `code` in the open workspace; its id, once the server took it.
    pub async fn start_execute(&mut self, code: &str) -> Result<u64, String> {
        let ws = self.workspace.clone().ok_or("no workspace open")?;
        let id = self.next_id;
        self.running.insert(id, false);
        let r = self
            .call(json!({"op": "execute", "workspace": ws, "code": code}))
            .await;
        if let Err(e) = r {
            self.running.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Waits for execute `id` to end: its stdout and status.
    pub async fn finish_execute(&mut self, id: u64) -> Result<(String, String), String> {
        let deadline = Instant::now() + PATIENCE;
        let done = loop {
            if let Some(i) = self
                .inbox
                .iter()
                .position(|v| v["event"] == "done" && v["id"] == id)
            {
                break self.inbox.remove(i);
            }
            if self.running.get(&id) != Some(&false) {
                self.running.remove(&id);
                return Err("execute: the connection was lost while the cell ran".into());
            }
            if Instant::now() > deadline {
                self.running.remove(&id);
                return Err(format!("execute: no `done` within {PATIENCE:?}"));
            }
            self.poll().await?;
        };
        self.running.remove(&id);
        let out = crate::browser::take_stdout(&mut self.inbox, id);
        Ok((out, done["status"].as_str().unwrap_or("").to_string()))
    }

    /// The backend HAProxy sends this person to (its persistence cookie), if one was set.
    pub fn backend(&self) -> Option<&str> {
        self.jar
            .iter()
            .find(|(k, _)| k == "SAGEWS_BACKEND")
            .map(|(_, v)| v.as_str())
    }

    /// Saves the open workspace: whether something changed (a commit was made).
    pub async fn save(&mut self, message: &str) -> Result<bool, String> {
        let ws = self.workspace.clone().ok_or("no workspace open")?;
        let r = self
            .call(json!({"op": "save", "workspace": ws, "message": message}))
            .await?;
        Ok(r["changed"] == true)
    }
}
