//! `sagectl logs INVENTORY [--since 1h] [--level warn] [--host NAME] [--target T] [--grep TEXT]
//! [--follow]`: records from the deployment's logd, over HTTPS with sagectl's admin certificate
//! (logd's query port takes no other).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub use crate::logquery::Client;
use crate::logquery::Query;
use crate::logquery::format_ms;

#[derive(clap::Args)]
pub struct Opts {
    pub inventory: PathBuf,
    /// Only records newer than this: 30s, 15m, 2h, 7d.
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// Least level: trace, debug, info, warn, error.
    #[arg(long)]
    pub level: Option<String>,
    /// Only records from this host.
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub target: Option<String>,
    /// Only records whose message contains this text.
    #[arg(long)]
    pub grep: Option<String>,
    /// Keep printing new records as they arrive.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
}

impl From<&Opts> for Query {
    fn from(o: &Opts) -> Query {
        Query {
            since: o.since.clone(),
            level: o.level.clone(),
            host: o.host.clone(),
            target: o.target.clone(),
            text: o.grep.clone(),
            limit: o.limit,
        }
    }
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    let client = Client::new(&inv, &o)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut after = 0i64;
        loop {
            for r in client.records(after).await? {
                let ts = r["ts_ms"].as_i64().unwrap_or(0);
                println!(
                    "{} {} {:<5} {}: {}",
                    format_ms(ts),
                    r["host"].as_str().unwrap_or(""),
                    r["level"].as_str().unwrap_or(""),
                    r["target"].as_str().unwrap_or(""),
                    r["message"].as_str().unwrap_or("")
                );
                after = after.max(r["seq"].as_i64().unwrap_or(0));
            }
            if !o.follow {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}
