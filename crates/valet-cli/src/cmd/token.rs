//! `valet token create|list|scopes|revoke`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use valet_core::{Granted, ScopeSet, TokenScopes};
use valet_store::{Store, time};

#[derive(Subcommand)]
pub enum Command {
    /// Create an API token; prints the token alone on stdout.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: String,
        /// Space- or comma-separated, e.g. "blob:read sqlite:read".
        /// Default: every scope but val:write and user:write.
        #[arg(long, conflicts_with = "legacy")]
        scopes: Option<String>,
        /// Lifetime, e.g. 30d or 12h. Default: no expiry.
        #[arg(long)]
        expires: Option<String>,
        /// Make a token the way tokens were made before scopes existed (no
        /// scope list: everything), for imports from older installations.
        #[arg(long)]
        legacy: bool,
    },
    /// List a user's tokens in creation order.
    List {
        #[arg(long)]
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// Replace a token's scopes.
    Scopes {
        id: String,
        #[arg(long)]
        set: String,
    },
    /// Revoke a token reported as leaked, and email its owner (what GitHub
    /// secret scanning does, for reports that reach operators directly).
    RevokeLeaked {
        #[arg(long)]
        token: String,
        /// Where it leaked.
        #[arg(long, default_value = "")]
        url: String,
        /// The URL people reach this server at, for the email's link.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        public_url: String,
        /// The address valet sends email from (as `valet serve --email-from`).
        #[arg(long, env = "VALET_EMAIL_FROM", default_value = valet_store::DEFAULT_EMAIL_FROM)]
        email_from: String,
    },
    /// Revoke a token.
    Revoke {
        id: String,
        #[arg(long)]
        user: String,
    },
}

pub fn run(store: Store, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create {
            user,
            name,
            scopes,
            expires,
            legacy,
        } => {
            // Validate every flag before anything is written.
            let scopes = if legacy {
                TokenScopes::Legacy
            } else {
                // The maker here is the user, who holds every scope, so any
                // valid set is within the maker's scopes.
                TokenScopes::Scoped(super::parse_scopes(scopes.as_deref())?)
            };
            let expires_at = match expires {
                Some(text) => {
                    Some(time::now_ms() + super::parse_duration(&text)?.as_millis() as i64)
                }
                None => None,
            };
            let user = store.require_user(&user)?;
            // The operator acts for the user: no request, no scope check.
            let (record, token) =
                store.create_token(&Granted::for_operator(&user.id), &name, scopes, expires_at)?;
            eprintln!(
                "created token {} ({}) with scopes: {}",
                record.name,
                record.id,
                describe(record.scopes)
            );
            eprintln!("this is the only time the token is shown; store it now");
            println!("{}", token.expose());
        }
        Command::List { user, json } => {
            let user = store.require_user(&user)?;
            let tokens = store.list_tokens(&Granted::for_operator(&user.id))?;
            if json {
                let list: Vec<_> = tokens.iter().map(valet_api::token_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for t in &tokens {
                    let status = match (t.revoked_reason.as_deref(), t.is_expired(time::now_ms())) {
                        (Some(reason), _) => format!("revoked ({reason})"),
                        (None, true) => "expired".to_owned(),
                        (None, false) => "active".to_owned(),
                    };
                    println!(
                        "{}  {:<20} …{}  {:<10} {}",
                        t.id,
                        t.name,
                        t.hint,
                        status,
                        describe(t.scopes)
                    );
                }
            }
        }
        Command::Scopes { id, set } => {
            let scopes = ScopeSet::parse(&set)?;
            let token = store.token_by_id(&id).context("no such token")?;
            let token =
                store.set_token_scopes(&Granted::for_operator(&token.user_id), &id, scopes)?;
            eprintln!(
                "token {} now has scopes: {}",
                token.id,
                describe(token.scopes)
            );
        }
        Command::RevokeLeaked {
            token,
            url,
            public_url,
            email_from,
        } => {
            use valet_store::{LeakOutcome, report_leak};
            valet_store::validate_email(&email_from)?;
            match report_leak(&store, &token, &url, &email_from, &public_url)? {
                LeakOutcome::Revoked => eprintln!("revoked the token and emailed its owner"),
                LeakOutcome::AlreadyRevoked => {
                    eprintln!("the token was already revoked; nothing to do")
                }
                LeakOutcome::NotOurs => {
                    eprintln!("not a valet token of this installation; nothing revoked");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Revoke { id, user } => {
            let user = store.require_user(&user)?;
            let token =
                store.revoke_token(&Granted::for_operator(&user.id), &id, "by its owner")?;
            eprintln!("revoked token {} ({})", token.name, token.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(scopes: TokenScopes) -> String {
    match scopes {
        TokenScopes::Legacy => "legacy (every scope)".to_owned(),
        TokenScopes::Scoped(set) if set.is_empty() => "none".to_owned(),
        TokenScopes::Scoped(set) => set.to_claim(),
    }
}
