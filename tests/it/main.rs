//! Integration tests: the real server on a loopback port, spoken to over HTTP,
//! and the real `loopd` binary for the command line.

mod auth;
mod cli;
mod docs;
mod echo;
mod lifecycle;
mod loops;
mod support;
mod tokens;
