//! `AppState`: the few cheap handles every handler shares.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::Runtime;
use crate::store::{Accounts, Catalog, DataDir, LoopStore, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub loops: Arc<LoopStore>,
    pub catalog: Arc<Catalog>,
    pub runtime: Arc<Runtime>,
    /// Throttles, pools and caps on what callers may pile up.
    pub guards: Arc<crate::http::limits::Guards>,
    /// Cancelled once agents have stopped; SSE streams end on it.
    pub streams: CancellationToken,
    pub started_at: Instant,
}

impl AppState {
    /// Opens every store of the data directory and every loop's event log;
    /// a file that cannot be parsed is an error naming it.
    pub fn open(config: Config, dir: &DataDir) -> Result<Self, StoreError> {
        let config = Arc::new(config);
        let loops = Arc::new(LoopStore::open(dir.loops())?);
        let catalog = Arc::new(Catalog::new(dir.root()));
        let runtime = Runtime::open(config.clone(), loops.clone(), catalog.clone())?;
        Ok(Self {
            guards: Arc::new(crate::http::limits::Guards::new(&config.limits)),
            accounts: Arc::new(Accounts::open(dir)?),
            loops,
            catalog,
            runtime: Arc::new(runtime),
            config,
            streams: CancellationToken::new(),
            started_at: Instant::now(),
        })
    }
}
