//! `AppState`: the few cheap handles every handler shares.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::Runtime;
use crate::runtime::cluster::Cluster;
use crate::store::audit::AuditLog;
use crate::store::rules::RuleStore;
use crate::store::webhooks::WebhookStore;
use crate::store::{Accounts, Backend, Catalog, DataDir, LoopStore, Pg, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub loops: Arc<LoopStore>,
    pub catalog: Arc<Catalog>,
    pub runtime: Arc<Runtime>,
    pub webhooks: Arc<WebhookStore>,
    /// Who did what.
    pub audit: Arc<AuditLog>,
    pub rules: Arc<RuleStore>,
    /// Throttles, pools and caps on what callers may pile up.
    pub guards: Arc<crate::http::limits::Guards>,
    /// Cancelled once agents have stopped; SSE streams end on it.
    pub streams: CancellationToken,
    pub started_at: Instant,
    /// On a shared database: what nodes prove to each other with.
    pub node_secret: Option<String>,
    /// The client that carries requests to the node running a loop.
    pub forwarder: reqwest::Client,
}

impl AppState {
    /// Opens every store (the data directory's files, or the shared
    /// database) and every loop's event log; a file that cannot be parsed
    /// is an error naming it.
    pub async fn open(config: Config, dir: &DataDir) -> Result<Self, StoreError> {
        let config = Arc::new(config);
        let catalog = Arc::new(Catalog::new(dir.root()));
        let (backend, cluster, node_secret) = match &config.cluster {
            None => (Backend::Files, None, None),
            Some(c) => {
                let pg = Pg::connect(&c.database_url).await?;
                let secret = node_secret(&pg).await?;
                let cluster = Cluster::new(pg.clone(), c.advertise_url.clone(), c.lease_ttl);
                cluster.refuse_a_twin().await?;
                (Backend::Postgres(pg), Some(Arc::new(cluster)), Some(secret))
            }
        };
        let backend_pg = match &backend {
            Backend::Postgres(pg) => Some(pg.clone()),
            Backend::Files => None,
        };
        let data_dir = dir.clone();
        let workspace_root = config.workspace_root.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let loops = match &backend {
                Backend::Files => LoopStore::open(data_dir.loops())?,
                Backend::Postgres(pg) => LoopStore::open_pg(data_dir.loops(), pg.clone())?,
            };
            let loops = Arc::new(loops.with_work_root(workspace_root));
            let accounts = Arc::new(Accounts::open_on(&backend, &data_dir)?);
            let webhooks = Arc::new(WebhookStore::open_on(&backend, &data_dir)?);
            let audit = Arc::new(AuditLog::open_on(&backend, &data_dir));
            let rules = Arc::new(RuleStore::open_on(&backend, &data_dir)?);
            Ok::<_, StoreError>((loops, accounts, webhooks, audit, rules))
        })
        .await
        .map_err(|e| StoreError::io(dir.root(), std::io::Error::other(e)))??;
        let (loops, accounts, webhooks, audit, rules) = opened;
        let runtime = {
            let (config, loops, catalog) = (config.clone(), loops.clone(), catalog.clone());
            let (webhooks, rules, audit) = (webhooks.clone(), rules.clone(), audit.clone());
            tokio::task::spawn_blocking(move || {
                Runtime::open(config, loops, catalog, cluster, webhooks, rules, audit)
            })
            .await
            .map_err(|e| StoreError::io(dir.root(), std::io::Error::other(e)))??
        };
        let runtime = Arc::new(runtime);
        runtime.start_cluster();
        runtime.start_webhooks();
        let forwarder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoreError::io(dir.root(), std::io::Error::other(e)))?;
        Ok(Self {
            guards: Arc::new(match (&backend_pg, &node_secret) {
                (Some(pg), Some(secret)) => crate::http::limits::Guards::new(&config.limits)
                    .shared_with(pg.clone(), secret.clone()),
                _ => crate::http::limits::Guards::new(&config.limits),
            }),
            accounts,
            loops,
            catalog,
            runtime,
            webhooks,
            audit,
            rules,
            config,
            streams: CancellationToken::new(),
            started_at: Instant::now(),
            node_secret,
            forwarder,
        })
    }
}

/// The secret every node of one database shares, made by the first.
async fn node_secret(pg: &Pg) -> Result<String, StoreError> {
    let fresh = crate::ids::random_hex(32);
    sqlx::query("INSERT INTO cluster (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
        .bind(&fresh)
        .execute(pg.pool())
        .await?;
    Ok(
        sqlx::query_scalar("SELECT secret FROM cluster WHERE id = 1")
            .fetch_one(pg.pool())
            .await?,
    )
}
