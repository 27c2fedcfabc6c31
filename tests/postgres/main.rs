//! The integration suite again (the very files of `tests/it`), with every
//! test server keeping its state in Postgres instead of the data
//! directory: one suite, run on both backends by `cargo test`.

/// Every `TestApp` of this run lives on the throwaway Postgres server.
pub const ON_POSTGRES: bool = true;

#[path = "../it/audit.rs"]
mod audit;
#[path = "../it/auth.rs"]
mod auth;
#[path = "../it/bot.rs"]
mod bot;
#[path = "../it/capture.rs"]
mod capture;
#[path = "../it/claude.rs"]
mod claude;
#[path = "../it/claude_cli.rs"]
mod claude_cli;
#[path = "../it/cli.rs"]
mod cli;
#[path = "../it/clients.rs"]
mod clients;
#[path = "../it/cluster.rs"]
mod cluster;
#[path = "../it/contract.rs"]
mod contract;
#[path = "../it/docs.rs"]
mod docs;
#[path = "../it/echo.rs"]
mod echo;
#[path = "../it/files.rs"]
mod files;
#[path = "../it/lifecycle.rs"]
mod lifecycle;
#[path = "../it/limits.rs"]
mod limits;
#[path = "../it/loops.rs"]
mod loops;
#[path = "../it/metrics.rs"]
mod metrics;
#[path = "../it/mock_anthropic.rs"]
mod mock_anthropic;
#[path = "../it/open_choices.rs"]
mod open_choices;
#[path = "../it/pg.rs"]
mod pg;
#[path = "../it/rules.rs"]
mod rules;
#[path = "../it/sandbox.rs"]
mod sandbox;
#[path = "../it/scopes.rs"]
mod scopes;
#[path = "../it/support.rs"]
mod support;
#[path = "../it/tokens.rs"]
mod tokens;
#[path = "../it/tools.rs"]
mod tools;
#[path = "../it/web.rs"]
mod web;
#[path = "../it/webhooks.rs"]
mod webhooks;
