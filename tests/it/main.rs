//! Integration tests: the real server on a loopback port, spoken to over HTTP,
//! and the real `loopd` binary for the command line.

mod auth;
mod bot;
mod capture;
mod claude;
mod claude_cli;
mod cli;
mod contract;
mod docs;
mod echo;
mod lifecycle;
mod limits;
mod loops;
mod mock_anthropic;
mod pg;
mod sandbox;
mod support;
mod tokens;
mod web;
