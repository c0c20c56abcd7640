//! Cron on a cluster: every node looks at the schedules each second, and
//! the first to record a val's due slot queues its run; the others find
//! the slot taken. After downtime a val runs once, not once per missed
//! slot.

use std::time::Duration;

use tokio::sync::watch;
use valet_core::Schedule;
use valet_store::time;

use super::Cluster;

/// Slots looked through to find the latest due one, at most.
const MAX_SLOTS: usize = 100_000;

/// Fires due cron vals, each second, until `shutdown`.
pub(super) async fn run(cluster: Cluster, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = tick(&cluster).await {
            tracing::warn!(error = %e, "cron tick failed");
        }
        // Just past the next whole second, when cron times fall due.
        let wait = 1000 - time::now_ms().rem_euclid(1000) + 20;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn tick(cluster: &Cluster) -> Result<(), valet_store::StoreError> {
    let store = &cluster.shared.store;
    let vals = store.call(|s| s.cron_vals()).await?;
    let now = time::now_ms();
    for val in vals {
        // A stored schedule that no longer parses reads as none (the
        // store warns): such a val waits for a new schedule.
        let Some(schedule) = &val.schedule else {
            continue;
        };
        let since = val
            .last_run_at
            .unwrap_or(val.updated_at.max(val.created_at));
        let Some(slot) = latest_due(schedule, since, now) else {
            continue;
        };
        let (run_id, user_id, val_id) = (
            valet_store::new_id("run"),
            val.user_id.clone(),
            val.id.clone(),
        );
        let fired = store
            .call(move |s| s.fire_cron(&run_id, &user_id, &val_id, slot))
            .await?;
        if fired {
            tracing::info!(val_id = val.id, slot = time::iso(slot), "cron val fired");
        }
    }
    Ok(())
}

/// The latest time of `schedule` after `since` and not after `now`.
fn latest_due(schedule: &Schedule, since: i64, now: i64) -> Option<i64> {
    let mut slot = schedule.next_after(since).filter(|&t| t <= now)?;
    for _ in 0..MAX_SLOTS {
        match schedule.next_after(slot) {
            Some(next) if next <= now => slot = next,
            _ => break,
        }
    }
    Some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_due_slot_skips_missed_ones() {
        let every_second = Schedule::parse("* * * * * *").expect("schedule");
        assert_eq!(latest_due(&every_second, 10_300, 10_900), None);
        assert_eq!(latest_due(&every_second, 10_300, 11_050), Some(11_000));
        assert_eq!(latest_due(&every_second, 10_300, 15_500), Some(15_000));
    }
}
