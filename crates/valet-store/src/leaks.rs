//! Leaked API tokens: revoke, record the event, and email the owner once.
//! Used by GitHub's secret-scanning endpoint and by
//! `valet token revoke-leaked`.

use valet_core::ApiToken;

use crate::{EmailMessage, Store, StoreError};

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

/// Revokes a leaked token, records the event and emails the owner once.
/// Used by the GitHub endpoint and by `valet token revoke-leaked`.
pub fn report_leak(
    store: &Store,
    token_text: &str,
    url: &str,
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
        let message = EmailMessage {
            from: "\"valet security\" <security@valet.localhost>".into(),
            to: vec![owner.email.clone()],
            cc: Vec::new(),
            bcc: Vec::new(),
            reply_to: Vec::new(),
            subject: format!(
                "Your valet API token \"{}\" was leaked and has been revoked",
                record.name
            ),
            text: Some(format!(
                "Hello {},\n\n\
                 Your valet API token \"{}\" (ending in …{}) was found in public at:\n\n  {place}\n\n\
                 We revoked it at once, so it no longer works. Anything that used it will get\n\
                 401 token_revoked until you give it a new token.\n\n\
                 Make a new token with only the scopes it needs on {public_url}/settings/tokens,\n\
                 or with `valet token create --user {} --name NAME --scopes \"...\"`, and keep it\n\
                 out of source code (use an environment variable or a secret store).\n",
                owner.username, record.name, record.hint, owner.username
            )),
            html: None,
            headers: Default::default(),
            attachments: Vec::new(),
        };
        store.enqueue_email(&owner.id, &message)?;
    }
    Ok(LeakOutcome::Revoked)
}
