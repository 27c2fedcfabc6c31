//! The `loopd` binary: parse the command line, set up logging, dispatch.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use loopd::cli::{Cli, CliStores, Command, LogFormat, run_audit, run_migrate, run_token, run_user};
use loopd::config::resolve_data_dir;
use loopd::store::audit::{AuditFilter, AuditLog};
use loopd::store::{Backend, DataDir, Pg};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("loopd: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    init_tracing(&cli.log, cli.log_format)?;
    let data_dir = resolve_data_dir(cli.data_dir)?;
    match cli.command {
        Command::Serve(args) => {
            let config = (*args).into_config(data_dir, cli.database_url)?;
            raise_open_file_limit();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
        Command::Migrate => {
            let url = cli.database_url.context(
                "migrate copies into the database of --database-url (LOOPD_DATABASE_URL)",
            )?;
            let dir = DataDir::create(data_dir)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let pg = Pg::connect(&url)
                        .await
                        .context("cannot open the database")?;
                    run_migrate(&dir, &pg, &mut std::io::stdout()).await
                })
        }
        Command::User(cmd) => with_backend(data_dir, cli.database_url, |backend, dir| {
            run_user(
                &CliStores::open_on(backend, dir)?,
                cmd,
                &mut std::io::stdout(),
            )
        }),
        Command::Token(cmd) => with_backend(data_dir, cli.database_url, |backend, dir| {
            run_token(
                &CliStores::open_on(backend, dir)?,
                cmd,
                &mut std::io::stdout(),
            )
        }),
        Command::Audit {
            user,
            since,
            limit,
            json,
        } => with_backend(data_dir, cli.database_url, |backend, dir| {
            let filter = AuditFilter { user, since, limit };
            run_audit(
                &AuditLog::open_on(backend, dir),
                &filter,
                json,
                &mut std::io::stdout(),
            )
        }),
    }
}

/// Runs a CLI command on the stores where they live: the data directory's
/// files, or the shared database.
fn with_backend(
    data_dir: std::path::PathBuf,
    database_url: Option<String>,
    run: impl FnOnce(&Backend, &DataDir) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = DataDir::create(data_dir)?;
    let Some(url) = database_url else {
        return run(&Backend::Files, &dir);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let pg = runtime
        .block_on(Pg::connect(&url))
        .context("cannot open the database")?;
    run(&Backend::Postgres(pg), &dir)
}

async fn serve(config: loopd::Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    loopd::run(config, listener, shutdown).await
}

/// Every SSE stream is a socket: allow as many as the hard limit permits.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %err, soft, hard, "could not raise the open-file limit");
    }
}

/// SIGINT or SIGTERM starts a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

fn init_tracing(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("bad log filter `{filter}`"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
