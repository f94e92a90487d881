use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sagectl::command::Cli::parse();
    match sagectl::command::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
