//! `sagectl man [--out DIR]`: the manual page (clap_mangen): sagectl's own on stdout, or one
//! page per command and subcommand written into a directory (`sagectl.1`, `sagectl-up.1`,
//! `sagectl-lab-up.1`, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

#[derive(clap::Args)]
pub struct Opts {
    /// Write a page for sagectl and each of its subcommands into this directory (e.g.
    /// /usr/local/share/man/man1) instead of printing sagectl's page.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    let cmd = super::Cli::command();
    match o.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing the pages into {}", dir.display()))?;
            println!("wrote the manual pages into {}", dir.display());
        }
        None => crate::ui::stdout(&page())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// sagectl's page (roff), naming every subcommand.
pub fn page() -> String {
    let mut out = Vec::new();
    clap_mangen::Man::new(super::Cli::command())
        .render(&mut out)
        .expect("writing to memory");
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_page_names_every_subcommand() {
        let page = super::page();
        assert!(page.contains(".TH sagectl 1"), "{page}");
        // roff writes a hyphen as `\-`.
        let text = page.replace("\\-", "-");
        for sub in super::super::Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(text.contains(&format!("sagectl-{name}(1)")), "{name}");
        }
    }

    #[test]
    fn out_writes_a_page_per_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        super::run(super::Opts {
            out: Some(dir.path().to_path_buf()),
        })
        .unwrap();
        for page in [
            "sagectl.1",
            "sagectl-up.1",
            "sagectl-lab-up.1",
            "sagectl-inventory-show.1",
        ] {
            let t = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(t.contains(".TH"), "{page}");
        }
        let up = std::fs::read_to_string(dir.path().join("sagectl-up.1")).unwrap();
        assert!(up.contains("lock\\-timeout"), "{up}");
    }
}
