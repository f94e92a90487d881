//! Progress of a run: one indicatif spinner per host on a terminal, plain `host | message`
//! lines otherwise (CI logs). Shared by the per-host tasks.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Ui {
    bars: Option<(MultiProgress, BTreeMap<String, ProgressBar>)>,
    width: usize,
    silent: bool,
}

impl Ui {
    /// Shows nothing (benchmarks, `--quiet`).
    pub fn silent() -> Ui {
        Ui {
            bars: None,
            width: 0,
            silent: true,
        }
    }

    pub fn new(hosts: &[&str]) -> Ui {
        let width = hosts.iter().map(|h| h.len()).max().unwrap_or(4);
        if !std::io::stderr().is_terminal() {
            return Ui {
                bars: None,
                width,
                silent: false,
            };
        }
        let m = MultiProgress::new();
        let style =
            ProgressStyle::with_template("{spinner} {prefix:.bold} {elapsed:>4} {wide_msg}")
                .expect("valid template");
        let bars = hosts
            .iter()
            .map(|h| {
                let b = m.add(
                    ProgressBar::new_spinner()
                        .with_style(style.clone())
                        .with_prefix(format!("{h:<width$}")),
                );
                b.enable_steady_tick(Duration::from_millis(120));
                (h.to_string(), b)
            })
            .collect();
        Ui {
            bars: Some((m, bars)),
            width,
            silent: false,
        }
    }

    pub fn msg(&self, host: &str, msg: &str) {
        if self.silent {
            return;
        }
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.get(host) {
                    b.set_message(msg.to_string());
                }
            }
            None => eprintln!("{host:<w$} | {msg}", w = self.width),
        }
    }

    pub fn done(&self, host: &str, msg: &str) {
        if self.silent {
            return;
        }
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.get(host) {
                    b.finish_with_message(msg.to_string());
                }
            }
            None => eprintln!("{host:<w$} | {msg}", w = self.width),
        }
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        if self.silent {
            return;
        }
        match &self.bars {
            Some((m, _)) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

/// Writes a command's output to stdout; a reader that went away early (`| head`) ends it
/// quietly instead of the panic `print!` gives.
pub fn stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
