//! The `syncgraph` binary: parse the command line, start logging, then serve, migrate or print
//! the schema.

use anyhow::Context as _;
use clap::Parser;
use syncgraph::config::{Cli, Command, LogFormat};
use syncgraph::{App, db, graphql};
use tracing_subscriber::EnvFilter;

/// How long the exit waits for blocking work still running (a password hash whose client
/// has gone, a DNS lookup) once serving has stopped.
const BLOCKING_WORK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(run());
    // Dropping the runtime would wait for every blocking task without limit.
    runtime.shutdown_timeout(BLOCKING_WORK_PATIENCE);
    outcome
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // sqlx logs PostgreSQL's NOTICEs at INFO, and the migrator's `CREATE TABLE IF NOT EXISTS
    // seaql_migrations` raises one ("already exists, skipping") at every start: quiet them
    // unless RUST_LOG asks for sqlx itself.
    if !std::env::var("RUST_LOG").is_ok_and(|value| value.contains("sqlx")) {
        filter = filter.add_directive("sqlx::postgres::notice=warn".parse()?);
    }
    match cli.config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Schema => {
            print!("{}", graphql::sdl());
            Ok(())
        }
        Command::Migrate => {
            let (db, _) = db::connect(&cli.config.database_url, 1).await?;
            syncgraph::app::migrate(&db).await?;
            // Closed, not dropped: SQLite checkpoints its WAL and removes the `-wal` and
            // `-shm` files when the last connection closes.
            db.close().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve => {
            let app = App::build(&cli.config).await?;
            app.run(shutdown_signal()).await
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
