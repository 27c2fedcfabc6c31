//! Starting and stopping: open the data directory, create the first admin,
//! serve until the shutdown token fires, then write what is pending.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::router;
use crate::ids;
use crate::state::AppState;
use crate::store::{Accounts, DataDir};

/// How often token `lastUsedAt` values noted in memory are written to disk.
const LAST_USED_FLUSH_EVERY: Duration = Duration::from_secs(30);

/// Runs the server on `listener` until `shutdown` is cancelled. Fails before
/// serving if the data directory is in use or holds a file it cannot parse.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = DataDir::create(&config.data_dir)?;
    // Held until this function returns: one server per data directory.
    let _serving = dir.lock_for_serving()?;
    let state = AppState::open(config, &dir).await?;
    let accounts = state.accounts.clone();
    tokio::task::spawn_blocking(move || accounts.users.prepare_dummy_hash()).await?;
    let addr = listener.local_addr()?;

    if let Some(password) = bootstrap_admin(&state.accounts)? {
        eprint!(
            "{}",
            first_start_banner(&open_url(&state.config, addr), &password)
        );
    }
    for warning in &state.config.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        %addr,
        data_dir = %dir.root().display(),
        agent = ?state.config.agent,
        sandbox = state.config.sandbox.name(),
        "loopd listening"
    );

    let metrics = match state.config.metrics_bind {
        None => None,
        Some(bind) => {
            let listener = TcpListener::bind(bind)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-bind {bind}: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            let app = crate::http::metrics::router(state.clone());
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await;
                if let Err(err) = served {
                    tracing::error!(error = %err, "the metrics listener failed");
                }
            }))
        }
    };
    let flusher = tokio::spawn(flush_periodically(
        state.accounts.clone(),
        state.guards.clone(),
        state.runtime.clone(),
        shutdown.clone(),
    ));
    // On shutdown, agents stop first and turns still running are closed in
    // their logs, so open streams deliver that end before they close.
    let streams = state.streams.clone();
    let runtime = state.runtime.clone();
    let stopping = shutdown.clone();
    // Event frames are small and must go out at once: every connection
    // gets TCP_NODELAY (in `serve`).
    let limits = state.config.connections.clone();
    crate::http::serve::serve(listener, router(state.clone()), limits, async move {
        stopping.cancelled().await;
        runtime.shutdown().await;
        streams.cancel();
    })
    .await;
    shutdown.cancel();
    state.runtime.shutdown().await;
    state.streams.cancel();
    flusher.await?;
    if let Some(metrics) = metrics {
        metrics.await?;
    }
    flush_last_used(state.accounts.clone()).await;
    tracing::info!("loopd stopped");
    Ok(())
}

/// On the very first start (no users at all), creates `admin` with a random
/// password and returns the password so it can be shown once.
fn bootstrap_admin(accounts: &Accounts) -> anyhow::Result<Option<String>> {
    if !accounts.users.is_empty() {
        return Ok(None);
    }
    let password = ids::random_password();
    accounts.users.add("admin", true, &password)?;
    Ok(Some(password))
}

fn open_url(config: &Config, addr: SocketAddr) -> String {
    let base = match &config.public_origin {
        Some(origin) => origin.clone(),
        None => {
            let mut shown = addr;
            if shown.ip().is_unspecified() {
                shown.set_ip(match addr {
                    SocketAddr::V4(_) => [127, 0, 0, 1].into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{shown}")
        }
    };
    format!("{base}/")
}

fn first_start_banner(url: &str, password: &str) -> String {
    let rule = "=".repeat(72);
    format!(
        "\n{rule}\n  loopd: first start, so an admin user was created.\n\n\
         \x20   open:      {url}\n\
         \x20   username:  admin\n\
         \x20   password:  {password}\n\n\
         \x20 The password is shown only this once. Change it with\n\
         \x20 `loopd user passwd admin`.\n{rule}\n\n"
    )
}

async fn flush_periodically(
    accounts: Arc<Accounts>,
    guards: Arc<crate::http::limits::Guards>,
    runtime: Arc<crate::runtime::Runtime>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(LAST_USED_FLUSH_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                flush_last_used(accounts.clone()).await;
                runtime.flush_touches().await;
                guards.prune();
                guards.prune_shared().await;
            }
            () = shutdown.cancelled() => return,
        }
    }
}

async fn flush_last_used(accounts: Arc<Accounts>) {
    match tokio::task::spawn_blocking(move || accounts.tokens.flush_last_used()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "could not write token lastUsedAt"),
        Err(err) => tracing::warn!(error = %err, "token lastUsedAt flush panicked"),
    }
}
