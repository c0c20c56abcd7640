//! The set of runs that are running right now.
//!
//! A run token is accepted only while its run is in this set: the supervisor
//! inserts the run before it spawns the process and removes it the moment
//! the run ends, however it ends, so the token dies with the run even though
//! its `exp` lies in the future.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// Shared between the supervisor (writer) and the API's auth (reader).
#[derive(Clone, Default, Debug)]
pub struct LiveRuns {
    /// A std `RwLock`, not tokio's: it is held for a hash lookup only, never
    /// across an `.await`, and readers (every API call of every run) far
    /// outnumber writers (run start and end).
    runs: Arc<RwLock<HashSet<String>>>,
}

impl LiveRuns {
    pub fn new() -> LiveRuns {
        LiveRuns::default()
    }

    pub fn is_live(&self, run_id: &str) -> bool {
        match self.runs.read() {
            Ok(runs) => runs.contains(run_id),
            // A poisoned lock means a writer panicked mid-update; refusing
            // every run token is the safe answer.
            Err(_) => false,
        }
    }

    /// Marks a run live and returns a guard that ends it when dropped, so
    /// no path out of the supervisor (error, panic, cancel) can leave a
    /// token alive.
    pub fn begin(&self, run_id: &str) -> LiveRunGuard {
        if let Ok(mut runs) = self.runs.write() {
            runs.insert(run_id.to_owned());
        }
        LiveRunGuard {
            runs: self.clone(),
            run_id: run_id.to_owned(),
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
    run_id: String,
}

impl Drop for LiveRunGuard {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.runs.runs.write() {
            runs.remove(&self.run_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_ends_the_run() {
        let live = LiveRuns::new();
        {
            let _guard = live.begin("r1");
            assert!(live.is_live("r1"));
            assert!(!live.is_live("r2"));
        }
        assert!(!live.is_live("r1"));
        assert!(live.is_empty());
    }
}
