//! The `dist` command line: group layouts, pipeline splits, and (as the backends land) the
//! launcher, the store server and the benchmarks.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming the bad argument.
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    cli::init_logging();
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
