//! The worker's protocol, shared with the backend: what a backend asks of a worker on its
//! session port, what the worker answers, and how a worker announces itself to backends. Every
//! message is one JSON frame (`frame`), tagged by `type`; unknown fields are refused.

use serde::{Deserialize, Serialize};

/// Resource limits of a session; a request may lower the worker's, never raise them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub cpu_seconds: u64,
    pub memory_mb: u64,
    pub processes: u64,
    pub open_files: u64,
    pub file_size_mb: u64,
    pub wall_clock_seconds: u64,
    pub idle_timeout_seconds: u64,
    /// CPU bandwidth of the whole session, in percent of one core (its cgroup's quota).
    #[serde(default = "default_cpu_percent")]
    pub cpu_percent: u64,
}

fn default_cpu_percent() -> u64 {
    100
}

impl Limits {
    /// The stricter of each limit.
    pub fn min(&self, other: &Limits) -> Limits {
        Limits {
            cpu_seconds: self.cpu_seconds.min(other.cpu_seconds),
            memory_mb: self.memory_mb.min(other.memory_mb),
            processes: self.processes.min(other.processes),
            open_files: self.open_files.min(other.open_files),
            file_size_mb: self.file_size_mb.min(other.file_size_mb),
            wall_clock_seconds: self.wall_clock_seconds.min(other.wall_clock_seconds),
            idle_timeout_seconds: self.idle_timeout_seconds.min(other.idle_timeout_seconds),
            cpu_percent: self.cpu_percent.min(other.cpu_percent),
        }
    }
}

/// Backend → worker, on the worker's session port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Start a session for a workspace: its files from a git bundle (base64) or empty.
    Open {
        session: String,
        #[serde(default)]
        bundle: Option<String>,
        #[serde(default)]
        limits: Option<Limits>,
    },
    /// Run code in the session's engine; executes run one after another, in order.
    Execute {
        session: String,
        id: u64,
        code: String,
    },
    /// SIGINT to what the session runs now.
    Interrupt {
        session: String,
    },
    /// Commit the workspace's changes and return the repository as a git bundle.
    Save {
        session: String,
        message: String,
    },
    Close {
        session: String,
    },
    /// A file operation in the workspace, done as its user inside the sandbox; answered by
    /// `file_result`, in order with the session's other commands.
    File {
        session: String,
        op: FileOp,
    },
    Ping,
    /// Sets (`on`) or clears the worker's drain flag, as `sage-agent drain` on its host does: an
    /// operator's action from the operators' page (the backend checked the operator). Answered
    /// by `pong`; the change shows in the worker's next heartbeat.
    Drain {
        on: bool,
    },
}

/// What a `file` request does. Paths are relative to the workspace, without `..` or `.git`
/// (`workspace_path`); files only, never through a symbolic link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileOp {
    List,
    Read { path: String },
    Write { path: String, data: String },
    Remove { path: String },
}

/// A file of a workspace, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
}

/// How a file operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileResult {
    Listed {
        files: Vec<FileInfo>,
    },
    Read {
        path: String,
        data: String,
        size: u64,
    },
    Written {
        path: String,
        size: u64,
    },
    Removed {
        path: String,
    },
    Failed {
        message: String,
    },
}

/// The largest file the file operations read or write (text edited in a browser).
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// A path inside a workspace as a client gives it: relative, no `..`, no `.git`, no NUL or
/// backslash, at most 1,000 bytes; returned normalised (`./a//b` is `a/b`). `""` is the
/// workspace itself.
pub fn workspace_path(p: &str) -> Result<String, String> {
    let refuse =
        || format!("the path {p:?} must be relative and inside the workspace (no '..', no '.git')");
    if p.len() > 1000 || p.contains('\0') || p.contains('\\') {
        return Err(refuse());
    }
    let mut parts = Vec::new();
    for c in std::path::Path::new(p).components() {
        match c {
            std::path::Component::Normal(n) if n != ".git" => {
                parts.push(n.to_str().ok_or_else(refuse)?)
            }
            std::path::Component::CurDir => {}
            _ => return Err(refuse()),
        }
    }
    Ok(parts.join("/"))
}

/// How an execute ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The code raised; the traceback went to stderr.
    Error,
    Interrupted,
    /// The engine died (a limit, or a signal); the session is closed.
    Killed,
}

/// Worker → backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    Opened {
        session: String,
        engine: String,
        ready_ms: u64,
        /// Forked from the worker's engine server (else started as a fresh process).
        #[serde(default)]
        forked: bool,
    },
    Stdout {
        session: String,
        id: u64,
        data: String,
    },
    Stderr {
        session: String,
        id: u64,
        data: String,
    },
    Done {
        session: String,
        id: u64,
        status: Status,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A picture a cell made (base64), before its `done`.
    Image {
        session: String,
        id: u64,
        mime: String,
        data: String,
    },
    FileResult {
        session: String,
        result: FileResult,
    },
    Saved {
        session: String,
        bundle: String,
        changed: bool,
    },
    Closed {
        session: String,
        reason: String,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        message: String,
    },
    Pong {
        sessions: u32,
        capacity: u32,
    },
}

/// Worker → backend, on the backend's worker port: who the worker is, then heartbeats.
///
/// `draining` (the operator's `sage-agent drain`: take no new sessions, let backends move the
/// open ones away) is left out while false, so a worker that is not draining sends exactly what
/// workers sent before it existed, and backends of before accept it during a rolling upgrade.
/// Such a backend refuses a draining worker's announcements (unknown field): drain after the
/// backends are upgraded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Announce {
    Register {
        host: String,
        address: String,
        capacity: u32,
        engines: Vec<String>,
        #[serde(default, skip_serializing_if = "is_false")]
        draining: bool,
    },
    Heartbeat {
        sessions: u32,
        load: f64,
        #[serde(default, skip_serializing_if = "is_false")]
        draining: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Backend → worker, answering an announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AnnounceReply {
    Ack,
}

/// Session ids name unix users and directories: lowercase letters, digits, '-', at most 48.
pub fn valid_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_paths() {
        assert_eq!(workspace_path("").unwrap(), "");
        assert_eq!(workspace_path("./out//a.txt").unwrap(), "out/a.txt");
        for bad in [
            "../etc",
            "a/../../b",
            "/etc/passwd",
            ".git/config",
            "a/.git",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(workspace_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_messages() {
        let r = Request::File {
            session: "s1".into(),
            op: FileOp::Write {
                path: "a.txt".into(),
                data: "x".into(),
            },
        };
        let t = serde_json::to_string(&r).unwrap();
        assert_eq!(
            t,
            r#"{"type":"file","session":"s1","op":{"kind":"write","path":"a.txt","data":"x"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&t).unwrap(), r);
        let e: Event = serde_json::from_str(
            r#"{"type":"file_result","session":"s1","result":{"kind":"listed","files":[{"path":"a","size":1}]}}"#,
        )
        .unwrap();
        assert!(matches!(e, Event::FileResult { .. }));
    }

    #[test]
    fn log_request_wire_format() {
        let r = LogRequest::Records {
            batch: 7,
            records: vec![LogRecord {
                id: "b1-1".into(),
                ts_ms: 1_795_800_000_000,
                host: "backend1".into(),
                level: Level::Warn,
                target: "backend::save".into(),
                message: "saved".into(),
                fields: serde_json::Map::new(),
            }],
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.starts_with(r#"{"type":"records","batch":7,"records":[{"id":"b1-1","#));
        assert_eq!(serde_json::from_str::<LogRequest>(&text).unwrap(), r);
        // Any order of fields; the type is required, and checked; unknown fields are refused.
        let r2: LogRequest =
            serde_json::from_str(r#"{"records":[],"batch":2,"type":"records"}"#).unwrap();
        assert_eq!(
            r2,
            LogRequest::Records {
                batch: 2,
                records: vec![]
            }
        );
        for bad in [
            r#"{"batch":2,"records":[]}"#,
            r#"{"type":"query","batch":2,"records":[]}"#,
            r#"{"type":"records","batch":2,"records":[],"extra":1}"#,
        ] {
            assert!(serde_json::from_str::<LogRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"type":"execute","session":"w1","id":3,"code":"1+1"}"#)
                .unwrap();
        assert_eq!(
            r,
            Request::Execute {
                session: "w1".into(),
                id: 3,
                code: "1+1".into()
            }
        );
        assert!(
            serde_json::from_str::<Request>(
                r#"{"type":"execute","session":"w1","id":3,"code":"1","x":1}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"type":"format_disk"}"#).is_err());
        let e = Event::Done {
            session: "w1".into(),
            id: 3,
            status: Status::Ok,
            message: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"done","session":"w1","id":3,"status":"ok"}"#
        );
    }

    #[test]
    fn announcements_of_a_worker_not_draining_are_unchanged() {
        // What workers sent before `draining` existed, byte for byte: backends of before
        // (unknown fields refused) keep accepting a worker that is not draining.
        let hb = Announce::Heartbeat {
            sessions: 2,
            load: 0.25,
            draining: false,
        };
        let old = r#"{"type":"heartbeat","sessions":2,"load":0.25}"#;
        assert_eq!(serde_json::to_string(&hb).unwrap(), old);
        assert_eq!(serde_json::from_str::<Announce>(old).unwrap(), hb);
        let reg = Announce::Register {
            host: "w1".into(),
            address: "10.0.0.1:7000".into(),
            capacity: 8,
            engines: vec!["python3".into()],
            draining: false,
        };
        let old = r#"{"type":"register","host":"w1","address":"10.0.0.1:7000","capacity":8,"engines":["python3"]}"#;
        assert_eq!(serde_json::to_string(&reg).unwrap(), old);
        assert_eq!(serde_json::from_str::<Announce>(old).unwrap(), reg);
        // A draining worker says so; other unknown fields are still refused.
        let draining = Announce::Heartbeat {
            sessions: 2,
            load: 0.25,
            draining: true,
        };
        let text = serde_json::to_string(&draining).unwrap();
        assert_eq!(
            text,
            r#"{"type":"heartbeat","sessions":2,"load":0.25,"draining":true}"#
        );
        assert_eq!(serde_json::from_str::<Announce>(&text).unwrap(), draining);
        assert!(
            serde_json::from_str::<Announce>(
                r#"{"type":"heartbeat","sessions":2,"load":0.25,"drained":true}"#
            )
            .is_err()
        );
    }

    #[test]
    fn session_ids() {
        assert!(valid_session_id("ws-42"));
        assert!(!valid_session_id("../etc"));
        assert!(!valid_session_id("Ws"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id(&"a".repeat(49)));
    }
}

/// Severity of a log record, least to most severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One log record as a client sends it. The source address is not in it: logd takes it from
/// the connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRecord {
    /// Unique per record, chosen by the client; a resend after a lost ack is dropped by it.
    pub id: String,
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    pub host: String,
    pub level: Level,
    pub target: String,
    pub message: String,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Client → logd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields,
    from = "RecordsFrame"
)]
pub enum LogRequest {
    /// Records to store; answered by `ack` with the same batch number once committed.
    Records { batch: u64, records: Vec<LogRecord> },
}

/// A `LogRequest` as read off the wire (the same JSON), in one pass: serde reads an internally
/// tagged enum by first copying the whole message into a tree of its own, which for a batch of
/// records costs about as much as reading it. A new kind of request needs a `type` here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsFrame {
    #[serde(rename = "type")]
    _type: RecordsType,
    batch: u64,
    records: Vec<LogRecord>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordsType {
    Records,
}

impl From<RecordsFrame> for LogRequest {
    fn from(f: RecordsFrame) -> LogRequest {
        LogRequest::Records {
            batch: f.batch,
            records: f.records,
        }
    }
}

/// logd → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogReply {
    /// The batch is committed: `stored` new records, `duplicates` already there.
    Ack {
        batch: u64,
        stored: u64,
        duplicates: u64,
    },
    Error {
        message: String,
    },
}
