//! `valet user create`.

use std::process::ExitCode;

use clap::Subcommand;
use valet_store::{Store, Tier};

#[derive(Subcommand)]
pub enum Command {
    /// Create a user.
    Create {
        name: String,
        #[arg(long)]
        email: String,
        /// `free` (may only email itself) or `pro`.
        #[arg(long, default_value = "free")]
        tier: Tier,
        /// Read a password for the web pages from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password for the web pages (read from standard input).
    Password { name: String },
}

pub fn run(store: Store, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create {
            name,
            email,
            tier,
            password_stdin,
        } => {
            let hash = if password_stdin {
                Some(read_password()?)
            } else {
                None
            };
            let user = store.create_user(&name, &email, hash.as_deref())?;
            if tier != Tier::Free {
                store.set_tier(&user.id, tier)?;
            }
            eprintln!("created user {} ({})", user.username, user.id);
            println!("{}", user.id);
        }
        Command::Password { name } => {
            let user = store.require_user(&name)?;
            store.set_password_hash(&user.id, &read_password()?)?;
            eprintln!("password set for {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line from standard input, hashed with Argon2id.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    valet_core::password::hash(password).map_err(anyhow::Error::msg)
}
