//! Fair run slots: a run holds a slot of its val (http vals), of its user
//! and of the machine from start to end, so one user's traffic never holds
//! another's runs. Beyond the limits a bounded queue waits a bounded time;
//! when it is full or the wait runs out the run is refused as busy (the
//! API answers 429 or 503 with `Retry-After`), never left to hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits on concurrent runs.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// Runs on this machine at once.
    pub total: usize,
    /// Runs of one user at once.
    pub per_user: usize,
    /// Requests to one http val at once.
    pub per_val: usize,
    /// Runs waiting per user (and per val) beyond its limit.
    pub queue: usize,
    /// How long a queued run waits for a slot.
    pub wait: Duration,
}

impl Default for SlotLimits {
    fn default() -> SlotLimits {
        SlotLimits {
            total: 64,
            per_user: 16,
            per_val: 8,
            queue: 64,
            wait: Duration::from_secs(10),
        }
    }
}

/// Why a run got no slot.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}; retry in {1} s")]
pub struct Busy(pub String, pub u64);

struct Gate {
    semaphore: Arc<Semaphore>,
    waiting: AtomicUsize,
}

pub struct Slots {
    limits: SlotLimits,
    total: Arc<Semaphore>,
    /// A std `Mutex`: held for a map lookup, never across an `.await`.
    users: Mutex<HashMap<String, Arc<Gate>>>,
    vals: Mutex<HashMap<String, Arc<Gate>>>,
}

/// A run's slots; released on drop.
#[derive(Debug)]
pub struct SlotPermit {
    _val: Option<OwnedSemaphorePermit>,
    _user: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Slots {
        Slots {
            limits,
            total: Arc::new(Semaphore::new(limits.total.max(1))),
            users: Mutex::default(),
            vals: Mutex::default(),
        }
    }

    fn gate(map: &Mutex<HashMap<String, Arc<Gate>>>, key: &str, size: usize) -> Arc<Gate> {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Gate {
                    semaphore: Arc::new(Semaphore::new(size.max(1))),
                    waiting: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    async fn enter(&self, gate: &Gate, what: &str) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(permit) = gate.semaphore.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let retry = self.limits.wait.as_secs().max(1);
        if gate.waiting.fetch_add(1, Ordering::SeqCst) >= self.limits.queue {
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy(
                format!("too many runs of this {what} are waiting"),
                retry,
            ));
        }
        let permit =
            tokio::time::timeout(self.limits.wait, gate.semaphore.clone().acquire_owned()).await;
        gate.waiting.fetch_sub(1, Ordering::SeqCst);
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Busy("the supervisor is shutting down".into(), retry)),
            Err(_) => Err(Busy(
                format!("every run slot of this {what} stayed busy"),
                retry,
            )),
        }
    }

    /// Slots for a run of `user_id` (and, for an http request, of `val_id`).
    pub async fn acquire(&self, user_id: &str, val_id: Option<&str>) -> Result<SlotPermit, Busy> {
        let val = match val_id {
            Some(id) => {
                let gate = Self::gate(&self.vals, id, self.limits.per_val);
                Some(self.enter(&gate, "val").await?)
            }
            None => None,
        };
        let gate = Self::gate(&self.users, user_id, self.limits.per_user);
        let user = self.enter(&gate, "user").await?;
        let total = tokio::time::timeout(self.limits.wait, self.total.clone().acquire_owned())
            .await
            .map_err(|_| Busy("every run slot of this machine stayed busy".into(), 1))?
            .map_err(|_| Busy("the supervisor is shutting down".into(), 1))?;
        Ok(SlotPermit {
            _val: val,
            _user: user,
            _total: total,
        })
    }

    /// Waits (up to `limit`) until no run holds a slot.
    pub async fn drain(&self, limit: Duration) {
        if limit.is_zero() {
            // Not even a timer's tick (a millisecond).
            return;
        }
        let all = self.limits.total.max(1) as u32;
        let _ = tokio::time::timeout(limit, self.total.acquire_many(all)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_user_cannot_take_another_users_slots() {
        let slots = Slots::new(SlotLimits {
            total: 4,
            per_user: 2,
            per_val: 2,
            queue: 1,
            wait: Duration::from_millis(50),
        });
        let a1 = slots.acquire("a", Some("v")).await.expect("a1");
        let _a2 = slots.acquire("a", Some("v")).await.expect("a2");
        // a's val is full: a third request queues, then is refused.
        assert!(slots.acquire("a", Some("v")).await.is_err());
        // b still gets in at once.
        let _b = slots.acquire("b", None).await.expect("b");
        drop(a1);
        let _a3 = slots
            .acquire("a", Some("v"))
            .await
            .expect("a3 after a1 ended");
    }
}
