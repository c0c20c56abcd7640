//! Leaked API tokens: revoke, record the event, and email the owner once.
//! Used by GitHub's secret-scanning endpoint and by
//! `valet token revoke-leaked`.

use valet_core::{ApiToken, Granted};

use crate::{Store, StoreError, system_message};

/// What happened to one reported token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakOutcome {
    /// Not a valet token, or not one of ours.
    NotOurs,
    /// Ours, and revoked by this report (its owner was emailed).
    Revoked,
    /// Ours, and already revoked before.
    AlreadyRevoked,
}

/// Revokes a leaked token, records the event and emails the owner once,
/// from `sender` (the configured address valet sends mail from). Used by
/// the GitHub endpoint and by `valet token revoke-leaked`.
pub fn report_leak(
    store: &Store,
    token_text: &str,
    url: &str,
    sender: &str,
    public_url: &str,
) -> Result<LeakOutcome, StoreError> {
    // The format and checksum rule out noise without touching the database.
    let Ok(token) = ApiToken::parse(token_text) else {
        return Ok(LeakOutcome::NotOurs);
    };
    let Some((record, revoked_now)) = store.revoke_leaked(&token.hash(), url)? else {
        return Ok(LeakOutcome::NotOurs);
    };
    if !revoked_now {
        return Ok(LeakOutcome::AlreadyRevoked);
    }
    store.record_token_event(&record.id, "leaked", &format!("reported at {url}; revoked"))?;
    tracing::warn!(token_id = record.id, "revoked a token reported as leaked");
    if let Some(owner) = store.user_by_id(&record.user_id)? {
        let place = if url.is_empty() {
            "a public place GitHub found".to_owned()
        } else {
            url.to_owned()
        };
        let message = system_message(
            "valet security",
            sender,
            &owner.email,
            format!(
                "Your valet API token \"{}\" was leaked and has been revoked",
                record.name
            ),
            format!(
                "Hello {},\n\n\
                 Your valet API token \"{}\" (ending in …{}) was found in public at:\n\n  {place}\n\n\
                 We revoked it at once, so it no longer works. Anything that used it will get\n\
                 401 token_revoked until you give it a new token.\n\n\
                 Make a new token with only the scopes it needs on {public_url}/settings/tokens,\n\
                 or with `valet token create --user {} --name NAME --scopes \"...\"`, and keep it\n\
                 out of source code (use an environment variable or a secret store).\n",
                owner.username, record.name, record.hint, owner.username
            ),
        );
        // The token is revoked whatever happens to the mail.
        match message {
            // Mail for the owner about their own token: valet acts, not a caller.
            Ok(message) => {
                store.enqueue_system_email(&Granted::for_operator(&owner.id), &message)?;
            }
            Err(e) => tracing::error!(error = %e, "could not write the leak report email"),
        }
    }
    Ok(LeakOutcome::Revoked)
}
