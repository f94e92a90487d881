//! The SockJS protocol (0.3), server side, so the standard `sockjs-client` works over its
//! websocket, xhr-streaming and xhr-polling transports: `/info`, `/<server>/<session>/websocket`,
//! `/xhr`, `/xhr_send`, `/xhr_streaming`, heartbeats (`h`), open (`o`), message arrays (`a[..]`)
//! and close frames (`c[code,"reason"]`). A session outlives the HTTP requests of the polling
//! transports: messages wait in its outbox until a request takes them; a session with no
//! request attached for `disconnect_seconds` is closed. Each session feeds one `api` connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, mpsc};

use super::Backend;
use super::accounts::Account;

/// xhr-streaming closes its response after this many bytes (the client opens another), so
/// browsers do not hold an ever-growing response in memory.
const STREAM_LIMIT: usize = 128 * 1024;

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<SjSession>>>,
    next: AtomicU64,
}

impl Sessions {
    pub fn count(&self) -> usize {
        self.map.lock().unwrap().len()
    }
    /// The session `id` if this request may use it: one opened with a sign-in cookie only with
    /// the same cookie (an anonymous one is guarded by its unguessable id alone).
    fn get(&self, id: &str, headers: &HeaderMap) -> Option<Arc<SjSession>> {
        let s = self.map.lock().unwrap().get(id).cloned()?;
        (s.owner.is_none() || s.owner == owner_of(headers)).then_some(s)
    }
    /// Closes every session with `code`; how many there were.
    pub fn close_all(&self, code: u16, reason: &str) -> usize {
        let all: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        for s in &all {
            s.close(code, reason);
        }
        all.len()
    }
    fn remove(&self, id: &str) {
        let removed = self.map.lock().unwrap().remove(id);
        if let Some(s) = removed {
            s.close(3000, "Go away!");
            if s.out.lock().unwrap().peak > 1 << 20 {
                // A large backlog leaves freed blocks in malloc's arenas: hand them back.
                tokio::task::spawn_blocking(|| {
                    // SAFETY: malloc_trim only walks and releases free memory.
                    unsafe { libc::malloc_trim(0) };
                });
            }
        }
    }
}

pub struct SjSession {
    pub id: String,
    /// The SHA-256 of the sign-in cookie that opened the session (if any): later requests of
    /// a polling transport must carry the same, so knowing a session's id is not enough.
    owner: Option<Vec<u8>>,
    /// More than this waiting to be sent: the browser is not reading, the session is closed.
    max_queued: usize,
    /// Messages from the browser, to the api connection; dropped when the session ends.
    inbound: Mutex<Option<mpsc::Sender<String>>>,
    out: Mutex<Outbox>,
    notify: Notify,
}

#[derive(Default)]
struct Outbox {
    queue: Vec<String>,
    /// Bytes in `queue`.
    bytes: usize,
    /// The most that ever waited (to give memory back after a large backlog).
    peak: usize,
    close: Option<(u16, String)>,
    attached: bool,
    since: Option<Instant>,
}

/// The api connection's way to the browser.
#[derive(Clone)]
pub struct Outbound(Arc<SjSession>);

impl Outbound {
    /// Queues a message for the browser; a browser that lets more than `max_queued_bytes`
    /// wait is not reading: its queue is dropped and the session closed (code 3001).
    pub fn send(&self, msg: String) {
        let mut o = self.0.out.lock().unwrap();
        if o.close.is_some() {
            return;
        }
        if o.bytes + msg.len() > self.0.max_queued {
            let waiting = o.bytes + msg.len();
            o.queue = Vec::new();
            o.bytes = 0;
            drop(o);
            tracing::warn!(session = %self.0.id, waiting, "closing a browser session that does not read");
            self.0.close(
                3001,
                &format!(
                    "closed: this browser did not read its messages ({waiting} bytes waiting); reconnect"
                ),
            );
            return;
        }
        o.bytes += msg.len();
        o.peak = o.peak.max(o.bytes);
        o.queue.push(msg);
        drop(o);
        self.0.notify.notify_waiters();
        self.0.notify.notify_one();
    }
    pub fn close(&self, code: u16, reason: &str) {
        self.0.close(code, reason);
    }
}

impl SjSession {
    fn close(&self, code: u16, reason: &str) {
        let mut o = self.out.lock().unwrap();
        if o.close.is_none() {
            o.close = Some((code, reason.to_string()));
        }
        drop(o);
        self.inbound.lock().unwrap().take();
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Takes the next frame to send: queued messages, or the close frame, or nothing yet.
    fn take(&self) -> Option<String> {
        let mut o = self.out.lock().unwrap();
        if !o.queue.is_empty() {
            let msgs = std::mem::take(&mut o.queue);
            o.bytes = 0;
            drop(o);
            return Some(escape_frame(format!(
                "a{}",
                serde_json::to_string(&msgs).expect("strings")
            )));
        }
        o.close.as_ref().map(|(c, r)| close_frame(*c, r))
    }

    async fn deliver(&self, text: &str) -> Result<(), &'static str> {
        let msgs = parse_client_frame(text)?;
        let tx = self.inbound.lock().unwrap().clone();
        if let Some(tx) = tx {
            for m in msgs {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn attach(&self) -> bool {
        let mut o = self.out.lock().unwrap();
        if o.attached {
            return false;
        }
        o.attached = true;
        true
    }

    fn detach(&self) {
        let mut o = self.out.lock().unwrap();
        o.attached = false;
        o.since = Some(Instant::now());
    }
}

/// Characters SockJS 0.3 asks servers to escape in frames (some browsers mangle or drop them
/// in xhr responses): JSON already escapes U+0000-U+001F; these are the rest.
fn must_escape(c: char) -> bool {
    matches!(c, '\u{200c}'..='\u{200f}' | '\u{2028}'..='\u{202f}' | '\u{2060}'..='\u{206f}' | '\u{fff0}'..='\u{ffff}')
}

/// `frame` (JSON) with those characters as `\uXXXX` escapes; they only occur inside strings.
pub fn escape_frame(frame: String) -> String {
    if !frame.chars().any(must_escape) {
        return frame;
    }
    let mut out = String::with_capacity(frame.len() + 16);
    for c in frame.chars() {
        if must_escape(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The next frame for a waiting request: what is queued, or a heartbeat after `beat`.
async fn next_frame(s: &SjSession, beat: Duration) -> String {
    let deadline = tokio::time::Instant::now() + beat;
    loop {
        let notified = s.notify.notified();
        if let Some(f) = s.take() {
            return f;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return "h".to_string();
        }
    }
}

/// A client frame: a JSON array of strings (or one string).
pub fn parse_client_frame(text: &str) -> Result<Vec<String>, &'static str> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                _ => Err("Broken JSON encoding."),
            })
            .collect(),
        Ok(serde_json::Value::String(s)) => Ok(vec![s]),
        _ => Err("Broken JSON encoding."),
    }
}

/// The SHA-256 of a request's sign-in cookie.
fn owner_of(headers: &HeaderMap) -> Option<Vec<u8>> {
    super::accounts::token_from_cookies(headers).map(|t| {
        ring::digest::digest(&ring::digest::SHA256, t.as_bytes())
            .as_ref()
            .to_vec()
    })
}

/// Server and session ids: 1 to 64 of letters, digits, '_' and '-' (the protocol forbids dots).
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Both ids of a transport URL (`/<server>/<session>/<transport>`).
pub fn valid_ids(server: &str, session: &str) -> bool {
    valid_id(server) && valid_id(session)
}

impl Backend {
    /// A new SockJS session for `account` (from the cookie, if any), or the close frame that
    /// refuses it.
    fn new_sockjs_session(
        self: &Arc<Self>,
        id: &str,
        account: Option<Account>,
        client: Option<std::net::IpAddr>,
        owner: Option<Vec<u8>>,
    ) -> Result<Arc<SjSession>, String> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(close_frame(
                super::RESTARTING,
                "this server is restarting: reconnect",
            ));
        }
        let mut map = self.sockjs.map.lock().unwrap();
        if map.contains_key(id) {
            return Err(close_frame(2010, "Another connection still open"));
        }
        if map.len() >= self.config.max_sessions as usize {
            self.metrics.inc(&self.metrics.sockjs_refused);
            return Err(close_frame(
                2000,
                &format!(
                    "this backend is full ({} sessions); try again shortly",
                    self.config.max_sessions
                ),
            ));
        }
        let (tx, rx) = mpsc::channel(32);
        let s = Arc::new(SjSession {
            id: id.to_string(),
            owner,
            max_queued: self.config.max_queued_bytes,
            inbound: Mutex::new(Some(tx)),
            out: Mutex::new(Outbox::default()),
            notify: Notify::new(),
        });
        map.insert(id.to_string(), s.clone());
        drop(map);
        self.metrics.inc(&self.metrics.sockjs_opened);
        let conn_id = self.sockjs.next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(super::api::run(
            self.clone(),
            conn_id,
            rx,
            Outbound(s.clone()),
            account,
            client,
        ));
        Ok(s)
    }

    async fn cookie_account(&self, headers: &HeaderMap) -> Option<Account> {
        let token = super::accounts::token_from_cookies(headers)?;
        self.session_account(&token).await.ok().flatten()
    }
}

fn close_frame(code: u16, reason: &str) -> String {
    escape_frame(format!("c{}", serde_json::json!([code, reason])))
}

/// Closes sessions that no request has attached to for `disconnect_seconds`.
pub async fn reaper(backend: Arc<Backend>) {
    let grace = Duration::from_secs(backend.config.disconnect_seconds);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        let stale: Vec<String> = backend
            .sockjs
            .map
            .lock()
            .unwrap()
            .values()
            .filter(|s| {
                let o = s.out.lock().unwrap();
                !o.attached && o.since.is_some_and(|t| now - t > grace)
            })
            .map(|s| s.id.clone())
            .collect();
        for id in stale {
            backend.sockjs.remove(&id);
        }
    }
}

/// CORS headers. Every route that calls this has refused foreign origins first (`origin.rs`),
/// so an `Origin` here is one of ours; with none, `*` (credentials are never sent with `*`).
fn cors(headers: &HeaderMap, r: &mut Response) {
    let h = r.headers_mut();
    match headers.get(header::ORIGIN) {
        Some(o) => {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        None => {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    if let Some(req) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, req.clone());
    }
}

/// On a response that ends or refuses a session while the backend stops: the browser forgets
/// which backend it was on, HAProxy's persistence cookie (`cookie SAGEWS_BACKEND ... preserve`
/// in templates/haproxy.cfg.j2: a cookie the server sets is passed on), so its next session
/// goes to another backend instead of back to this one.
pub fn end_persistence(backend: &Backend, r: &mut Response) {
    if !backend.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "SAGEWS_BACKEND=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict",
        ),
    );
}

fn no_cache(r: &mut Response) {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, no-transform, must-revalidate, max-age=0"),
    );
}

fn js(headers: &HeaderMap, status: StatusCode, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/javascript; charset=UTF-8"),
    );
    cors(headers, &mut r);
    no_cache(&mut r);
    r
}

pub async fn info(headers: HeaderMap) -> Response {
    let entropy = u32::from_le_bytes(super::accounts::random_bytes::<4>());
    let body = serde_json::json!({
        "websocket": true, "cookie_needed": false, "origins": ["*:*"], "entropy": entropy,
    });
    let mut r = js(&headers, StatusCode::OK, body.to_string());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

/// CORS preflight for the info and xhr routes.
pub async fn options(headers: HeaderMap) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    cors(&headers, &mut r);
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("OPTIONS, POST, GET"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("31536000"),
    );
    let year = std::time::SystemTime::now() + Duration::from_secs(31_536_000);
    if let Ok(v) = HeaderValue::from_str(&http_date(year)) {
        h.insert(header::EXPIRES, v);
    }
    r
}

/// An HTTP date (RFC 9110 IMF-fixdate), e.g. `Tue, 01 Dec 2026 14:25:06 GMT`.
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::civil::from_days(days as i64);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        WD[(days % 7) as usize],
        MO[(m - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn not_found(headers: &HeaderMap) -> Response {
    let mut r = js(headers, StatusCode::NOT_FOUND, "Session not found\n");
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

/// xhr-polling: the first request opens the session; each later one takes what is queued, or
/// waits for it (a heartbeat after `heartbeat_seconds`).
pub async fn xhr(
    backend: Arc<Backend>,
    server: String,
    session: String,
    headers: HeaderMap,
) -> Response {
    if !valid_ids(&server, &session) {
        return not_found(&headers);
    }
    let Some(s) = backend.sockjs.get(&session, &headers) else {
        let account = backend.cookie_account(&headers).await;
        let client = super::throttle::client_address(&headers);
        return match backend.new_sockjs_session(&session, account, client, owner_of(&headers)) {
            Ok(s) => {
                s.detach();
                js(&headers, StatusCode::OK, "o\n")
            }
            Err(close) => {
                let mut r = js(&headers, StatusCode::OK, format!("{close}\n"));
                end_persistence(&backend, &mut r);
                r
            }
        };
    };
    if !s.attach() {
        return js(
            &headers,
            StatusCode::OK,
            format!("{}\n", close_frame(2010, "Another connection still open")),
        );
    }
    // Detached however this ends: also when the request is dropped because the browser went
    // away (HAProxy's abortonclose closes our side at once), so the next request is served.
    let attached = Attached(s.clone());
    let frame = next_frame(&s, Duration::from_secs(backend.config.heartbeat_seconds)).await;
    drop(attached);
    let closing = frame.starts_with('c');
    if closing {
        backend.sockjs.remove(&s.id);
    }
    let mut r = js(&headers, StatusCode::OK, format!("{frame}\n"));
    if closing {
        end_persistence(&backend, &mut r);
    }
    r
}

/// Messages from the browser for a polling or streaming session.
pub async fn xhr_send(
    backend: Arc<Backend>,
    server: String,
    session: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !valid_ids(&server, &session) {
        return not_found(&headers);
    }
    let Some(s) = backend.sockjs.get(&session, &headers) else {
        return not_found(&headers);
    };
    if body.is_empty() {
        return js(
            &headers,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Payload expected.",
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return js(
            &headers,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Broken JSON encoding.",
        );
    };
    if let Err(e) = s.deliver(text).await {
        return js(&headers, StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    let mut r = js(&headers, StatusCode::NO_CONTENT, Body::empty());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r
}

/// Detaches the streaming request from its session when the response ends or is dropped.
struct Attached(Arc<SjSession>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// xhr-streaming: one long response of newline-ended frames, after a 2 KiB prelude (old
/// browsers buffer that much before showing anything).
pub async fn xhr_streaming(
    backend: Arc<Backend>,
    server: String,
    session: String,
    headers: HeaderMap,
) -> Response {
    if !valid_ids(&server, &session) {
        return not_found(&headers);
    }
    let mut first = "h".repeat(2048);
    first.push('\n');
    let s = match backend.sockjs.get(&session, &headers) {
        Some(s) => {
            if !s.attach() {
                first.push_str(&close_frame(2010, "Another connection still open"));
                first.push('\n');
                return js(&headers, StatusCode::OK, first);
            }
            s
        }
        None => {
            let account = backend.cookie_account(&headers).await;
            let client = super::throttle::client_address(&headers);
            match backend.new_sockjs_session(&session, account, client, owner_of(&headers)) {
                Ok(s) => {
                    s.attach();
                    first.push_str("o\n");
                    s
                }
                Err(close) => {
                    first.push_str(&close);
                    first.push('\n');
                    let mut r = js(&headers, StatusCode::OK, first);
                    end_persistence(&backend, &mut r);
                    return r;
                }
            }
        }
    };
    let beat = Duration::from_secs(backend.config.heartbeat_seconds);
    struct St {
        s: Attached,
        backend: Arc<Backend>,
        sent: usize,
        first: Option<String>,
        done: bool,
    }
    let st = St {
        s: Attached(s),
        backend,
        sent: 0,
        first: Some(first),
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        if let Some(f) = st.first.take() {
            st.sent += f.len();
            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(f)), st));
        }
        if st.done || st.sent >= STREAM_LIMIT {
            return None;
        }
        let s = st.s.0.clone();
        let frame = next_frame(&s, beat).await;
        if frame.starts_with('c') {
            st.done = true;
            st.backend.sockjs.remove(&s.id);
        }
        st.sent += frame.len() + 1;
        Some((Ok(Bytes::from(format!("{frame}\n"))), st))
    });
    js(&headers, StatusCode::OK, Body::from_stream(stream))
}

/// The websocket transport: one session per socket.
pub async fn websocket(backend: Arc<Backend>, session: String, headers: HeaderMap, ws: WebSocket) {
    // Boxed (like every await below that does real work): this task lives as long as the
    // session, and its size is what an idle session costs.
    let account = Box::pin(backend.cookie_account(&headers)).await;
    let client = super::throttle::client_address(&headers);
    let owner = owner_of(&headers);
    drop(headers);
    let mut ws = ws;
    let s = match backend.new_sockjs_session(&session, account, client, owner) {
        Ok(s) => s,
        Err(close) => {
            let _ = ws.send(Message::Text(close.into())).await;
            let _ = ws.send(Message::Close(None)).await;
            return;
        }
    };
    s.attach();
    if ws.send(Message::Text("o".into())).await.is_ok() {
        ws_loop(&backend, &s, &mut ws).await;
    }
    backend.sockjs.remove(&s.id);
    let _ = ws.send(Message::Close(None)).await;
}

/// A websocket write that takes longer than this means the browser stopped reading.
const WS_SEND_TIMEOUT: Duration = Duration::from_secs(30);

async fn ws_send(ws: &mut WebSocket, text: String) -> bool {
    matches!(
        tokio::time::timeout(WS_SEND_TIMEOUT, ws.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

async fn ws_loop(backend: &Backend, s: &SjSession, ws: &mut WebSocket) {
    let mut beat = tokio::time::interval(Duration::from_secs(backend.config.heartbeat_seconds));
    beat.tick().await;
    loop {
        let notified = s.notify.notified();
        if let Some(f) = s.take() {
            let closing = f.starts_with('c');
            if !Box::pin(ws_send(ws, f)).await || closing {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = notified => {}
            _ = beat.tick() => {
                if !Box::pin(ws_send(ws, "h".into())).await {
                    return;
                }
            }
            m = ws.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    if Box::pin(s.deliver(t.as_str())).await.is_err() {
                        // Broken framing: the protocol says to drop the connection.
                        return;
                    }
                }
                Some(Ok(Message::Binary(_))) => return,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    }
}

impl IntoResponse for super::ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"ok": false, "error": self.message});
        let mut r = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames() {
        assert_eq!(parse_client_frame(r#"["a","b"]"#).unwrap(), ["a", "b"]);
        assert_eq!(parse_client_frame(r#""x""#).unwrap(), ["x"]);
        assert!(parse_client_frame("[1]").is_err());
        assert!(parse_client_frame("[\"a\"").is_err());
        assert!(parse_client_frame("").unwrap().is_empty());
    }

    #[test]
    fn frames_escape_what_the_protocol_lists() {
        let f = escape_frame(format!(
            "a{}",
            serde_json::to_string(&["x\u{fffc}\u{fffd}\u{2028}\u{200c}y\u{e9}"]).unwrap()
        ));
        assert_eq!(f, r#"a["x\ufffc\ufffd\u2028\u200cyé"]"#);
        let back: Vec<String> = serde_json::from_str(&f[1..]).unwrap();
        assert_eq!(back, ["x\u{fffc}\u{fffd}\u{2028}\u{200c}y\u{e9}"]);
        assert_eq!(escape_frame("a[\"plain\"]".into()), "a[\"plain\"]");
    }

    #[test]
    fn http_dates() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_135_106);
        assert_eq!(http_date(t), "Tue, 01 Dec 2026 14:25:06 GMT");
        assert_eq!(
            http_date(std::time::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        let leap = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn ids() {
        assert!(valid_id("abc_1-2"));
        assert!(!valid_id("a.b"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(!valid_id("../x"));
    }
}
