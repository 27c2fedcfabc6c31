//! The runtime's one error type: what a loop operation can refuse, in the
//! runtime's terms. `http` turns it into the contract's error envelope.

use std::time::Duration;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The request does not fit what it asks of (400), with its code.
    #[error("{1}")]
    Invalid(&'static str, String),
    #[error("{1}")]
    NotFound(&'static str, String),
    #[error("{1}")]
    Conflict(&'static str, String),
    /// A bound is reached: try again after the wait (429).
    #[error("{1}")]
    Full(&'static str, String, Duration),
    /// The server is shutting down and takes no new work (503).
    #[error("the server is shutting down")]
    Stopping,
    /// On a shared database: the loop runs on another node (its URL); the
    /// request is carried out there.
    #[error("the loop runs on {0}")]
    Elsewhere(String),
    /// On a shared database: the loop moved between nodes while the request
    /// was carried out (this node let its lease go); send it again (503).
    #[error("this loop moved to another node while the request was carried out; send it again")]
    Moving,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something that should not happen (a loop's task vanished).
    #[error("{0}")]
    Internal(String),
}

impl RuntimeError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid(code, message.into())
    }

    /// The code the contract gives this error, when it has one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Invalid(c, _) | Self::NotFound(c, _) | Self::Conflict(c, _) => Some(c),
            Self::Full(c, ..) => Some(c),
            Self::Stopping => Some("server_stopping"),
            Self::Moving => Some("loop_moving"),
            Self::Elsewhere(_) | Self::Store(_) | Self::Internal(_) => None,
        }
    }
}
