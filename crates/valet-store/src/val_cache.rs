//! Vals looked up by their owner's name and their own, cached in memory,
//! so that a request to a hot http val costs a hash lookup instead of a
//! blocking-pool hop and two SQLite reads.
//!
//! The rules are the token cache's: every commit through this process's
//! writer that changed a val or a user empties the cache (SQLite's update
//! hook marks it, [`ValCache::settle`] empties it once the commit is
//! visible), so a val whose code was just saved never answers with its old
//! code; a change made by another process on the same data dir is seen
//! within [`TTL`]; a record read while the cache was emptied is not kept.
//! On PostgreSQL (a cluster, where other nodes change vals) nothing is
//! cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Val;

/// How long a cached val is trusted without a look at the database.
pub const TTL: Duration = Duration::from_secs(1);
/// Entries kept at most; the cache empties when full.
const CAPACITY: usize = 10_000;

pub(crate) struct ValCache {
    enabled: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<(String, String), (Val, Instant)>,
    generation: u64,
    /// A change is being committed: empty again once it is.
    pending: bool,
}

impl State {
    fn clear(&mut self) {
        self.entries.clear();
        self.generation += 1;
    }
}

impl ValCache {
    pub(crate) fn new(enabled: bool) -> ValCache {
        ValCache {
            enabled,
            state: Mutex::default(),
        }
    }

    pub(crate) fn get(&self, username: &str, name: &str) -> Option<Val> {
        if !self.enabled {
            return None;
        }
        let state = self.state.lock().ok()?;
        let key = (username.to_owned(), name.to_owned());
        let (val, at) = state.entries.get(&key)?;
        (at.elapsed() < TTL).then(|| val.clone())
    }

    /// The generation a read starts in; [`ValCache::put`] keeps its result
    /// only if the cache was not emptied since.
    pub(crate) fn generation(&self) -> u64 {
        self.state.lock().map(|s| s.generation).unwrap_or(u64::MAX)
    }

    pub(crate) fn put(&self, username: &str, val: &Val, read_from: u64) {
        if !self.enabled {
            return;
        }
        if let Ok(mut state) = self.state.lock() {
            if state.generation != read_from || state.pending {
                return;
            }
            if state.entries.len() >= CAPACITY {
                state.entries.clear();
            }
            let key = (username.to_owned(), val.name.clone());
            state.entries.insert(key, (val.clone(), Instant::now()));
        }
    }

    /// From SQLite's update hook: a val or user row is changing.
    pub(crate) fn changing(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.clear();
            state.pending = true;
        }
    }

    /// After a write's commit (or rollback): empties the cache once more if
    /// the write changed a val or a user, so that no read that started
    /// before the commit can have refilled it with the old row.
    pub(crate) fn settle(&self) {
        if let Ok(mut state) = self.state.lock()
            && state.pending
        {
            state.clear();
            state.pending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use valet_core::grant::ValWrite;
    use valet_core::{Granted, GrantedSet, ScopeSet};

    use crate::{NewVal, Store, ValKind, ValPatch};

    #[test]
    fn a_saved_change_empties_the_cache_and_a_racing_read_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let ada = store
            .create_user("ada", "ada@example.com", None)
            .expect("user");
        let write = Granted::<ValWrite>::for_operator(&ada.id);
        let cover = GrantedSet::for_operator(&ada.id, ScopeSet::all());
        let val = store
            .create_val(
                &write,
                &cover,
                NewVal {
                    name: "hello".into(),
                    kind: ValKind::Http,
                    code: "export default () => new Response('1')".into(),
                    scopes: ScopeSet::EMPTY,
                    env: BTreeMap::new(),
                    timeout_ms: 1000,
                    schedule: None,
                },
            )
            .expect("val");
        let found = store
            .val_by_names("ada", "hello")
            .expect("read")
            .expect("found");
        assert_eq!(found.code, val.code);
        let cache = store.val_cache();
        assert!(cache.get("ada", "hello").is_some(), "cached");

        // A read that began before a change is not kept after it.
        let generation = cache.generation();
        let patch = ValPatch {
            code: Some("export default () => new Response('2')".into()),
            ..Default::default()
        };
        store
            .update_val(&write, &cover, &val.id, patch)
            .expect("update");
        assert!(cache.get("ada", "hello").is_none(), "emptied by the change");
        cache.put("ada", &found, generation);
        assert!(
            cache.get("ada", "hello").is_none(),
            "a racing read was kept"
        );

        let now = store
            .val_by_names("ada", "hello")
            .expect("read")
            .expect("found");
        assert!(now.code.contains("'2'"), "{}", now.code);
        assert!(store.val_by_names("ada", "nope").expect("read").is_none());
        assert!(store.val_by_names("bob", "hello").expect("read").is_none());
    }
}
