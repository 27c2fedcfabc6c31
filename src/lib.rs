//! loopd: an HTTP+SSE server for long-lived AI agent conversations ("loops").
//!
//! The binary is a thin shell over this library: [`run`] serves [`router`]
//! on a listener until a cancellation token fires, so tests start the real
//! server on a loopback port.

pub mod agent;
pub mod budget;
pub mod cli;
pub mod config;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod state;
pub mod store;

pub use config::Config;
pub use http::router;
pub use server::run;
pub use state::AppState;
