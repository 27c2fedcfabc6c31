//! `AppState`: the few cheap handles every handler shares.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{Accounts, Catalog, DataDir, LoopStore, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub loops: Arc<LoopStore>,
    pub catalog: Arc<Catalog>,
    /// Cancelled when the server shuts down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    pub started_at: Instant,
}

impl AppState {
    /// Opens every store of the data directory; a file that cannot be parsed
    /// is an error naming it.
    pub fn open(
        config: Config,
        dir: &DataDir,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            accounts: Arc::new(Accounts::open(dir)?),
            loops: Arc::new(LoopStore::open(dir.loops())?),
            catalog: Arc::new(Catalog::new(dir.root())),
            config: Arc::new(config),
            shutdown,
            started_at: Instant::now(),
        })
    }
}
