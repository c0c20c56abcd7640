//! End-to-end tests: a real valet (API, supervisor, stores) on a real
//! socket, real Deno processes, a real SMTP server, and the built `valet`
//! binary. One test binary, modules by topic.

// Helpers outside #[test] functions panic on purpose: a broken fixture is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod chaos;
mod cli;
mod cluster;
mod conformance;
mod hot;
mod keys;
mod migration;
mod pages;
mod protocol;
mod runs;
mod sandbox;
mod secret_scanning;
mod sqlite_homes;
mod support;
mod trust;
