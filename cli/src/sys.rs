//! Running local programs (argument lists, never shell strings) with errors that name the
//! command and keep the end of its stderr.

use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("could not run `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

/// The last lines of a command's error output, for messages.
pub fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn describe(argv: &[&str]) -> String {
    crate::quote::join(argv)
}

/// Runs `argv`, returning its stdout; a non-zero exit is an error with its stderr.
pub fn run(argv: &[&str]) -> Result<String, SysError> {
    let o = output(argv)?;
    if !o.status.success() {
        return Err(SysError::Failed {
            command: describe(argv),
            status: o.status.to_string(),
            stderr: tail(&o.stderr, 5),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs `argv` and reports only whether it succeeded.
pub fn succeeds(argv: &[&str]) -> bool {
    output(argv).is_ok_and(|o| o.status.success())
}

pub fn output(argv: &[&str]) -> Result<Output, SysError> {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SysError::Spawn {
            program: argv[0].to_string(),
            source,
        })
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .is_some_and(|euid| euid == "0")
    })
}
