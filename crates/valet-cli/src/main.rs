//! The `valet` binary: parse flags, run the command, print errors once.

mod cli;
mod cmd;

fn main() -> std::process::ExitCode {
    cli::main()
}
