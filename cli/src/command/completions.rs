//! `sagectl completions SHELL`: the shell's completion script for sagectl (clap_complete),
//! on stdout.

use std::process::ExitCode;

use clap::CommandFactory;

#[derive(clap::Args)]
pub struct Opts {
    /// bash (`sagectl completions bash > /etc/bash_completion.d/sagectl`), zsh (into a
    /// directory of `$fpath` as `_sagectl`), fish (`~/.config/fish/completions/sagectl.fish`),
    /// elvish or powershell.
    pub shell: clap_complete::Shell,
}

pub fn run(o: Opts) -> anyhow::Result<ExitCode> {
    crate::ui::stdout(&script(o.shell))?;
    Ok(ExitCode::SUCCESS)
}

/// The completion script for `shell`.
pub fn script(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut super::Cli::command(), "sagectl", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use clap_complete::Shell;

    /// Every subcommand (and those of `lab` and `inventory`) is in every script.
    #[test]
    fn scripts_name_every_subcommand() {
        let cli = super::super::Cli::command();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = super::script(shell);
            for sub in cli.get_subcommands() {
                assert!(s.contains(sub.get_name()), "{shell}: {}", sub.get_name());
                for subsub in sub.get_subcommands() {
                    assert!(
                        s.contains(subsub.get_name()),
                        "{shell}: {}",
                        subsub.get_name()
                    );
                }
            }
            assert!(s.contains("lock-timeout"), "{shell}");
        }
    }
}
