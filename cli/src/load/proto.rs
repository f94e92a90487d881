//! The browser protocol as the load generator speaks it, typed (the backend's side is
//! `agent/src/backend/msg.rs`, the golden examples `tests/js/messages.json`): the requests it
//! sends, the replies and events it reads, and SockJS 0.3 frames around them. Only the fields
//! the load generator uses are read; others are ignored, so a new field on the server's side
//! breaks nothing here.

use serde::{Deserialize, Serialize};

/// A request's op and fields (`{"id": N, "op": ..., ...}` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Create { name: String },
    Open { workspace: String },
    Close { workspace: String },
    Delete { workspace: String },
    Execute { workspace: String, code: String },
    Save { workspace: String, message: String },
    History { workspace: String },
    Read { workspace: String, path: String },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Open { .. } => "open",
            Op::Close { .. } => "close",
            Op::Delete { .. } => "delete",
            Op::Execute { .. } => "execute",
            Op::Save { .. } => "save",
            Op::History { .. } => "history",
            Op::Read { .. } => "read",
        }
    }

    /// Ops that only read: sent again after a reconnect instead of failing (`SAFE_OPS` in
    /// static/sagews.js).
    pub fn only_reads(&self) -> bool {
        matches!(self, Op::History { .. } | Op::Read { .. })
    }

    /// The request as sent: `{"id": id, "op": ..., ...}`.
    pub fn to_text(&self, id: u64) -> String {
        #[derive(Serialize)]
        struct Request<'a> {
            id: u64,
            #[serde(flatten)]
            op: &'a Op,
        }
        serde_json::to_string(&Request { id, op: self }).expect("serializable")
    }
}

/// A commit of a workspace's history.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Commit {
    pub commit: String,
    #[serde(default)]
    pub message: String,
}

/// A reply: `{"id": N, "ok": true, ...}` or `{"id": N, "ok": false, "error", "status", ...}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Reply {
    /// None when the server could not read the request at all.
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    /// `restarting`: a stopping backend did nothing with the request (send it again after
    /// reconnecting).
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub workspace: Option<String>,
    /// save: whether a commit was made.
    #[serde(default)]
    pub changed: Option<bool>,
    /// save (if a server gives it), revert: the commit made.
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub history: Option<Vec<Commit>>,
    /// read: the file's text.
    #[serde(default)]
    pub data: Option<String>,
    /// open: the worker the workspace runs on.
    #[serde(default)]
    pub worker: Option<String>,
}

impl Reply {
    pub fn restarting(&self) -> bool {
        !self.ok && self.code.as_deref() == Some("restarting")
    }

    /// The refusal as a person would read it: `503 no worker is available`.
    pub fn refusal(&self) -> String {
        format!(
            "{} {}",
            self.status.map_or_else(|| "-".into(), |s| s.to_string()),
            self.error.as_deref().unwrap_or("(no error text)")
        )
    }
}

/// An event of the open workspace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Stdout {
        id: u64,
        data: String,
    },
    Stderr {
        id: u64,
        data: String,
    },
    Done {
        id: u64,
        status: String,
        #[serde(default)]
        message: Option<String>,
    },
    Moved {
        #[serde(default)]
        worker: Option<String>,
        #[serde(default)]
        message: String,
    },
    WorkerLost {
        #[serde(default)]
        worker: String,
    },
    Reopened {
        #[serde(default)]
        message: String,
    },
    Closed {
        #[serde(default)]
        reason: String,
    },
    Error {
        #[serde(default)]
        message: String,
    },
    /// image, truncated, and whatever a newer server sends.
    #[serde(other)]
    Other,
}

/// A message from the server.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Incoming {
    Event(Event),
    Reply(Reply),
}

/// A SockJS frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Open,
    Heartbeat,
    Messages(Vec<Incoming>),
    Close(u16, String),
}

/// Reads one frame (`o`, `h`, `a[...]`, `m...`, `c[code, "reason"]`), as sagews.js does.
pub fn parse_frame(text: &str) -> Result<Frame, String> {
    let text = text.trim_end_matches('\n');
    let bad = |why: String| format!("{why}: {:?}", text.chars().take(80).collect::<String>());
    let message = |m: &str| serde_json::from_str::<Incoming>(m).map_err(|e| bad(e.to_string()));
    match text.as_bytes().first() {
        Some(b'o') => Ok(Frame::Open),
        Some(b'h') => Ok(Frame::Heartbeat),
        Some(b'a') => {
            let msgs: Vec<String> =
                serde_json::from_str(&text[1..]).map_err(|e| bad(e.to_string()))?;
            Ok(Frame::Messages(
                msgs.iter().map(|m| message(m)).collect::<Result<_, _>>()?,
            ))
        }
        Some(b'm') => {
            let m: String = serde_json::from_str(&text[1..]).map_err(|e| bad(e.to_string()))?;
            Ok(Frame::Messages(vec![message(&m)?]))
        }
        Some(b'c') => {
            let (code, reason): (u16, String) =
                serde_json::from_str(&text[1..]).map_err(|e| bad(e.to_string()))?;
            Ok(Frame::Close(code, reason))
        }
        _ => Err(bad("not a SockJS frame".into())),
    }
}

/// Requests as a SockJS send: a JSON array of the requests' texts.
pub fn send_body(texts: &[&str]) -> String {
    serde_json::to_string(texts).expect("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden examples both sides are tested against: every reply and event parses here.
    fn golden() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/js/messages.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn requests_match_the_golden_examples() {
        let g = golden();
        let ws = "w0123456789abcde".to_string();
        let cases = [
            (
                "create",
                7,
                Op::Create {
                    name: "Notes".into(),
                },
            ),
            (
                "open",
                10,
                Op::Open {
                    workspace: ws.clone(),
                },
            ),
            (
                "execute",
                12,
                Op::Execute {
                    workspace: ws.clone(),
                    code: "print(2+2)".into(),
                },
            ),
            (
                "save",
                14,
                Op::Save {
                    workspace: ws.clone(),
                    message: "First draft".into(),
                },
            ),
            (
                "history",
                15,
                Op::History {
                    workspace: ws.clone(),
                },
            ),
            (
                "read",
                19,
                Op::Read {
                    workspace: ws.clone(),
                    path: "notes/a.py".into(),
                },
            ),
            (
                "delete",
                9,
                Op::Delete {
                    workspace: ws.clone(),
                },
            ),
            ("close", 11, Op::Close { workspace: ws }),
        ];
        for (name, id, op) in cases {
            let ours: serde_json::Value = serde_json::from_str(&op.to_text(id)).unwrap();
            assert_eq!(ours, g["requests"][name], "{name}");
            assert_eq!(op.name(), name);
        }
    }

    #[test]
    fn replies_and_events_of_the_golden_file_parse() {
        let g = golden();
        for (name, v) in g["replies"].as_object().unwrap() {
            let m: Incoming = serde_json::from_value(v.clone()).unwrap();
            assert!(matches!(m, Incoming::Reply(_)), "{name}: {m:?}");
        }
        for (name, v) in g["events"].as_object().unwrap() {
            let m: Incoming = serde_json::from_value(v.clone()).unwrap();
            assert!(matches!(m, Incoming::Event(_)), "{name}: {m:?}");
        }
        let h: Reply = serde_json::from_value(g["replies"]["history"].clone()).unwrap();
        assert_eq!(h.history.unwrap()[0].message, "First draft");
        let d: Incoming = serde_json::from_value(g["events"]["done"].clone()).unwrap();
        assert_eq!(
            d,
            Incoming::Event(Event::Done {
                id: 12,
                status: "ok".into(),
                message: None
            })
        );
        let r: Reply = serde_json::from_value(g["replies"]["rate_limited"].clone()).unwrap();
        assert_eq!((r.status, r.retry_after), (Some(429), Some(120)));
        let r: Reply = serde_json::from_str(
            r#"{"id": 3, "ok": false, "code": "restarting", "status": 503, "error": "x"}"#,
        )
        .unwrap();
        assert!(r.restarting());
    }

    #[test]
    fn sockjs_frames() {
        assert_eq!(parse_frame("o\n"), Ok(Frame::Open));
        assert_eq!(parse_frame("h"), Ok(Frame::Heartbeat));
        assert_eq!(
            parse_frame(r#"c[1012,"restarting"]"#),
            Ok(Frame::Close(1012, "restarting".into()))
        );
        let f = parse_frame(r#"a["{\"id\":1,\"ok\":true,\"workspace\":\"w\"}","{\"event\":\"stdout\",\"workspace\":\"w\",\"id\":2,\"data\":\"4\\n\"}"]"#)
            .unwrap();
        let Frame::Messages(m) = f else {
            panic!("{f:?}")
        };
        assert_eq!(m.len(), 2);
        assert!(matches!(&m[1], Incoming::Event(Event::Stdout { id: 2, data }) if data == "4\n"));
        assert!(parse_frame("x").is_err());
        assert!(parse_frame("a[1]").is_err());
        assert_eq!(send_body(&["{\"id\":1}"]), r#"["{\"id\":1}"]"#);
    }
}
