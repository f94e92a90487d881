//! SSH to managed hosts (russh): key authentication (the inventory's identity file, the lab's
//! key, or ssh-agent), host keys pinned in the state directory, one connection per host reused
//! for the whole run, commands given as argument lists (quoted by `quote::join`) with stdin,
//! stdout, stderr and exit status.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};

use crate::hostkeys::KnownHosts;

/// What to do with a host whose key is not pinned yet (as OpenSSH's StrictHostKeyChecking).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostKeyPolicy {
    /// Pin the key of a host seen for the first time (saying so); refuse a changed key.
    AcceptNew,
    /// Refuse any host whose key is not pinned already.
    Strict,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error(
        "HOST KEY CHANGED for {host} ({addr}): pinned {pinned}, offered {offered}\n  hint: if the machine was really rebuilt, remove its lines from {known_hosts} and run again; otherwise someone may be in the middle"
    )]
    KeyChanged {
        host: String,
        addr: IpAddr,
        pinned: String,
        offered: String,
        known_hosts: PathBuf,
    },
    #[error(
        "{host} ({addr}) has no pinned host key and --host-keys=strict: offered {offered}\n  hint: check the fingerprint on the machine's console, then run with --host-keys=accept-new"
    )]
    KeyUnknown {
        host: String,
        addr: IpAddr,
        offered: String,
    },
    #[error("authentication as {user} on {host} failed: {why}")]
    Auth {
        host: String,
        user: String,
        why: String,
    },
    #[error("{host}: `{command}`: {why}")]
    Channel {
        host: String,
        command: String,
        why: String,
    },
    #[error("{host}: `{command}` timed out after {secs}s")]
    Timeout {
        host: String,
        command: String,
        secs: u64,
    },
}

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub addr: SocketAddr,
    pub user: String,
    /// Private key file; `None` uses ssh-agent ($SSH_AUTH_SOCK).
    pub identity: Option<PathBuf>,
}

/// The output of a remote command.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status == 0
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last lines of stderr (or stdout when stderr is empty), for error messages.
    pub fn tail(&self) -> String {
        let t = crate::sys::tail(&self.stderr, 6);
        if t.is_empty() {
            crate::sys::tail(&self.stdout, 6)
        } else {
            t
        }
    }
}

struct Verifier {
    host: String,
    addr: IpAddr,
    known: Arc<KnownHosts>,
    policy: HostKeyPolicy,
    /// What went wrong, for a better message than russh's.
    failure: Arc<Mutex<Option<SshError>>>,
    /// Set when the key was pinned on this first contact.
    pinned_now: Arc<Mutex<Option<String>>>,
}

fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.failure.lock().unwrap() = Some(SshError::Connect {
                addr: SocketAddr::new(self.addr, 22),
                why: "host certificates are not supported".into(),
            });
            return Ok(false);
        };
        let offered = key.to_openssh().unwrap_or_default();
        let mut parts = offered.split_whitespace();
        let (algo, b64) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let pinned = self.known.get(self.addr);
        if pinned.is_empty() {
            if self.policy == HostKeyPolicy::Strict {
                *self.failure.lock().unwrap() = Some(SshError::KeyUnknown {
                    host: self.host.clone(),
                    addr: self.addr,
                    offered: fingerprint(key),
                });
                return Ok(false);
            }
            let line = format!("{} {algo} {b64}", self.addr);
            if self.known.replace(self.addr, &[line]).is_err() {
                return Ok(false);
            }
            *self.pinned_now.lock().unwrap() = Some(fingerprint(key));
            return Ok(true);
        }
        let matches = pinned.iter().any(|l| {
            let mut w = l.split_whitespace().skip(1);
            w.next() == Some(algo) && w.next() == Some(b64)
        });
        if matches {
            return Ok(true);
        }
        let pinned_fp = pinned
            .iter()
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter_map(|b| russh::keys::parse_public_key_base64(b).ok())
            .map(|k| fingerprint(&k))
            .collect::<Vec<_>>()
            .join(", ");
        *self.failure.lock().unwrap() = Some(SshError::KeyChanged {
            host: self.host.clone(),
            addr: self.addr,
            pinned: pinned_fp,
            offered: fingerprint(key),
            known_hosts: self.known.path().to_path_buf(),
        });
        Ok(false)
    }
}

/// An authenticated connection to one host.
pub struct Session {
    pub target: Target,
    handle: Handle<Verifier>,
    /// The fingerprint pinned on this first contact, if it was one.
    pub pinned_now: Option<String>,
    /// Commands left running until the session closes ([`Session::hold`]).
    held: Mutex<Vec<russh::Channel<client::Msg>>>,
}

/// What [`Session::hold`] saw: the command's output so far and, when it ended instead of
/// reaching what was awaited, its exit status and stderr.
#[derive(Debug)]
pub struct Holding {
    /// True when the command reached what was awaited and is still running (held).
    pub held: bool,
    pub stdout: String,
    pub ended: Option<Output>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Session {
    pub async fn connect(
        target: &Target,
        known: Arc<KnownHosts>,
        policy: HostKeyPolicy,
    ) -> Result<Session, SshError> {
        let failure = Arc::new(Mutex::new(None));
        let pinned_now = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            host: target.host.clone(),
            addr: target.addr.ip(),
            known,
            policy,
            failure: failure.clone(),
            pinned_now: pinned_now.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(600)),
            // A host gone mid-run is noticed within about 15 s.
            keepalive_interval: Some(Duration::from_secs(5)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let cerr = |why: String| SshError::Connect {
            addr: target.addr,
            why,
        };
        let connecting = client::connect(config, target.addr, verifier);
        let mut handle = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(cerr(format!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(e)) => {
                return Err(failure
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap_or_else(|| cerr(e.to_string())));
            }
            Ok(Ok(h)) => h,
        };
        authenticate(&mut handle, target).await?;
        let pinned_now = pinned_now.lock().unwrap().take();
        Ok(Session {
            target: target.clone(),
            handle,
            pinned_now,
            held: Mutex::new(Vec::new()),
        })
    }

    /// A channel failure of `command` (shortened for messages).
    fn channel_error(&self, command: &str, why: impl ToString) -> SshError {
        SshError::Channel {
            host: self.target.host.clone(),
            command: command.chars().take(200).collect(),
            why: why.to_string(),
        }
    }

    /// A new channel running `command`.
    async fn open_exec(&self, command: &str) -> Result<russh::Channel<client::Msg>, SshError> {
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.channel_error(command, e))?;
        ch.exec(true, command)
            .await
            .map_err(|e| self.channel_error(command, e))?;
        Ok(ch)
    }

    /// `work` (running `command`), given at most `timeout`.
    async fn timed<T>(
        &self,
        command: &str,
        timeout: Duration,
        work: impl std::future::Future<Output = Result<T, SshError>>,
    ) -> Result<T, SshError> {
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout {
                host: self.target.host.clone(),
                command: command.to_string(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Runs `argv` with `stdin`, waiting at most `timeout`.
    pub async fn run(
        &self,
        argv: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<Output, SshError> {
        let command = crate::quote::join(argv);
        self.timed(&command, timeout, self.exec(&command, stdin))
            .await
    }

    /// Runs `argv` with its stdin read from `input` and its stdout written to `output` as they
    /// come (files of any size: dumps streamed to or from the machine running sagectl);
    /// the returned `Output` holds stderr and the status. At most `timeout`.
    pub async fn stream(
        &self,
        argv: &[&str],
        input: impl tokio::io::AsyncRead + Unpin,
        output: &mut (impl tokio::io::AsyncWrite + Unpin),
        timeout: Duration,
    ) -> Result<Output, SshError> {
        let command = crate::quote::join(argv);
        let work = async {
            use tokio::io::AsyncWriteExt;
            let cerr = |why: String| self.channel_error(&command, why);
            let ch = self.open_exec(&command).await?;
            let (mut read, write) = ch.split();
            // Sending and receiving at once: a command that writes before reading all its
            // stdin must not stall the upload.
            let send = async {
                write.data(input).await.map_err(|e| cerr(e.to_string()))?;
                write.eof().await.map_err(|e| cerr(e.to_string()))
            };
            let receive = async {
                let mut out = Output::default();
                let mut status = None;
                while let Some(msg) = read.wait().await {
                    match msg {
                        ChannelMsg::Data { data } => output
                            .write_all(&data)
                            .await
                            .map_err(|e| cerr(format!("writing its output: {e}")))?,
                        ChannelMsg::ExtendedData { data, ext: 1 } => {
                            out.stderr.extend_from_slice(&data)
                        }
                        ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                        ChannelMsg::ExitSignal { signal_name, .. } => {
                            return Err(cerr(format!("killed by signal {signal_name:?}")));
                        }
                        _ => {}
                    }
                }
                output
                    .flush()
                    .await
                    .map_err(|e| cerr(format!("writing its output: {e}")))?;
                out.status = status
                    .ok_or_else(|| cerr("the connection closed before the command ended".into()))?;
                Ok(out)
            };
            let (sent, received) = tokio::join!(send, receive);
            let out = received?;
            // A command that ends without reading all its stdin (an error) closes the channel
            // under the upload: its status says why.
            if out.ok() {
                sent?;
            }
            Ok(out)
        };
        self.timed(&command, timeout, work).await
    }

    async fn exec(&self, command: &str, stdin: &[u8]) -> Result<Output, SshError> {
        let cerr = |why: String| self.channel_error(command, why);
        let mut ch = self.open_exec(command).await?;
        if !stdin.is_empty() {
            ch.data(stdin).await.map_err(|e| cerr(e.to_string()))?;
        }
        ch.eof().await.map_err(|e| cerr(e.to_string()))?;
        let mut out = Output::default();
        let mut status = None;
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    return Err(cerr(format!("killed by signal {signal_name:?}")));
                }
                _ => {}
            }
        }
        out.status =
            status.ok_or_else(|| cerr("the connection closed before the command ended".into()))?;
        Ok(out)
    }

    /// Starts `argv` with `stdin` but leaves its stdin open, until its stdout so far
    /// satisfies `until` (then the command stays running, its stdin open, until the session
    /// closes or the connection ends) or it ends; waiting at most `timeout`.
    pub async fn hold(
        &self,
        argv: &[&str],
        stdin: &[u8],
        until: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Holding, SshError> {
        let command = crate::quote::join(argv);
        let cerr = |why: String| self.channel_error(&command, why);
        let work = async {
            let mut ch = self.open_exec(&command).await?;
            ch.data(stdin).await.map_err(|e| cerr(e.to_string()))?;
            let mut out = Output::default();
            let mut status = None;
            while let Some(msg) = ch.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        out.stdout.extend_from_slice(&data);
                        let text = out.stdout_text();
                        if until(&text) {
                            self.held.lock().unwrap().push(ch);
                            return Ok(Holding {
                                held: true,
                                stdout: text,
                                ended: None,
                            });
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        out.stderr.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    _ => {}
                }
            }
            out.status = status
                .ok_or_else(|| cerr("the connection closed before the command ended".into()))?;
            Ok(Holding {
                held: false,
                stdout: out.stdout_text(),
                ended: Some(out),
            })
        };
        self.timed(&command, timeout, work).await
    }

    pub async fn close(self) {
        // Held commands see their stdin end (the message goes before the disconnect).
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for ch in held {
            let _ = ch.eof().await;
        }
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

async fn authenticate(handle: &mut Handle<Verifier>, t: &Target) -> Result<(), SshError> {
    let aerr = |why: String| SshError::Auth {
        host: t.host.clone(),
        user: t.user.clone(),
        why,
    };
    // The connection breaking during authentication is the host going away, not a refusal.
    let lost = |e: russh::Error| SshError::Connect {
        addr: t.addr,
        why: format!("connection lost during authentication: {e}"),
    };
    if let Some(path) = &t.identity {
        let key = russh::keys::load_secret_key(path, None)
            .map_err(|e| aerr(format!("cannot load {}: {e}", path.display())))?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(lost)?
            .flatten();
        let r = handle
            .authenticate_publickey(&t.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
            .map_err(lost)?;
        return if r.success() {
            Ok(())
        } else if handle.is_closed() {
            // russh reports a session that ended before the answer as a refusal.
            Err(lost(russh::Error::Disconnect))
        } else {
            Err(aerr(format!(
                "the server refused the key {}",
                path.display()
            )))
        };
    }
    let mut agent = russh::keys::agent::client::AgentClient::connect_env()
        .await
        .map_err(|e| {
            aerr(format!(
                "no identity file in the inventory and no usable ssh-agent ({e})"
            ))
        })?;
    let ids = agent
        .request_identities()
        .await
        .map_err(|e| aerr(format!("ssh-agent: {e}")))?;
    for id in ids {
        let key = id.public_key().into_owned();
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| aerr(e.to_string()))?
            .flatten();
        if let Ok(r) = handle
            .authenticate_publickey_with(&t.user, key, hash, &mut agent)
            .await
        {
            if r.success() {
                return Ok(());
            }
        }
    }
    if handle.is_closed() {
        return Err(lost(russh::Error::Disconnect));
    }
    Err(aerr("no key in ssh-agent was accepted".into()))
}
