//! A small Limitador-compatible rate-limit service: the `limitador` crate's engine (counters in
//! memory or in Redis, see [`storage`]) behind Limitador's gRPC APIs and a read-only subset of
//! its HTTP API.
//!
//! - gRPC (HTTP/2, plaintext): `kuadrant.service.ratelimit.v1.RateLimitService`
//!   (`CheckRateLimit`, `Report`, and the reservation protocol's `Reserve` and `Commit`) and
//!   `envoy.service.ratelimit.v3.RateLimitService` (`ShouldRateLimit`), see [`service`] for the
//!   semantics and [`reservations`] for the service's own bookkeeping of reservations.
//! - HTTP/1.1: `/status`, `/limits/{namespace}`, `/counters/{namespace}`, `/metrics`, see
//!   [`http`] and [`metrics`].
//! - Limits: Limitador's `limits.yaml`, see [`limits`].
//!
//! [`start`] runs both servers in the current tokio runtime and returns their bound addresses
//! (bind port 0 to get free ports); [`run`] is the command: start, then stop gracefully on
//! SIGINT/SIGTERM.

#![warn(missing_docs)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Streams a client may reset before they are answered, per connection, before the connection
/// is closed (h2's default is 20). See the comment where the gRPC server is built.
const MAX_PENDING_RESET_STREAMS: usize = 100_000;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod http;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod reservations;
pub mod service;
pub mod storage;

use reservations::ReservationSettings;
use service::{Core, EnvoyRls, KuadrantRls};

/// Command line of `ratelimit-service`, in the style of `limitador-server`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ratelimit-service",
    version,
    about = "Limitador-compatible rate-limit service (counters in memory or in Redis)",
    long_about = "Limitador-compatible rate-limit service (counters in memory or in Redis).\n\n\
        gRPC: kuadrant.service.ratelimit.v1.RateLimitService/{CheckRateLimit,Report,Reserve,Commit} and \
        envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit.\n\
        HTTP: GET /status, /limits/{namespace}, /counters/{namespace}, /metrics."
)]
pub struct Config {
    /// Limitador limits file (YAML list of limits)
    #[arg(value_name = "LIMITS_FILE", env = "LIMITS_FILE")]
    pub limits_file: PathBuf,

    /// The IP to listen on for gRPC (RLS)
    #[arg(
        short = 'b',
        long = "rls-ip",
        default_value = "0.0.0.0",
        env = "ENVOY_RLS_HOST"
    )]
    pub rls_ip: IpAddr,

    /// The port to listen on for gRPC (RLS); 0 picks a free one
    #[arg(
        short = 'p',
        long = "rls-port",
        default_value_t = 8081,
        env = "ENVOY_RLS_PORT"
    )]
    pub rls_port: u16,

    /// The IP to listen on for HTTP
    #[arg(
        short = 'B',
        long = "http-ip",
        default_value = "0.0.0.0",
        env = "HTTP_API_HOST"
    )]
    pub http_ip: IpAddr,

    /// The port to listen on for HTTP; 0 picks a free one
    #[arg(
        short = 'P',
        long = "http-port",
        default_value_t = 8080,
        env = "HTTP_API_PORT"
    )]
    pub http_port: u16,

    /// Most counters of limits with variables held in memory (past it, the cache evicts some)
    #[arg(short = 'c', long = "cache-size", default_value_t = 10_000)]
    pub cache_size: u64,

    /// Add X-RateLimit-{Limit,Remaining,Reset} headers (draft 03) to ShouldRateLimit answers
    #[arg(
        short = 'H',
        long = "rate-limit-headers",
        value_enum,
        default_value = "NONE"
    )]
    pub rate_limit_headers: RateLimitHeaders,

    /// Testing aid: wait this many milliseconds before handling every gRPC call, to play a slow
    /// service (a call whose deadline passes meanwhile is cancelled and never applied)
    #[arg(long = "grpc-delay-ms", default_value_t = 0, value_name = "N")]
    pub grpc_delay_ms: u64,

    /// Longest a Reserve holds its amount, in seconds: a request's ttl is shortened to it, and a
    /// request without a ttl gets it (a hold also ends with its counter's window)
    #[arg(
        long = "max-reservation-ttl",
        default_value_t = 60,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=MAX_RESERVATION_TTL_SECONDS)
    )]
    pub max_reservation_ttl: u64,

    /// Largest share of a counter's max_value one Reserve holds, in (0, 1]: admission still
    /// needs the whole amount to fit, but no more than this share is held
    #[arg(
        long = "max-reservation-fraction",
        default_value_t = 1.0,
        value_name = "FRACTION",
        value_parser = parse_fraction
    )]
    pub max_reservation_fraction: f64,

    /// Testing aid: answer Reserve and Commit with gRPC status UNIMPLEMENTED, as Limitador 2.4
    /// (which has no such methods) does
    #[arg(long = "reservations-unimplemented")]
    pub reservations_unimplemented: bool,

    /// Testing aid: answer like Limitador: no `statuses` in `CheckRateLimit`, `Report` and
    /// `Reserve` answers (nor in `ShouldRateLimit`'s)
    #[arg(long = "no-statuses")]
    pub no_statuses: bool,

    /// Validate LIMITS_FILE, print the limits as JSON, and exit
    #[arg(long)]
    pub validate: bool,

    /// More logging: -v debug, -vv trace (default info; RUST_LOG overrides)
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Where the counters live: memory (default), redis URL, redis_cached URL
    #[command(subcommand)]
    pub storage: Option<storage::Storage>,
}

/// Largest `--max-reservation-ttl`: a year (a hold never outlives its counter's window anyway).
pub const MAX_RESERVATION_TTL_SECONDS: u64 = 365 * 86_400;

/// Parses `--max-reservation-fraction`: a number in (0, 1].
fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|e| format!("not a number: {e}"))?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(format!("must be greater than 0 and at most 1, not {value}"))
    }
}

impl Config {
    /// The reservation policy the flags ask for.
    pub fn reservation_settings(&self) -> ReservationSettings {
        ReservationSettings {
            max_ttl: Duration::from_secs(self.max_reservation_ttl),
            max_fraction: self.max_reservation_fraction,
            unimplemented: self.reservations_unimplemented,
        }
    }
}

/// Value of `--rate-limit-headers`, Limitador's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitHeaders {
    /// No headers.
    #[value(name = "NONE")]
    None,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` of the most restrictive
    /// counter.
    #[value(name = "DRAFT_VERSION_03")]
    DraftVersion03,
}

/// Why the service could not start or stopped with an error.
#[derive(Debug)]
pub enum Error {
    /// The limits file was refused.
    Limits(limits::LimitsError),
    /// A listening socket could not be bound.
    Bind {
        /// `"gRPC"` or `"HTTP"`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The counters' storage could not be reached (one line).
    Storage(String),
    /// A server failed while serving.
    Serve(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Limits(e) => write!(f, "{e}"),
            Error::Bind { what, addr, source } => {
                write!(f, "cannot listen for {what} on {addr}: {source}")
            }
            Error::Storage(e) | Error::Serve(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<limits::LimitsError> for Error {
    fn from(e: limits::LimitsError) -> Self {
        Error::Limits(e)
    }
}

/// The running service: its bound addresses, and a way to stop it.
pub struct RunningService {
    /// Where the gRPC server listens.
    pub rls_addr: SocketAddr,
    /// Where the HTTP server listens.
    pub http_addr: SocketAddr,
    /// The shared state (limiter, metrics), e.g. for in-process inspection.
    pub core: Arc<Core>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), Error>>,
    http: JoinHandle<Result<(), Error>>,
}

impl RunningService {
    /// Asks both servers to stop (in-flight calls finish) and waits for them.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.shutdown.send(true);
        let grpc = join(self.grpc).await;
        let http = join(self.http).await;
        grpc.and(http)
    }

    /// Waits until `signal` completes, or until either server fails; then shuts down.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        let RunningService {
            shutdown,
            mut grpc,
            mut http,
            ..
        } = self;
        let (first, other) = tokio::select! {
            _ = signal => {
                log::info!("shutting down");
                let _ = shutdown.send(true);
                let grpc = join(grpc).await;
                let http = join(http).await;
                return grpc.and(http);
            }
            r = &mut grpc => (r, http),
            r = &mut http => (r, grpc),
        };
        // One server stopped on its own: stop the other one too.
        let _ = shutdown.send(true);
        let _ = join(other).await;
        flatten(first)
    }
}

fn flatten(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::Serve(format!("server task failed: {e}"))),
    }
}

async fn join(handle: JoinHandle<Result<(), Error>>) -> Result<(), Error> {
    flatten(handle.await)
}

/// Loads the limits, connects to the counters' storage, binds both listeners and starts serving
/// in the current tokio runtime. Logs each listening address at `info` level.
pub async fn start(config: &Config) -> Result<RunningService, Error> {
    let limits = limits::load_limits_file(&config.limits_file)?;
    let count = limits.len();
    let storage = config.storage.clone().unwrap_or(storage::Storage::Memory);
    let core = Core::connect(
        &storage,
        limits,
        config.cache_size,
        Duration::from_millis(config.grpc_delay_ms),
        config.rate_limit_headers == RateLimitHeaders::DraftVersion03,
        config.reservation_settings(),
    )
    .await
    .map_err(Error::Storage)?;
    let core = Arc::new(if config.no_statuses {
        core.without_statuses()
    } else {
        core
    });
    log::info!(
        "loaded {count} limit(s) from {}; counters in {}",
        config.limits_file.display(),
        storage.describe()
    );

    let rls_addr = SocketAddr::new(config.rls_ip, config.rls_port);
    let rls_listener = TcpListener::bind(rls_addr)
        .await
        .map_err(|source| Error::Bind {
            what: "gRPC",
            addr: rls_addr,
            source,
        })?;
    let http_addr = SocketAddr::new(config.http_ip, config.http_port);
    let http_listener = TcpListener::bind(http_addr)
        .await
        .map_err(|source| Error::Bind {
            what: "HTTP",
            addr: http_addr,
            source,
        })?;
    let rls_addr = rls_listener.local_addr().map_err(|source| Error::Bind {
        what: "gRPC",
        addr: rls_addr,
        source,
    })?;
    let http_addr = http_listener.local_addr().map_err(|source| Error::Bind {
        what: "HTTP",
        addr: http_addr,
        source,
    })?;
    if config.grpc_delay_ms > 0 {
        log::warn!(
            "every gRPC call is delayed by {} ms (--grpc-delay-ms)",
            config.grpc_delay_ms
        );
    }

    if config.reservations_unimplemented {
        log::warn!("Reserve and Commit answer UNIMPLEMENTED (--reservations-unimplemented)");
    }
    if config.no_statuses {
        log::warn!("answers carry no statuses, as Limitador's (--no-statuses)");
    }

    let (shutdown, rx) = watch::channel(false);

    let grpc = {
        let mut rx = rx.clone();
        let incoming =
            tonic::transport::server::TcpIncoming::from(rls_listener).with_nodelay(Some(true));
        // Envoy resets the stream of every call whose deadline passes (a slow check). h2's
        // "rapid reset" guard closes the whole connection after 20 such resets, failing every
        // call in flight on it, Reports the service already applied among them: the filter then
        // retries those and the tokens count twice. One Envoy connection carries all calls of a
        // worker, so allow many resets on it.
        let router = tonic::transport::Server::builder()
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
            .add_service(
                proto::kuadrant::rate_limit_service_server::RateLimitServiceServer::new(
                    KuadrantRls(core.clone()),
                ),
            )
            .add_service(
                proto::envoy::rate_limit_service_server::RateLimitServiceServer::new(EnvoyRls(
                    core.clone(),
                )),
            );
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|e| Error::Serve(format!("gRPC server: {e}")))
        })
    };
    log::info!("gRPC (RLS) server listening on {rls_addr}");

    let http = {
        let mut rx = rx;
        let app = http::router(core.clone());
        tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|e| Error::Serve(format!("HTTP server: {e}")))
        })
    };
    log::info!("HTTP server listening on {http_addr}");

    Ok(RunningService {
        rls_addr,
        http_addr,
        core,
        shutdown,
        grpc,
        http,
    })
}

/// The command: `--validate` checks the file and prints it; otherwise serves until SIGINT or
/// SIGTERM, then stops gracefully.
pub async fn run(config: Config) -> Result<(), Error> {
    if config.validate {
        let limits = limits::load_limits_file(&config.limits_file)?;
        let json: Vec<http::LimitJson> = limits.iter().map(http::LimitJson::from).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_else(|e| e.to_string())
        );
        return Ok(());
    }
    let running = start(&config).await?;
    running.run_until(shutdown_signal()).await
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
