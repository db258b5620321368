//! `meshctl`: see the library docs.

use clap::Parser;

fn main() -> std::process::ExitCode {
    meshctl::cli::run(meshctl::cli::Cli::parse())
}
