//! SockJS transports through HAProxy, as static/sagews.js uses them: websocket
//! (`/sockjs/<server>/<session>/websocket`, one frame per message) and xhr-polling (`POST
//! .../xhr` answered with one frame, `POST .../xhr_send` with a JSON array of messages, on
//! kept-alive connections). They open a session, send, and receive frames through a task of
//! their own; what to do when something breaks is the client's business (`client.rs`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

use super::http::{Failure, Jar, KeepAlive, Site, Tls};
use super::proto::{Frame, parse_frame, send_body};
use super::stats::Kind as ErrorKind;

/// A connection silent this long is dead (two of the server's 25 s heartbeats, as the
/// browser client decides).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(55);

/// How long opening a session may take (sagews.js's `openTimeout`).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which transport a simulated browser uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Websocket,
    XhrPolling,
}

/// An open SockJS session: a task receives its frames (a websocket's, or polls one after
/// another, as a browser keeps one poll outstanding) into a channel, stamped with their
/// arrival; requests are sent from the client's task.
pub struct Conn {
    rx: mpsc::Receiver<(Instant, Got)>,
    reader: tokio::task::JoinHandle<()>,
    sender: Sender,
}

enum Sender {
    Ws(SplitSink<WebSocketStream<Tls>, Message>),
    Xhr { base: String, send: KeepAlive },
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    /// The next thing received, waiting until `deadline` at most (None then).
    pub async fn recv(&mut self, deadline: Instant) -> Option<(Instant, Got)> {
        match tokio::time::timeout_at(deadline.into(), self.rx.recv()).await {
            Ok(Some(x)) => Some(x),
            Ok(None) => Some((Instant::now(), Got::Lost("the receiving task ended".into()))),
            Err(_) => None,
        }
    }
}

/// What receiving gave.
#[derive(Debug)]
pub enum Got {
    Frame(Frame),
    /// A poll failed (refused, cut, a 5xx): the session may live on; polled again.
    Retry(Failure),
    /// 404: the server does not know the session (its backend went away).
    Forgotten,
    /// The connection ended.
    Lost(String),
}

/// Why a session did not open.
#[derive(Debug)]
pub enum OpenFailure {
    Http(Failure),
    /// Refused before `o` (`c[code, reason]`: a stopping backend says 1012, a full one 2000).
    Closed(u16, String),
    Other(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Http(e) => write!(f, "{e}"),
            OpenFailure::Closed(code, reason) => write!(f, "refused with c[{code}, {reason:?}]"),
            OpenFailure::Other(why) => f.write_str(why),
        }
    }
}

/// Where HTTP requests go and with what cookies (shared by a browser's requests).
#[derive(Clone)]
pub struct Ctx {
    pub site: Arc<Site>,
    pub source: Option<IpAddr>,
    pub jar: Arc<Mutex<Jar>>,
}

impl Ctx {
    fn cookie(&self) -> String {
        self.jar.lock().unwrap().header()
    }

    fn keep<'a>(&self, set_cookies: impl IntoIterator<Item = &'a str>) {
        self.jar.lock().unwrap().keep(set_cookies);
    }

    async fn post(
        &self,
        ka: &mut KeepAlive,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<sagews_wire::http1::Response, Failure> {
        let cookie = self.cookie();
        let mut headers = vec![("Content-Type", "text/plain;charset=UTF-8")];
        if !cookie.is_empty() {
            headers.push(("Cookie", cookie.as_str()));
        }
        let r = ka.request("POST", path, &headers, body, timeout).await?;
        self.jar.lock().unwrap().keep_response(&r);
        Ok(r)
    }
}

/// Opens session `session` (`<server>/<id>`) with `kind`: the connection once `o` came.
pub async fn open(kind: Kind, cx: &Ctx, session: &str) -> Result<Conn, OpenFailure> {
    let base = format!("/sockjs/{session}");
    let (tx, rx) = mpsc::channel(64);
    match kind {
        Kind::Websocket => {
            let tls = cx
                .site
                .connect(cx.source)
                .await
                .map_err(|e| OpenFailure::Http(Failure::Io(e)))?;
            let url = format!("wss://{}{base}/websocket", cx.site.name);
            let mut req = tungstenite::client::IntoClientRequest::into_client_request(url)
                .map_err(|e| OpenFailure::Other(e.to_string()))?;
            let cookie = cx.cookie();
            if !cookie.is_empty() {
                req.headers_mut().insert(
                    "Cookie",
                    cookie
                        .parse()
                        .map_err(|_| OpenFailure::Other("a cookie that is no header".into()))?,
                );
            }
            // Small buffers: hundreds of idle browsers in one process (tungstenite's default
            // read buffer is 128 KiB each).
            let cfg = tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
                .max_message_size(Some(16 << 20));
            let shake = tokio_tungstenite::client_async_with_config(req, tls, Some(cfg));
            let (mut ws, resp) = match tokio::time::timeout(OPEN_TIMEOUT, shake).await {
                Err(_) => {
                    return Err(OpenFailure::Http(Failure::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no websocket upgrade within 10 s",
                    ))));
                }
                Ok(Err(tungstenite::Error::Http(r))) => {
                    let status = r.status().as_u16();
                    cx.keep(
                        r.headers()
                            .get_all("set-cookie")
                            .iter()
                            .filter_map(|v| v.to_str().ok()),
                    );
                    let body = r
                        .body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
                        .unwrap_or_default();
                    return Err(if status >= 500 {
                        OpenFailure::Http(Failure::Status(status, body))
                    } else {
                        OpenFailure::Other(format!(
                            "websocket upgrade refused: HTTP {status} {body}"
                        ))
                    });
                }
                Ok(Err(tungstenite::Error::Io(e))) => {
                    return Err(OpenFailure::Http(Failure::Io(e)));
                }
                Ok(Err(e)) => return Err(OpenFailure::Other(format!("websocket: {e}"))),
                Ok(Ok(x)) => x,
            };
            cx.keep(
                resp.headers()
                    .get_all("set-cookie")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            match tokio::time::timeout(OPEN_TIMEOUT, ws_frame(&mut ws)).await {
                Err(_) => return Err(OpenFailure::Other("no `o` within 10 s".into())),
                Ok(Got::Frame(Frame::Open)) => {}
                Ok(Got::Frame(Frame::Close(code, reason))) => {
                    return Err(OpenFailure::Closed(code, reason));
                }
                // Cut before `o` (a backend going away): as a refused connection.
                Ok(Got::Lost(why)) => {
                    return Err(OpenFailure::Http(Failure::Io(std::io::Error::other(why))));
                }
                Ok(other) => {
                    return Err(OpenFailure::Other(format!("expected `o`, got {other:?}")));
                }
            }
            let (sink, mut stream) = ws.split();
            let reader = tokio::spawn(async move {
                loop {
                    let got = match tokio::time::timeout(HEARTBEAT_TIMEOUT, ws_frame(&mut stream))
                        .await
                    {
                        Ok(g) => g,
                        Err(_) => Got::Lost(format!(
                            "no frame from the server for {} s",
                            HEARTBEAT_TIMEOUT.as_secs()
                        )),
                    };
                    let last = ends(&got);
                    if tx.send((Instant::now(), got)).await.is_err() || last {
                        return;
                    }
                }
            });
            Ok(Conn {
                rx,
                reader,
                sender: Sender::Ws(sink),
            })
        }
        Kind::XhrPolling => {
            let mut poll = KeepAlive::new(cx.site.clone(), cx.source);
            let r = cx
                .post(&mut poll, &format!("{base}/xhr"), b"", OPEN_TIMEOUT)
                .await
                .map_err(OpenFailure::Http)?;
            if r.status != 200 {
                return Err(OpenFailure::Other(format!(
                    "opening a session: HTTP {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).trim()
                )));
            }
            match parse_frame(&String::from_utf8_lossy(&r.body)) {
                Ok(Frame::Open) => {}
                Ok(Frame::Close(code, reason)) => return Err(OpenFailure::Closed(code, reason)),
                other => {
                    return Err(OpenFailure::Other(format!("expected `o`, got {other:?}")));
                }
            }
            let (cx2, path) = (cx.clone(), format!("{base}/xhr"));
            let reader = tokio::spawn(async move {
                loop {
                    let got = match cx2.post(&mut poll, &path, b"", HEARTBEAT_TIMEOUT).await {
                        Err(e) => Got::Retry(e),
                        Ok(r) if r.status == 404 => Got::Forgotten,
                        Ok(r) if r.status != 200 => Got::Lost(format!(
                            "a poll answered HTTP {} {}",
                            r.status,
                            String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).trim()
                        )),
                        Ok(r) => match parse_frame(&String::from_utf8_lossy(&r.body)) {
                            Ok(f) => Got::Frame(f),
                            Err(e) => Got::Lost(format!("protocol error: {e}")),
                        },
                    };
                    let (last, retry) = (ends(&got), matches!(got, Got::Retry(_)));
                    if tx.send((Instant::now(), got)).await.is_err() || last {
                        return;
                    }
                    if retry {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            });
            Ok(Conn {
                rx,
                reader,
                sender: Sender::Xhr {
                    base,
                    send: KeepAlive::new(cx.site.clone(), cx.source),
                },
            })
        }
    }
}

/// Whether the session is over after `got`.
fn ends(got: &Got) -> bool {
    matches!(
        got,
        Got::Forgotten | Got::Lost(_) | Got::Frame(Frame::Close(..) | Frame::Open)
    )
}

/// The next frame of a websocket.
async fn ws_frame<S>(ws: &mut S) -> Got
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return match parse_frame(t.as_str()) {
                    Ok(f) => Got::Frame(f),
                    Err(e) => Got::Lost(format!("protocol error: {e}")),
                };
            }
            Some(Ok(Message::Close(c))) => {
                return Got::Lost(match c {
                    Some(c) => format!("the websocket closed ({} {})", u16::from(c.code), c.reason),
                    None => "the websocket closed".into(),
                });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Got::Lost(format!("the websocket broke: {e}")),
            None => return Got::Lost("the websocket ended".into()),
        }
    }
}

/// Sends requests' texts on the session: Ok when the session took them; otherwise they were
/// not taken (nothing was done with them) and the session is gone or unusable: why, counted
/// as what.
pub async fn send(conn: &mut Conn, cx: &Ctx, texts: &[&str]) -> Result<(), (ErrorKind, String)> {
    let body = send_body(texts);
    match &mut conn.sender {
        Sender::Ws(ws) => {
            match tokio::time::timeout(Duration::from_secs(30), ws.send(Message::text(body))).await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err((ErrorKind::Closed, format!("sending on the websocket: {e}"))),
                Err(_) => Err((
                    ErrorKind::Closed,
                    "sending on the websocket took over 30 s".into(),
                )),
            }
        }
        Sender::Xhr { base, send } => {
            let path = format!("{base}/xhr_send");
            match cx
                .post(send, &path, body.as_bytes(), Duration::from_secs(30))
                .await
            {
                Ok(r) if r.status == 204 || r.status == 200 => Ok(()),
                Ok(r) => Err((ErrorKind::Closed, format!("xhr_send: HTTP {}", r.status))),
                Err(e) => Err((e.kind(), format!("xhr_send: {e}"))),
            }
        }
    }
}
