//! sage-agent: the agents sagectl installs. Shared parts: the frame codec (`frame`), TLS with
//! role-checking verifiers (`tls`), the worker's protocol (`proto`). One module tree per agent.

pub mod backend;
pub mod civil;
pub mod config;
pub mod db;
pub mod frame;
pub mod http1;
pub mod logclient;
pub mod logd;
pub mod probe;
pub mod proto;
pub mod tls;
pub mod worker;
