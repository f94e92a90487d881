//! `sagectl render INVENTORY --out DIR [--host NAME]`: every host's desired files under
//! `DIR/<host>/`, plus `DIR/<host>/MANIFEST` (mode, owner, group, path). Files holding secrets
//! are written 0600; everything else 0644 locally (the manifest says what the host gets).
//! Nothing is written outside DIR: a path leaving it (`..`) is refused before writing, no
//! symlink inside DIR is followed, and each written file is checked to be under DIR after.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

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
    let mut inv = match super::load(&o.inventory) {
        Ok(inv) => inv,
        Err(code) => return Ok(code),
    };
    // The files `up` would deploy: the SSH port is the one sagectl connects to.
    crate::pipeline::connect::apply_ssh_config(&mut inv);
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
    let catalog = Catalog::embedded()?;
    let state = crate::pki::open(&inv)?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let out = Out {
        root: o.out.clone(),
        real: o
            .out
            .canonicalize()
            .with_context(|| format!("resolving {}", o.out.display()))?,
    };
    let mut count = 0;
    for host in inv
        .hosts
        .iter()
        .filter(|h| o.hosts.is_empty() || o.hosts.contains(&h.name))
    {
        let files = host_files(&inv, catalog, &state, host)?;
        let mut manifest = String::new();
        for f in &files {
            out.write(&host.name, &f.path, &f.content, f.secret)?;
            manifest.push_str(&format!(
                "{:04o} {}:{} {}{}\n",
                f.attrs.mode,
                f.attrs.owner,
                f.attrs.group,
                f.path,
                if f.secret { " (secret)" } else { "" }
            ));
        }
        out.write(&host.name, "/MANIFEST", manifest.as_bytes(), false)?;
        count += files.len();
    }
    println!("rendered {count} files into {}", o.out.display());
    Ok(ExitCode::SUCCESS)
}

/// The output directory, as given and resolved.
struct Out {
    root: PathBuf,
    real: PathBuf,
}

impl Out {
    /// Writes `content` as `host`'s file at the absolute host path `path`, under the output
    /// directory and nowhere else.
    fn write(&self, host: &str, path: &str, content: &[u8], secret: bool) -> anyhow::Result<()> {
        let leaves = || {
            anyhow::anyhow!(
                "refusing to write `{path}` for host {host}: it would leave the output directory"
            )
        };
        // Host names are DNS labels and paths were checked when rendered; checked again here,
        // where a mistake would write outside the directory.
        let rel = Path::new(host).join(path.strip_prefix('/').ok_or_else(leaves)?);
        let parts: Vec<&std::ffi::OsStr> = rel
            .components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(leaves()),
            })
            .collect::<Result<_, _>>()?;
        // The host's directory, then at least a file name.
        let (name, dirs) = match parts.split_last() {
            Some((name, dirs)) if !dirs.is_empty() => (name, dirs),
            _ => return Err(leaves()),
        };
        // Each directory is made or found one level at a time; a symlink (or anything but a
        // directory) on the way is refused, since following it could lead anywhere.
        let mut dir = self.root.clone();
        for d in dirs {
            dir.push(d);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => anyhow::bail!(
                    "refusing to write under {}: it is not a directory (a symlink?)",
                    dir.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?,
                Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            }
        }
        let file = dir.join(name);
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.is_dir() => anyhow::bail!("{} is a directory", file.display()),
            // Replaced, not written through: a symlink there is removed, not followed.
            Ok(_) => std::fs::remove_file(&file)
                .with_context(|| format!("replacing {}", file.display()))?,
            Err(_) => {}
        }
        // create_new (O_EXCL) never follows a symlink, even one made in between.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&file)
            .with_context(|| format!("writing {}", file.display()))?;
        f.write_all(content)
            .with_context(|| format!("writing {}", file.display()))?;
        // And the file as written must resolve to inside the output directory.
        let real = file
            .canonicalize()
            .with_context(|| format!("resolving {}", file.display()))?;
        anyhow::ensure!(
            real.starts_with(&self.real),
            "{} was written outside the output directory {}",
            real.display(),
            self.real.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(dir: &Path) -> Out {
        Out {
            root: dir.to_path_buf(),
            real: dir.canonicalize().unwrap(),
        }
    }

    #[test]
    fn writes_under_the_output_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        let o = out(&dir);
        o.write("db", "/etc/a/b.conf", b"x", false).unwrap();
        assert_eq!(std::fs::read(dir.join("db/etc/a/b.conf")).unwrap(), b"x");
        for bad in ["/../../ESCAPED", "/etc/../../../ESCAPED", "relative", "/"] {
            let e = o.write("db", bad, b"x", false).unwrap_err().to_string();
            assert!(e.contains("would leave the output directory"), "{bad}: {e}");
        }
        assert!(o.write("..", "/x", b"x", false).is_err());
        // A symlink inside the directory is not followed, whether a directory or the file.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("db/etc/link")).unwrap();
        let e = o
            .write("db", "/etc/link/x.conf", b"x", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory (a symlink?)"), "{e}");
        std::os::unix::fs::symlink(elsewhere.join("target"), dir.join("db/etc/a/c.conf")).unwrap();
        o.write("db", "/etc/a/c.conf", b"y", false).unwrap();
        assert!(!elsewhere.join("target").exists());
        assert_eq!(std::fs::read(dir.join("db/etc/a/c.conf")).unwrap(), b"y");
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "nothing beside out/ and elsewhere/: {names:?}"
        );
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
