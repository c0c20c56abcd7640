//! Keeps a running server's key ring in step with the store: a rotation
//! done by another process (`valet keys rotate`) is read back every
//! [`REFRESH_EVERY`], or at once on SIGHUP, and swapped in whole, so new
//! runs are signed with the new key while the old one keeps verifying
//! until it retires.

use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use valet_core::SharedKeyRing;
use valet_store::Store;

/// How often the ring is read back. `ROTATION_OVERLAP_MS` leaves minutes
/// of room above it.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// Reads the ring back until `shutdown` fires.
pub async fn refresh(
    store: Store,
    keys: SharedKeyRing,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; keys are read back on the timer only");
            None
        }
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = hung_up(&mut hangup) => {}
            _ = shutdown.changed() => return,
        }
        match store.call(|s| s.key_ring()).await {
            Ok(ring) => {
                let before = keys.current().current().kid().to_owned();
                if ring.current().kid() != before {
                    tracing::info!(
                        kid = ring.current().kid(),
                        previous = before,
                        "signing run tokens with a new key"
                    );
                }
                keys.replace(ring);
            }
            Err(e) => tracing::warn!(error = %e, "could not read the signing keys back"),
        }
    }
}

async fn hung_up(hangup: &mut Option<tokio::signal::unix::Signal>) {
    match hangup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
