//! `sagectl render INVENTORY --out DIR [--host NAME]`: every host's desired files under
//! `DIR/<host>/`, plus `DIR/<host>/MANIFEST` (mode, owner, group, path). Files holding secrets
//! are written 0600; everything else 0644 locally (the manifest says what the host gets).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::pki::State;
use crate::render::host_files;
use crate::roles::Catalog;

#[derive(clap::Args)]
pub struct Opts {
    /// The inventory file.
    pub inventory: PathBuf,
    /// Directory to write into (created; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Render only this host (repeatable).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    for h in &o.hosts {
        if inv.host(h).is_none() {
            let names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
            anyhow::bail!(
                "--host {h}: no such host in {}\n  hint: {}",
                o.inventory.display(),
                crate::diag::suggest(h, &names)
            );
        }
    }
    let catalog =
        Catalog::embedded().map_err(|d| anyhow::anyhow!("embedded roles are broken:\n{d}"))?;
    let state = State::open(&inv)?;
    let mut count = 0;
    for host in inv
        .hosts
        .iter()
        .filter(|h| o.hosts.is_empty() || o.hosts.contains(&h.name))
    {
        let files = host_files(&inv, &catalog, &state, host)?;
        let root = o.out.join(&host.name);
        let mut manifest = String::new();
        for f in &files {
            let rel = f.path.trim_start_matches('/');
            write_file(&root.join(rel), &f.content, f.secret)?;
            manifest.push_str(&format!(
                "{:04o} {}:{} {}{}\n",
                f.attrs.mode,
                f.attrs.owner,
                f.attrs.group,
                f.path,
                if f.secret { " (secret)" } else { "" }
            ));
        }
        write_file(&root.join("MANIFEST"), manifest.as_bytes(), false)?;
        count += files.len();
    }
    println!("rendered {count} files into {}", o.out.display());
    Ok(ExitCode::SUCCESS)
}

fn write_file(path: &Path, content: &[u8], secret: bool) -> anyhow::Result<()> {
    let dir = path.parent().expect("under the output directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(content)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
