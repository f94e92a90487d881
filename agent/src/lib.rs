//! sage-agent: the agents sagectl installs, one module tree per agent. What they share with
//! sagectl (frames, TLS, protocols, the log client) is the `sagews-wire` crate, re-exported here.

pub mod backend;
// Shared with sagectl (crate `sagews-wire`), under their old paths.
pub use sagews_wire::{civil, frame, http1, logclient, proto, tls};
pub mod config;
pub mod db;
pub mod logd;
pub mod probe;
pub mod service;
pub mod worker;
