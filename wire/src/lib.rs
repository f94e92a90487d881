//! What sagectl and its agents (`sage-agent`) share, and nothing else: `sagectl` depends on
//! this crate, not on the agents.
//! - `frame`: 4-byte length + JSON frames, size checked before any allocation;
//! - `tls`: identities from PEM files and verifiers that check a peer's role in the handshake;
//! - `proto`: the worker protocol, the log protocol, resource limits;
//! - `logclient`: the log client (batches, spool, acknowledgements);
//! - `alerts`: logd's alert rules (sagectl validates them);
//! - `http1`: a small HTTP/1.1 client (webhooks, tests);
//! - `civil`: civil dates without a time zone database.

pub mod alerts;
pub mod civil;
pub mod frame;
pub mod http1;
pub mod logclient;
pub mod proto;
pub mod tls;
