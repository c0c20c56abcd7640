//! `valet user create`.

use std::process::ExitCode;

use clap::Subcommand;
use valet_store::Store;

#[derive(Subcommand)]
pub enum Command {
    /// Create a user.
    Create {
        name: String,
        #[arg(long)]
        email: String,
        /// `free` (may only email itself) or `pro`.
        #[arg(long, default_value = "free")]
        tier: String,
    },
}

pub fn run(store: Store, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create { name, email, tier } => {
            if tier != "free" && tier != "pro" {
                anyhow::bail!("invalid --tier '{tier}': use free or pro");
            }
            let user = store.create_user(&name, &email, None)?;
            if tier != "free" {
                store.set_tier(&user.id, &tier)?;
            }
            eprintln!("created user {} ({})", user.username, user.id);
            println!("{}", user.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
