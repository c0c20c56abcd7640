//! `valet keys`: the signing keys of run tokens (list, rotate).

use std::process::ExitCode;

use clap::Subcommand;
use valet_store::{ROTATION_OVERLAP_MS, Store, time};

#[derive(Subcommand)]
pub enum Command {
    /// List the keys that still verify run tokens.
    List,
    /// Make a new signing key. The old one keeps verifying until every
    /// token it signed has expired; a running `valet serve` signs with the
    /// new key within 30 seconds (or at once on SIGHUP).
    Rotate,
}

pub fn run(store: Store, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List => {
            for key in store.signing_keys()? {
                print_key(&key);
            }
        }
        Command::Rotate => {
            let ring = store.rotate_signing_key(ROTATION_OVERLAP_MS)?;
            println!("new signing key {}", ring.current().kid());
            for key in store.signing_keys()? {
                print_key(&key);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_key(key: &valet_store::SigningKeyInfo) {
    match key.retire_at {
        None => println!(
            "{}  current   created {}",
            key.kid,
            time::iso(key.created_at)
        ),
        Some(at) => println!(
            "{}  retiring  created {}, verifies until {}",
            key.kid,
            time::iso(key.created_at),
            time::iso(at)
        ),
    }
}
