//! The browser protocol as types: what a browser sends over SockJS (`Request`: an id and an
//! `Op`), the reply each op gets (`Reply`, inside `{"id": N, "ok": true, ...}`), and the events
//! an open workspace sends (`BrowserEvent`). The golden file `tests/js/messages.json` holds an
//! example of each; this module's tests and the JavaScript client's tests both check against
//! it, so the two sides cannot drift apart.

use serde::{Deserialize, Serialize};

use super::git::Commit;
use crate::proto::{FileInfo, Status};

/// What a request asks (`"op"` names it). Fields a request does not use are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Ping,
    Whoami,
    Signup {
        name: String,
        password: String,
    },
    Signin {
        name: String,
        password: String,
    },
    Signout,
    List,
    Create {
        name: String,
        /// A git bundle in base64 (small ones; large ones go by `POST /api/workspaces`).
        #[serde(default)]
        bundle: Option<String>,
    },
    Rename {
        workspace: String,
        name: String,
    },
    Delete {
        workspace: String,
    },
    Open {
        workspace: String,
    },
    Close {
        workspace: String,
    },
    Execute {
        workspace: String,
        code: String,
    },
    Interrupt {
        workspace: String,
    },
    Save {
        workspace: String,
        #[serde(default)]
        message: Option<String>,
    },
    History {
        workspace: String,
    },
    Revert {
        workspace: String,
        commit: String,
    },
    Publish {
        workspace: String,
        #[serde(default)]
        path: Option<String>,
    },
    Files {
        workspace: String,
    },
    Read {
        workspace: String,
        path: String,
    },
    Write {
        workspace: String,
        path: String,
        data: String,
    },
    Remove {
        workspace: String,
        path: String,
    },
    /// The operators' page (operators only): workers, backends, the latest audit records.
    Fleet,
    /// Drain (or undrain) a worker (operators only).
    DrainWorker {
        worker: String,
        drain: bool,
    },
}

/// Every op's name, for "unknown op" answers and the golden file's test.
pub const OPS: [&str; 23] = [
    "ping",
    "whoami",
    "signup",
    "signin",
    "signout",
    "list",
    "create",
    "rename",
    "delete",
    "open",
    "close",
    "execute",
    "interrupt",
    "save",
    "history",
    "revert",
    "publish",
    "files",
    "read",
    "write",
    "remove",
    "fleet",
    "drain_worker",
];

/// A request: `{"id": N, "op": ..., ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    /// Reads a request from a parsed message, with an error a person can act on.
    pub fn from_value(v: serde_json::Value) -> Result<Request, (Option<u64>, String)> {
        let id = v.get("id").and_then(serde_json::Value::as_u64);
        let Some(id) = id else {
            return Err((
                None,
                "every request needs an \"id\": a non-negative integer".into(),
            ));
        };
        let op = match v.get("op").and_then(serde_json::Value::as_str) {
            None => return Err((Some(id), "field \"op\" (a string) is required".into())),
            Some(op) if !OPS.contains(&op) => {
                return Err((Some(id), format!("unknown op {op:?}")));
            }
            Some(op) => op.to_string(),
        };
        serde_json::from_value(v).map_err(|e| {
            // serde says "missing field `workspace`" or "invalid type: ...": name the op.
            (Some(id), format!("op {op:?}: {e}"))
        })
    }
}

/// A workspace as the list shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceInfo {
    pub workspace: String,
    pub name: String,
    pub version: i64,
    /// Unix seconds of the last save.
    pub updated: i64,
    pub published: bool,
}

/// The body of a successful reply (beside `"id"` and `"ok": true`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    // First: with deny_unknown_fields it takes only `{}` (an `Option` field elsewhere would
    // take it too).
    Empty(Empty),
    Pong(Pong),
    Account(AccountReply),
    Workspaces(Workspaces),
    Opened(Opened),
    Renamed(Renamed),
    Saved(Saved),
    History(HistoryReply),
    Reverted(Reverted),
    Published(Published),
    Files(FilesReply),
    FileRead(FileRead),
    FileWritten(FileWritten),
    FileRemoved(FileRemoved),
    Workspace(WorkspaceReply),
    Fleet(FleetReply),
    WorkerDrain(WorkerDrain),
}

macro_rules! reply_struct {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name { $(pub $field: $ty),* }
    };
}

reply_struct!(Pong { pong: bool });
reply_struct!(
    /// fleet: what the operators' page shows (`audit_error` says why the audit list is empty).
    FleetReply {
        workers: Vec<super::fleet::FleetWorker>,
        backends: Vec<super::fleet::FleetBackend>,
        audit: Vec<super::fleet::AuditEntry>,
        audit_error: Option<String>,
    }
);
reply_struct!(
    /// drain_worker: the worker and whether it drains now.
    WorkerDrain { worker: String, draining: bool }
);
reply_struct!(
    /// signin, signup, whoami (`null` when not signed in).
    AccountReply { account: Option<String> }
);
reply_struct!(Workspaces {
    workspaces: Vec<WorkspaceInfo>
});
reply_struct!(
    /// create, delete, close, execute, interrupt.
    WorkspaceReply { workspace: String }
);
reply_struct!(Opened {
    workspace: String,
    name: String,
    worker: String
});
reply_struct!(Renamed {
    workspace: String,
    name: String
});
reply_struct!(Saved {
    workspace: String,
    changed: bool
});
reply_struct!(HistoryReply {
    workspace: String,
    history: Vec<Commit>
});
reply_struct!(Reverted {
    workspace: String,
    commit: String
});
reply_struct!(Published {
    workspace: String,
    url: String,
    files: Vec<String>,
    hosts: Vec<String>
});
reply_struct!(FilesReply {
    workspace: String,
    files: Vec<FileInfo>
});
reply_struct!(FileRead {
    workspace: String,
    path: String,
    data: String,
    size: u64
});
reply_struct!(FileWritten {
    workspace: String,
    path: String,
    size: u64
});
reply_struct!(FileRemoved {
    workspace: String,
    path: String
});
reply_struct!(
    /// signout.
    Empty {}
);

/// What an open workspace tells its viewers (`"event"` names it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum BrowserEvent {
    Stdout {
        workspace: String,
        id: u64,
        data: String,
    },
    Stderr {
        workspace: String,
        id: u64,
        data: String,
    },
    /// A picture the cell made (base64).
    Image {
        workspace: String,
        id: u64,
        mime: String,
        data: String,
    },
    /// The cell printed more than the cap: the rest is not shown.
    Truncated {
        workspace: String,
        id: u64,
        message: String,
    },
    Done {
        workspace: String,
        id: u64,
        status: Status,
        message: Option<String>,
    },
    /// The workspace was reopened on another worker: its worker was lost (from its last save),
    /// or is being drained (saved first, between cells).
    Moved {
        workspace: String,
        worker: Option<String>,
        message: String,
    },
    WorkerLost {
        workspace: String,
        worker: String,
    },
    /// The session had ended (a limit, idle) and was opened again from the last save.
    Reopened {
        workspace: String,
        worker: Option<String>,
        message: String,
    },
    Closed {
        workspace: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Error {
        workspace: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn golden() -> Value {
        serde_json::from_str(include_str!("../../../tests/js/messages.json")).unwrap()
    }

    #[test]
    fn every_request_in_the_golden_file_is_an_op_and_every_op_has_one() {
        let g = golden();
        let reqs = g["requests"].as_object().unwrap();
        for (name, example) in reqs {
            let r =
                Request::from_value(example.clone()).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(example["op"], name.as_str());
            assert_eq!(Some(r.id), example["id"].as_u64());
        }
        for op in OPS {
            assert!(reqs.contains_key(op), "no example of {op} in messages.json");
        }
    }

    #[test]
    fn every_reply_and_event_in_the_golden_file_round_trips() {
        let g = golden();
        for (name, example) in g["replies"].as_object().unwrap() {
            let mut body = example.as_object().unwrap().clone();
            body.remove("id");
            if body.remove("ok") != Some(Value::Bool(true)) {
                // An error reply: its fields are the ones handle() writes.
                for k in body.keys() {
                    assert!(
                        ["error", "status", "retry_after"].contains(&k.as_str()),
                        "{name}: {k}"
                    );
                }
                continue;
            }
            let v = Value::Object(body);
            let r: Reply = serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("reply {name} is no Reply: {e}\n{v}"));
            assert_eq!(serde_json::to_value(&r).unwrap(), v, "reply {name}");
        }
        let events = g["events"].as_object().unwrap();
        for (name, example) in events {
            let e: BrowserEvent = serde_json::from_value(example.clone())
                .unwrap_or_else(|e| panic!("event {name}: {e}"));
            assert_eq!(serde_json::to_value(&e).unwrap(), *example, "event {name}");
            assert_eq!(example["event"], name.as_str());
        }
        for name in [
            "stdout",
            "stderr",
            "image",
            "truncated",
            "done",
            "moved",
            "worker_lost",
            "reopened",
            "closed",
            "error",
        ] {
            assert!(events.contains_key(name), "no example of {name}");
        }
    }

    #[test]
    fn requests_are_refused_with_clear_errors() {
        let e = |v: Value| Request::from_value(v).unwrap_err();
        assert_eq!(
            e(serde_json::json!({"op": "ping"})).1,
            "every request needs an \"id\": a non-negative integer"
        );
        assert_eq!(
            e(serde_json::json!({"id": 1, "op": "format_disk"})).1,
            "unknown op \"format_disk\""
        );
        let m = e(serde_json::json!({"id": 2, "op": "open"})).1;
        assert!(m.contains("op \"open\"") && m.contains("workspace"), "{m}");
        // Fields an op does not use are ignored.
        let r = Request::from_value(
            serde_json::json!({"id": 3, "op": "open", "workspace": "w1", "commit": "x"}),
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Open {
                workspace: "w1".into()
            }
        );
    }
}
