//! valet's API without a socket and without Deno: `valet_api::app` (and the
//! channel app a run reaches) driven with `tower::ServiceExt::oneshot` over
//! a real SQLite store in a temp dir, plus a few tests over a real socket
//! (`valet_api::serve`). One test binary, modules by topic; what needs runs
//! is in `tests/e2e`.

// Helpers outside #[test] functions panic on purpose: a broken fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Test setup acts as the operator: it makes users, tokens and vals directly.
#![allow(clippy::disallowed_methods)]

mod blob;
mod email;
mod errors;
mod isolation;
mod run_keys;
mod scopes;
mod socket;
mod sqlite;
mod support;
mod tokens;
mod wire;
