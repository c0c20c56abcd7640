//! End-to-end tests: a real valet (API, supervisor, stores) on a real
//! socket, real Deno processes, a real SMTP server, and the built `valet`
//! binary. One test binary, modules by topic.

mod api;
mod cli;
mod runs;
mod support;
