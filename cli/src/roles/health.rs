//! Health checks as data: `roles/<role>/health/main.yaml`, a list of checks a role's hosts must
//! pass after `sagectl up`. Each names one generic kind (a command, an HTTP fetch, a psql query,
//! a TLS exchange, logd's query API) whose fields are templates rendered in the host's context
//! (so ports and paths come from the role's variables and the inventory), an `expect:`
//! expression on what came back, and the lines reported. `crate::health` runs them.

use crate::inventory::Role;
use crate::yaml::{Decoder, Fields, Node, join};

use super::{known_secret, one_of, req_string};

/// Where a check runs from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckFrom {
    /// The checked host itself.
    Host,
    /// The first host (in inventory order) of this role reached in the run, as that role's
    /// traffic comes; the check is not made when there is none.
    Role(Role),
}

/// How an HTTP fetch is made on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpClient {
    Curl,
    /// For hosts without curl (workers): plain `http://` on bash's /dev/tcp, no certificate
    /// options (starting python3 for it cost a no-op run 0.1 s per worker).
    Shell,
}

/// The generic kinds. Every string is a template; what a kind gives back is named for the
/// `expect`, `ok` and `fail` templates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// A command's standard output: `output`.
    Command(Vec<String>),
    /// A GET: `status`, `location`, `body`, and `metrics` (Prometheus text: name → list of
    /// `{labels, value}`). An empty `cacert` or `cert` means none; an HTTP error status fails.
    Http {
        url: String,
        resolve: String,
        cacert: String,
        cert: String,
        client: HttpClient,
    },
    /// A query with `psql` over `conninfo`, the password from a generated secret: `output`.
    Psql {
        conninfo: String,
        password_secret: String,
        query: String,
    },
    /// `send` over TLS (`openssl s_client`, verifying the server, presenting `cert`): `output`.
    Tls(TlsCheck),
    /// logd's query API, from sagectl with its admin certificate.
    LogdQuery,
}

/// The fields of a [`CheckKind::Tls`] check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCheck {
    pub connect: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub send: String,
}

/// One declared check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub name: String,
    pub from: CheckFrom,
    /// Made once per host of this role (`target` in the templates) rather than once.
    pub for_each: Option<Role>,
    /// An expression; the check is made only when it is true.
    pub when: Option<String>,
    /// Tried again for up to 20 s until it passes (services may still be starting).
    pub retry: bool,
    /// Named templates rendered first, usable by every other field.
    pub lets: Vec<(String, String)>,
    pub kind: CheckKind,
    /// An expression on what the kind gave back; absent: the kind succeeding is enough.
    pub expect: Option<String>,
    /// The detail reported when it passes, and when `expect` is false.
    pub ok: String,
    pub fail: Option<String>,
}

const KINDS: &[&str] = &["command", "http", "psql", "tls", "logd_query"];

const KEYS: &[&str] = &[
    "name",
    "from",
    "for_each",
    "when",
    "retry",
    "let",
    "expect",
    "ok",
    "fail",
    "command",
    "http",
    "psql",
    "tls",
    "logd_query",
];

fn role(d: &mut Decoder, f: &Fields<'_>, key: &str) -> Option<Option<Role>> {
    let Some(n) = f.get(key) else {
        return Some(None);
    };
    let s = d.string(n, &f.path_of(key))?;
    match Role::from_name(&s) {
        Some(r) => Some(Some(r)),
        None => {
            let names: Vec<&str> = Role::DECLARABLE.iter().map(|r| r.name()).collect();
            d.error(
                n,
                &f.path_of(key),
                format!("unknown role `{s}`"),
                Some(crate::diag::suggest(&s, &names)),
            );
            None
        }
    }
}

fn opt_string(d: &mut Decoder, f: &Fields<'_>, key: &str) -> Option<Option<String>> {
    match f.get(key) {
        Some(n) => d.string(n, &f.path_of(key)).map(Some),
        None => Some(None),
    }
}

/// One entry of a health file.
pub fn check(d: &mut Decoder, node: &Node, path: &str) -> Option<HealthCheck> {
    let f = d.fields(node, path, KEYS)?;
    let name = req_string(d, &f, "name")?;
    let from = match role(d, &f, "from")? {
        Some(r) => CheckFrom::Role(r),
        None => CheckFrom::Host,
    };
    let for_each = role(d, &f, "for_each")?;
    let retry = match f.get("retry") {
        Some(n) => d.bool(n, &f.path_of("retry"))?,
        None => true,
    };
    let mut lets = Vec::new();
    if let Some(n) = f.get("let") {
        for (k, _, v) in d.mapping(n, &f.path_of("let"))? {
            lets.push((k.to_string(), d.string(v, &join(&f.path_of("let"), k))?));
        }
    }
    let (kind, body, p) = one_of(d, &f, KINDS, "a health check needs exactly one kind")?;
    let kind = match kind {
        "command" => CheckKind::Command(d.strings(body, &p)?.into_iter().map(|(s, _)| s).collect()),
        "http" => {
            let h = d.fields(body, &p, &["url", "resolve", "cacert", "cert", "client"])?;
            let client = match opt_string(d, &h, "client")?.as_deref() {
                None | Some("curl") => HttpClient::Curl,
                Some("shell") => HttpClient::Shell,
                Some(other) => {
                    d.error(
                        body,
                        &h.path_of("client"),
                        format!("unknown HTTP client `{other}`"),
                        Some("curl or shell".into()),
                    );
                    return None;
                }
            };
            let kind = CheckKind::Http {
                url: req_string(d, &h, "url")?,
                resolve: opt_string(d, &h, "resolve")?.unwrap_or_default(),
                cacert: opt_string(d, &h, "cacert")?.unwrap_or_default(),
                cert: opt_string(d, &h, "cert")?.unwrap_or_default(),
                client,
            };
            if client == HttpClient::Shell
                && ["resolve", "cacert", "cert"]
                    .iter()
                    .any(|k| h.get(k).is_some())
            {
                d.error(
                    body,
                    &p,
                    "the shell client takes a URL only",
                    Some("use curl for `resolve`, `cacert` and `cert`".into()),
                );
                return None;
            }
            kind
        }
        "psql" => {
            let h = d.fields(body, &p, &["conninfo", "password_secret", "query"])?;
            let secret = req_string(d, &h, "password_secret")?;
            if !known_secret(d, body, &h, &secret) {
                return None;
            }
            CheckKind::Psql {
                conninfo: req_string(d, &h, "conninfo")?,
                password_secret: secret,
                query: req_string(d, &h, "query")?,
            }
        }
        "tls" => {
            let h = d.fields(body, &p, &["connect", "ca", "cert", "key", "send"])?;
            CheckKind::Tls(TlsCheck {
                connect: req_string(d, &h, "connect")?,
                ca: req_string(d, &h, "ca")?,
                cert: req_string(d, &h, "cert")?,
                key: req_string(d, &h, "key")?,
                send: req_string(d, &h, "send")?,
            })
        }
        "logd_query" => {
            d.fields(body, &p, &[])?;
            CheckKind::LogdQuery
        }
        _ => unreachable!("KINDS lists every arm"),
    };
    Some(HealthCheck {
        name,
        from,
        for_each,
        when: opt_string(d, &f, "when")?,
        retry,
        lets,
        kind,
        expect: opt_string(d, &f, "expect")?,
        ok: req_string(d, &f, "ok")?,
        fail: opt_string(d, &f, "fail")?,
    })
}

impl HealthCheck {
    /// Its templates and expressions, to compile when the roles load: (is an expression, text).
    pub fn sources(&self) -> Vec<(bool, &str)> {
        let mut out: Vec<(bool, &str)> = Vec::new();
        out.extend(self.when.as_deref().map(|e| (true, e)));
        out.extend(self.expect.as_deref().map(|e| (true, e)));
        out.extend(self.lets.iter().map(|(_, t)| (false, t.as_str())));
        out.push((false, &self.ok));
        out.extend(self.fail.as_deref().map(|t| (false, t)));
        match &self.kind {
            CheckKind::Command(argv) => out.extend(argv.iter().map(|a| (false, a.as_str()))),
            CheckKind::Http {
                url,
                resolve,
                cacert,
                cert,
                ..
            } => out.extend([url, resolve, cacert, cert].map(|t| (false, t.as_str()))),
            CheckKind::Psql {
                conninfo, query, ..
            } => out.extend([conninfo, query].map(|t| (false, t.as_str()))),
            CheckKind::Tls(t) => out
                .extend([&t.connect, &t.ca, &t.cert, &t.key, &t.send].map(|t| (false, t.as_str()))),
            CheckKind::LogdQuery => {}
        }
        out
    }
}
