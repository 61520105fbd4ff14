//! Command line and environment: the only place that reads either.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A real-time GraphQL server: SQL changes streamed to subscribers, in order, resumable.
#[derive(Debug, Parser)]
#[command(name = "syncgraph", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// What to do; serving is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve GraphQL over HTTP (the default).
    Serve,
    /// Print the GraphQL schema (SDL) and exit.
    Schema,
    /// Apply pending migrations and exit.
    Migrate,
}

/// Settings shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "SYNCGRAPH_LISTEN",
        default_value = "127.0.0.1:8000",
        global = true
    )]
    pub listen: SocketAddr,
    /// Database URL: `sqlite://PATH` (created if missing) or `postgres://...`.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true, hide_env_values = true)]
    pub database_url: String,
    /// Secret for signing tokens (HS256). Processes that share it accept each other's tokens.
    /// Without it a random secret is generated once and kept in the database.
    #[arg(
        long,
        env = "SYNCGRAPH_JWT_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub jwt_secret: Option<String>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(
        long,
        env = "SYNCGRAPH_TOKEN_TTL_SECS",
        default_value_t = 86_400,
        global = true
    , value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub token_ttl_secs: u64,
    /// Most database connections kept open by this process.
    #[arg(
        long,
        env = "SYNCGRAPH_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,
    /// At start, keep retrying a database that cannot be reached for this many seconds.
    #[arg(
        long,
        env = "SYNCGRAPH_DB_CONNECT_TIMEOUT_SECS",
        default_value_t = 60,
        global = true
    , value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub db_connect_timeout_secs: u64,
    /// Close a WebSocket with 4408 when no connection_init arrives within this, in ms.
    #[arg(
        long,
        env = "SYNCGRAPH_WS_INIT_TIMEOUT_MS",
        default_value_t = 3_000,
        global = true
    , value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub ws_init_timeout_ms: u64,
    /// Server keep-alive pings on WebSockets every this many seconds.
    #[arg(
        long,
        env = "SYNCGRAPH_WS_KEEP_ALIVE_SECS",
        default_value_t = 12,
        global = true
    , value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ws_keep_alive_secs: u64,
    /// An idle event stream (graphql-sse, multipart) gets a keep-alive every this many
    /// seconds: a comment line, or a `{}` part.
    #[arg(
        long,
        env = "SYNCGRAPH_STREAM_KEEP_ALIVE_SECS",
        default_value_t = 10,
        global = true
    , value_parser = clap::value_parser!(u64).range(1..=10))]
    pub stream_keep_alive_secs: u64,
    /// Keep captured changes at least this long (seconds) for resuming subscriptions.
    #[arg(
        long,
        env = "SYNCGRAPH_RETENTION_SECS",
        default_value_t = 604_800,
        global = true
    , value_parser = clap::value_parser!(u64).range(0..=3_153_600_000))]
    pub retention_secs: u64,
    /// Keep at most this many captured changes.
    #[arg(
        long,
        env = "SYNCGRAPH_RETENTION_ROWS",
        default_value_t = 1_000_000,
        global = true
    )]
    pub retention_rows: u64,
    /// Prune the change log every this many seconds.
    #[arg(
        long,
        env = "SYNCGRAPH_PRUNE_INTERVAL_SECS",
        default_value_t = 60,
        global = true
    , value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub prune_interval_secs: u64,
    /// Look for changes without a wake-up this often, in ms (writes by other processes on
    /// SQLite; a safety net on PostgreSQL).
    #[arg(long, env = "SYNCGRAPH_POLL_MS", default_value_t = 100, global = true, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub poll_ms: u64,
    /// A NATS server with JetStream (`nats://HOST:PORT`): the processes of one PostgreSQL
    /// database share the change feed through a stream on it instead of each reading the log
    /// (one relay per database appends; every process follows). PostgreSQL only.
    #[arg(long, env = "SYNCGRAPH_BUS", global = true, hide_env_values = true)]
    pub bus: Option<String>,
    /// The JetStream stream that carries the feed (letters, digits, `-`, `_`); one per
    /// database. Its subject is `<stream>.changes`.
    #[arg(long, env = "SYNCGRAPH_BUS_STREAM", default_value = "SYNCGRAPH", global = true, value_parser = parse_stream_name)]
    pub bus_stream: String,
    /// The stream keeps changes at most this long, in seconds (older ones are read from the
    /// log by a process that needs them).
    #[arg(long, env = "SYNCGRAPH_BUS_MAX_AGE_SECS", default_value_t = 86_400, global = true, value_parser = clap::value_parser!(u64).range(60..=315_360_000))]
    pub bus_max_age_secs: u64,
    /// The stream keeps at most this many bytes.
    #[arg(long, env = "SYNCGRAPH_BUS_MAX_BYTES", default_value_t = 1_073_741_824, global = true, value_parser = clap::value_parser!(u64).range(1_048_576..=i64::MAX as u64))]
    pub bus_max_bytes: u64,
    /// Copies of the stream in the NATS cluster (1 for a single server; 3 or 5 in a cluster).
    #[arg(long, env = "SYNCGRAPH_BUS_REPLICAS", default_value_t = 1, global = true, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub bus_replicas: u8,
    /// Log line format (filter with RUST_LOG).
    #[arg(long, env = "SYNCGRAPH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub limits: Limits,
}

/// What one client may ask of the server; past each, a coded error, never a crash.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Deepest nesting of selections in one operation (GraphiQL's introspection needs 13).
    #[arg(long, env = "SYNCGRAPH_MAX_QUERY_DEPTH", default_value_t = Limits::DEFAULT.max_query_depth, global = true, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_query_depth: u32,
    /// Most fields one operation may select, counting every alias and nested field.
    #[arg(long, env = "SYNCGRAPH_MAX_QUERY_COMPLEXITY", default_value_t = Limits::DEFAULT.max_query_complexity, global = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_query_complexity: u32,
    /// Answer introspection (`__schema`, `__type`); GraphiQL needs it. `false` to switch off.
    #[arg(long, env = "SYNCGRAPH_INTROSPECTION", default_value_t = Limits::DEFAULT.introspection, global = true, action = clap::ArgAction::Set)]
    pub introspection: bool,
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "SYNCGRAPH_MAX_WS_MESSAGE_BYTES", default_value_t = Limits::DEFAULT.max_ws_message_bytes, global = true, value_parser = clap::value_parser!(u32).range(1_024..=67_108_864))]
    pub max_ws_message_bytes: u32,
    /// Most operations running at once on one WebSocket.
    #[arg(long, env = "SYNCGRAPH_MAX_OPERATIONS_PER_CONNECTION", default_value_t = Limits::DEFAULT.max_operations_per_connection, global = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_operations_per_connection: u32,
    /// Most WebSocket connections open at once; more are refused with 503.
    #[arg(long, env = "SYNCGRAPH_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections, global = true, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,
    /// Most subscriptions one user may have open at once in this process.
    #[arg(long, env = "SYNCGRAPH_MAX_SUBSCRIPTIONS_PER_USER", default_value_t = Limits::DEFAULT.max_subscriptions_per_user, global = true, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_subscriptions_per_user: u32,
    /// Largest `first`/`last` of one page (channels, messages), 1 to 100.
    #[arg(long, env = "SYNCGRAPH_MAX_PAGE_SIZE", default_value_t = Limits::DEFAULT.max_page_size, global = true, value_parser = clap::value_parser!(u32).range(1..=crate::graphql::input::PAGE_SIZE_MAX as i64))]
    pub max_page_size: u32,
    /// Largest HTTP request body accepted, in bytes; larger gets 413.
    #[arg(long, env = "SYNCGRAPH_MAX_BODY_BYTES", default_value_t = Limits::DEFAULT.max_body_bytes, global = true, value_parser = clap::value_parser!(u32).range(1_024..=67_108_864))]
    pub max_body_bytes: u32,
    /// Largest result of one `@live` query, in bytes of JSON; a larger one ends the live
    /// query with LIMIT_EXCEEDED (each live query keeps its last result to diff against).
    #[arg(long, env = "SYNCGRAPH_LIVE_MAX_RESULT_BYTES", default_value_t = Limits::DEFAULT.live_max_result_bytes, global = true, value_parser = clap::value_parser!(u32).range(1_024..=67_108_864))]
    pub live_max_result_bytes: u32,
    /// Largest Yjs update `applyDocumentUpdate` takes, in bytes of base64; larger is
    /// BAD_USER_INPUT and nothing is stored.
    #[arg(long, env = "SYNCGRAPH_MAX_DOCUMENT_UPDATE_BYTES", default_value_t = Limits::DEFAULT.max_document_update_bytes, global = true, value_parser = clap::value_parser!(u32).range(64..=67_108_864))]
    pub max_document_update_bytes: u32,
    /// signIn and signUp attempts allowed per client address per minute.
    #[arg(long, env = "SYNCGRAPH_AUTH_ATTEMPTS_PER_MINUTE", default_value_t = Limits::DEFAULT.auth_attempts_per_minute, global = true, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub auth_attempts_per_minute: u32,
}

impl Limits {
    /// What the schema enforces, as the schema takes it.
    pub fn schema(&self) -> crate::graphql::SchemaLimits {
        crate::graphql::SchemaLimits {
            max_depth: self.max_query_depth as usize,
            max_complexity: self.max_query_complexity as usize,
            introspection: self.introspection,
            max_subscriptions_per_user: self.max_subscriptions_per_user,
            auth_attempts_per_minute: self.auth_attempts_per_minute,
            max_page_size: self.max_page_size as i32,
            live_max_result_bytes: self.live_max_result_bytes as usize,
            max_document_update_bytes: self.max_document_update_bytes as usize,
        }
    }

    /// The defaults, in one place for the flags and for `Config::for_database`.
    pub const DEFAULT: Limits = Limits {
        max_query_depth: 24,
        max_query_complexity: 2_000,
        introspection: true,
        max_ws_message_bytes: 1024 * 1024,
        max_operations_per_connection: 100,
        max_connections: 10_000,
        max_subscriptions_per_user: 1_000,
        auth_attempts_per_minute: 30,
        max_page_size: crate::graphql::input::PAGE_SIZE_MAX as u32,
        max_body_bytes: 1024 * 1024,
        live_max_result_bytes: 256 * 1024,
        max_document_update_bytes: 256 * 1024,
    };
}

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The embedded default: a SQLite file in the working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://syncgraph.db";

impl Config {
    /// A configuration for `database_url` with every other setting at its default.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database_url: database_url.into(),
            jwt_secret: None,
            token_ttl_secs: 86_400,
            db_max_connections: 10,
            db_connect_timeout_secs: 60,
            log_format: LogFormat::Text,
            ws_init_timeout_ms: 3_000,
            ws_keep_alive_secs: 12,
            stream_keep_alive_secs: 10,
            retention_secs: 604_800,
            retention_rows: 1_000_000,
            prune_interval_secs: 60,
            poll_ms: 100,
            bus: None,
            bus_stream: "SYNCGRAPH".to_owned(),
            bus_max_age_secs: 86_400,
            bus_max_bytes: 1_073_741_824,
            bus_replicas: 1,
            limits: Limits::DEFAULT,
        }
    }

    /// Token lifetime as a `Duration`.
    pub fn token_ttl(&self) -> Duration {
        Duration::from_secs(self.token_ttl_secs)
    }

    /// How long a PostgreSQL server that cannot be reached is retried at start.
    pub fn db_connect_patience(&self) -> Duration {
        Duration::from_secs(self.db_connect_timeout_secs)
    }

    /// How often the log is read without a wake-up.
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(1))
    }

    /// How much of the change log is kept, and how often it is pruned.
    pub fn retention(&self) -> crate::changes::Retention {
        crate::changes::Retention {
            max_age: Duration::from_secs(self.retention_secs),
            max_rows: self.retention_rows,
            interval: Duration::from_secs(self.prune_interval_secs.max(1)),
        }
    }

    /// The bus, when `--bus` names one.
    pub fn bus(&self) -> Option<crate::bus::BusConfig> {
        let url = self.bus.as_deref().filter(|url| !url.is_empty())?;
        Some(crate::bus::BusConfig {
            url: url.to_owned(),
            stream: self.bus_stream.clone(),
            max_age: Duration::from_secs(self.bus_max_age_secs),
            max_bytes: i64::try_from(self.bus_max_bytes).unwrap_or(i64::MAX),
            replicas: usize::from(self.bus_replicas),
        })
    }

    /// The event streams' timing.
    pub fn streams(&self) -> crate::streams::StreamConfig {
        crate::streams::StreamConfig {
            keep_alive: Duration::from_secs(self.stream_keep_alive_secs.clamp(1, 10)),
        }
    }

    /// The WebSocket protocols' timing and per-socket limit.
    pub fn ws(&self) -> crate::ws::WsConfig {
        crate::ws::WsConfig {
            init_timeout: Duration::from_millis(self.ws_init_timeout_ms),
            keep_alive: Duration::from_secs(self.ws_keep_alive_secs.max(1)),
            max_operations: self.limits.max_operations_per_connection as usize,
        }
    }
}

/// A JetStream stream name: what NATS accepts in a name and in a subject token.
fn parse_stream_name(name: &str) -> Result<String, String> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(name.to_owned())
    } else {
        Err("1 to 64 letters, digits, '-' or '_'".to_owned())
    }
}
