//! Fuzz targets: each takes arbitrary bytes, feeds them to one of valet's
//! parsers or checks, and panics when a property breaks (not merely on
//! bad input, which every target expects). The same functions run three
//! ways: replayed from `fuzz/corpus` and `fuzz/regressions` plus a bounded
//! mutation run in `cargo test` (`tests/smoke.rs`), and coverage-guided
//! under AFL++ (`just fuzz`, `src/bin/afl-target.rs`).

// A fuzz target reports a broken property by panicking; that is its job.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod targets;

pub use targets::*;

/// A target: a name (its corpus directory) and the function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name of its corpus directory under `fuzz/corpus`.
pub const TARGETS: &[Target] = &[
    ("api_token", api_token),
    ("scope", scope),
    ("run_token", run_token),
    ("blob_key", blob_key),
    ("sql", sql),
    ("email", email),
    ("cron", cron),
    ("fixture", fixture),
    ("github", github),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
