//! The runs that are running right now, keyed by their valet key.
//!
//! A run key is accepted only while its run is in this set and only through
//! its run's own channel (the Unix socket the supervisor serves the API on
//! for that run's process). The supervisor inserts the run before its
//! process gets the key and removes it the moment the run ends, however it
//! ends, so the key dies with the run even though its `exp` lies in the
//! future; a copy of the key used from anywhere else is refused even while
//! the run lives (sender-constrained, in the spirit of RFC 8705/9449).
//!
//! Keys are looked up by their SHA-256: the supervisor minted them, so a
//! hit is as good as a signature check, and the key is verified once per
//! run instead of once per API call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use crate::ScopeSet;

/// Names the channel a request arrived through: one per run process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelId(String);

impl ChannelId {
    pub fn new(id: impl Into<String>) -> ChannelId {
        ChannelId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the API needs to know about a live run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRun {
    pub run_id: String,
    pub user_id: String,
    pub val_id: Option<String>,
    pub scopes: ScopeSet,
    pub channel: ChannelId,
}

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// Why a presented run key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveRunRefusal {
    /// No live run has this key: it ended, or the key is not one of ours.
    NotLive,
    /// The run is live, but the key came through another channel (or from
    /// outside every run).
    WrongChannel,
}

/// Shared between the supervisor (writer) and the API's auth (reader).
#[derive(Clone, Default, Debug)]
pub struct LiveRuns {
    /// A std `RwLock`, not tokio's: it is held for a hash lookup only, never
    /// across an `.await`, and readers (every API call of every run) far
    /// outnumber writers (run start and end).
    runs: Arc<RwLock<HashMap<KeyDigest, LiveRun>>>,
}

impl LiveRuns {
    pub fn new() -> LiveRuns {
        LiveRuns::default()
    }

    /// The live run that `key` belongs to, if it arrived through that run's
    /// own channel.
    pub fn authenticate(
        &self,
        key: &str,
        channel: Option<&ChannelId>,
    ) -> Result<LiveRun, LiveRunRefusal> {
        // A poisoned lock means a writer panicked mid-update; refusing
        // every run key is the safe answer.
        let runs = self.runs.read().map_err(|_| LiveRunRefusal::NotLive)?;
        let run = runs.get(&digest(key)).ok_or(LiveRunRefusal::NotLive)?;
        if channel != Some(&run.channel) {
            return Err(LiveRunRefusal::WrongChannel);
        }
        Ok(run.clone())
    }

    pub fn is_live(&self, run_id: &str) -> bool {
        self.runs
            .read()
            .map(|runs| runs.values().any(|r| r.run_id == run_id))
            .unwrap_or(false)
    }

    /// Marks a run live under `key` and returns a guard that ends it when
    /// dropped, so no path out of the supervisor (error, panic, cancel) can
    /// leave a key alive.
    pub fn begin(&self, key: &str, run: LiveRun) -> LiveRunGuard {
        let digest = digest(key);
        if let Ok(mut runs) = self.runs.write() {
            runs.insert(digest, run);
        }
        LiveRunGuard {
            runs: self.clone(),
            digest,
        }
    }

    pub fn len(&self) -> usize {
        self.runs.read().map(|r| r.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes its run from [`LiveRuns`] when dropped.
#[derive(Debug)]
pub struct LiveRunGuard {
    runs: LiveRuns,
    digest: KeyDigest,
}

impl Drop for LiveRunGuard {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.runs.runs.write() {
            runs.remove(&self.digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, channel: &str) -> LiveRun {
        LiveRun {
            run_id: id.into(),
            user_id: "u".into(),
            val_id: None,
            scopes: ScopeSet::default_val(),
            channel: ChannelId::new(channel),
        }
    }

    #[test]
    fn guard_ends_the_run() {
        let live = LiveRuns::new();
        let chan = ChannelId::new("c1");
        {
            let _guard = live.begin("key-1", run("r1", "c1"));
            assert!(live.is_live("r1"));
            assert_eq!(
                live.authenticate("key-1", Some(&chan)).map(|r| r.run_id),
                Ok("r1".to_owned())
            );
            assert!(!live.is_live("r2"));
        }
        assert!(!live.is_live("r1"));
        assert_eq!(
            live.authenticate("key-1", Some(&chan)),
            Err(LiveRunRefusal::NotLive)
        );
        assert!(live.is_empty());
    }

    #[test]
    fn a_key_works_only_through_its_own_channel() {
        let live = LiveRuns::new();
        let _guard = live.begin("key-1", run("r1", "c1"));
        let other = ChannelId::new("c2");
        assert_eq!(
            live.authenticate("key-1", Some(&other)),
            Err(LiveRunRefusal::WrongChannel)
        );
        assert_eq!(
            live.authenticate("key-1", None),
            Err(LiveRunRefusal::WrongChannel)
        );
        assert_eq!(
            live.authenticate("key-2", Some(&ChannelId::new("c1"))),
            Err(LiveRunRefusal::NotLive)
        );
    }
}
