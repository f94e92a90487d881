//! sagectl: stand up a multi-user Sage workspace service on plain Debian machines.
//!
//! The library holds everything; `main` only parses arguments and turns results into an exit
//! code. Modules: the inventory and its diagnostics, roles as data, rendering, the state
//! directory (PKI and secrets), the converge pipeline (SSH, facts, plan, apply, health, audit)
//! that commands call, and one module per subcommand.

pub mod apply;
pub mod command;
pub mod diag;
pub mod facts;
pub mod health;
pub mod hostkeys;
pub mod inventory;
pub mod lab;
pub mod load;
pub mod lock;
pub mod logquery;
pub mod net;
pub mod pipeline;
pub mod pki;
pub mod plan;
pub mod quote;
pub mod render;
pub mod roles;
pub mod scram;
pub mod ssh;
pub mod ssh_config;
pub mod status;
pub mod sys;
pub mod ui;
pub mod yaml;
