//! Integration tests: the real server on a loopback port, spoken to over HTTP,
//! and the real `loopd` binary for the command line. `tests/postgres` runs
//! these same files with every server on Postgres.

/// Test servers keep their state in the data directory's files (unless
/// `LOOPD_TEST_BACKEND=postgres`).
pub const ON_POSTGRES: bool = false;

mod audit;
mod auth;
// On Postgres whatever the target: run once, here.
mod balancer;
mod bot;
mod capture;
mod claude;
mod claude_cli;
mod cli;
mod clients;
mod cluster;
mod contract;
mod docs;
mod echo;
mod files;
mod lifecycle;
mod limits;
mod loops;
mod metrics;
mod mock_anthropic;
mod open_choices;
mod pg;
mod rules;
mod sandbox;
mod scopes;
mod support;
mod tokens;
mod tools;
mod web;
mod webhooks;
