//! Where the counters live, chosen on the command line as `limitador-server` does it, and one
//! limiter over each choice.
//!
//! - `memory` (the default): the limitador crate's in-memory storage. Counters and
//!   reservations live in this process: lost on restart, not shared with another instance.
//! - `redis URL`: the crate's Redis storage. Counters and reservations (holds) are kept in
//!   Redis, so every instance on the same Redis shares one budget and a restart keeps it. Every
//!   call is one or more Redis round trips; a call that cannot reach Redis within the response
//!   timeout answers gRPC `UNAVAILABLE` (nothing applied, unless Redis ran the command before
//!   the timeout), and the connection is re-established on the next call once Redis is back.
//!   `Commit` alone waits longer, [`COMMIT_RESPONSE_TIMEOUT`], on a connection of its own.
//! - `redis_cached URL`: the crate's cached Redis storage. Counters are counted in this
//!   process and flushed to Redis in batches (every `--flush-period` ms, `--batch` counters at
//!   a time), and read back from Redis on a cache miss; while Redis is unreachable the local
//!   counts go on and are flushed once it is back (answers never fail for it). Reservations are
//!   local to each instance (the crate keeps them in memory), so two instances do not see each
//!   other's holds. Faster per call, shared only as of the last flush.
//!
//! [`Limiter`] wraps the crate's blocking limiter (memory) or its async one (both Redis
//! storages) behind one async API, and turns the crate's errors and panics into
//! [`LimiterError`]s: a storage failure, or a limit's condition that cannot be evaluated on the
//! request.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use futures_util::FutureExt;
use limitador::counter::Counter;
use limitador::errors::LimitadorError;
use limitador::limit::{Context, Limit, Namespace};
use limitador::reservation::{CommitResult, ReservationId, ReservationLimits, ReserveResult};
use limitador::storage::redis::{
    AsyncRedisStorage, CachedRedisStorageBuilder, DEFAULT_BATCH_SIZE, DEFAULT_FLUSHING_PERIOD_SEC,
    DEFAULT_MAX_CACHED_COUNTERS, DEFAULT_RESPONSE_TIMEOUT_MS,
};
use limitador::storage::AsyncStorage;
use limitador::{
    AsyncRateLimiter, AsyncRateLimiterBuilder, CheckResult, RateLimiter, RateLimiterBuilder,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// `[STORAGE]` of the command line: `memory` (default), `redis URL`, `redis_cached URL`, as
/// `limitador-server` spells them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Storage {
    /// Counters in this process's memory (the default): lost on restart, not shared
    #[command(name = "memory")]
    Memory,
    /// Counters and reservations in Redis, shared by every instance on it
    #[command(name = "redis")]
    Redis {
        /// Redis URL, e.g. redis://127.0.0.1:6379 (rediss:// for TLS, redis://:password@host/db)
        #[arg(value_name = "URL")]
        url: String,
        /// Longest wait for one Redis reply, and for one connection attempt, in milliseconds;
        /// a call that waited that long answers UNAVAILABLE
        #[arg(long = "response-timeout", value_name = "MS", default_value_t = DEFAULT_RESPONSE_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(1..))]
        response_timeout_ms: u64,
    },
    /// Counters cached in this process and flushed to Redis in batches; reservations local
    #[command(name = "redis_cached")]
    RedisCached {
        /// Redis URL, e.g. redis://127.0.0.1:6379
        #[arg(value_name = "URL")]
        url: String,
        /// Most counters written to Redis in one flush
        #[arg(long = "batch", value_name = "N", default_value_t = DEFAULT_BATCH_SIZE,
              value_parser = parse_positive)]
        batch: usize,
        /// Time between flushes to Redis, in milliseconds
        #[arg(long = "flush-period", value_name = "MS", default_value_t = DEFAULT_FLUSHING_PERIOD_SEC * 1000,
              value_parser = clap::value_parser!(u64).range(1..))]
        flush_period_ms: u64,
        /// Most counters cached in this process
        #[arg(long = "max-cached", value_name = "N", default_value_t = DEFAULT_MAX_CACHED_COUNTERS,
              value_parser = parse_positive)]
        max_cached: usize,
        /// Longest wait for one Redis reply, in milliseconds
        #[arg(long = "response-timeout", value_name = "MS", default_value_t = DEFAULT_RESPONSE_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(1..))]
        response_timeout_ms: u64,
    },
}

/// Parses a count of at least 1.
fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

impl Storage {
    /// One line for the log: `memory`, `redis redis://…`, `redis_cached redis://…` (a password
    /// in the URL is not shown).
    pub fn describe(&self) -> String {
        match self {
            Storage::Memory => "memory".to_string(),
            Storage::Redis { url, .. } => format!("redis {}", redact(url)),
            Storage::RedisCached { url, .. } => format!("redis_cached {}", redact(url)),
        }
    }
}

/// The URL with the password (what is between `:` and `@` after the scheme) replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Why a limiter call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimiterError {
    /// The counters' storage failed (Redis unreachable, timed out, or answered an error): the
    /// call applied nothing, as far as the service can tell.
    Storage(String),
    /// A limit's condition or variable could not be evaluated on this request (an error or a
    /// panic of the crate's CEL evaluation, e.g. a condition that indexes a descriptor the
    /// request does not have).
    Evaluation(String),
}

impl std::fmt::Display for LimiterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimiterError::Storage(e) => write!(f, "the counters' storage failed: {e}"),
            LimiterError::Evaluation(e) => {
                write!(
                    f,
                    "the request could not be evaluated against the limits: {e}"
                )
            }
        }
    }
}

impl std::error::Error for LimiterError {}

impl From<LimitadorError> for LimiterError {
    fn from(e: LimitadorError) -> Self {
        match e {
            LimitadorError::StorageError(e) => LimiterError::Storage(e.msg().to_string()),
            LimitadorError::InterpreterError(e) => LimiterError::Evaluation(format!("{e:?}")),
        }
    }
}

/// What a panic of the crate's condition evaluation becomes. The crate panics when a condition
/// fails to evaluate on a request (e.g. `descriptors[1]['x'] == '1'` on a request with one
/// descriptor, or a condition that is not boolean); its locks are not held at that point, so
/// the limiter stays usable.
fn panicked() -> LimiterError {
    LimiterError::Evaluation(
        "a limit's condition could not be evaluated on this request \
         (does it index a descriptor the request does not have, or is it not boolean?)"
            .to_string(),
    )
}

/// Longest wait for Redis's answer to a `Commit` with the `redis` storage. A commit is never
/// given up sooner: Redis may still run a command whose answer the service stopped waiting
/// for, and the filter's retry would then be applied as well. While the first attempt waits,
/// a retry answers `UNAVAILABLE` (see [`crate::reservations`]), and once it is applied, the
/// retry is a duplicate. This is longer than the filter's retries last by default (about 16 s
/// of delays plus each attempt's timeout).
pub const COMMIT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The limitador crate's limiter over the chosen [`Storage`]: the blocking one for memory, the
/// async one for Redis.
pub enum Limiter {
    /// In-memory counters.
    Blocking(RateLimiter),
    /// Redis (cached or not).
    Async {
        /// Every call but `Commit`.
        calls: AsyncRateLimiter,
        /// `Commit`s, on a connection of their own that waits up to
        /// [`COMMIT_RESPONSE_TIMEOUT`] (`redis` only; `redis_cached` commits to its local
        /// cache).
        commits: Option<AsyncRateLimiter>,
    },
}

/// Runs one blocking limiter call, its errors and panics turned into [`LimiterError`].
fn blocking<T>(f: impl FnOnce() -> Result<T, LimitadorError>) -> Result<T, LimiterError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(LimiterError::from),
        Err(_) => Err(panicked()),
    }
}

/// Awaits one async limiter call, its errors and panics turned into [`LimiterError`].
async fn awaited<T>(
    f: impl std::future::Future<Output = Result<T, LimitadorError>>,
) -> Result<T, LimiterError> {
    match AssertUnwindSafe(f).catch_unwind().await {
        Ok(result) => result.map_err(LimiterError::from),
        Err(_) => Err(panicked()),
    }
}

impl Limiter {
    /// Connects to the storage and builds the limiter: in-memory with at most `cache_size`
    /// qualified counters, or on Redis (one connection attempt, bounded by the response
    /// timeout). Errors: the URL is malformed, or Redis does not answer (the message names the
    /// storage and the cause, on one line).
    pub async fn connect(
        storage: &Storage,
        cache_size: u64,
        reservations: ReservationLimits,
    ) -> Result<Limiter, String> {
        let fail = |e: redis::RedisError| {
            format!(
                "cannot connect to the counters' storage ({}): {}",
                storage.describe(),
                e.to_string().replace('\n', " ")
            )
        };
        match storage {
            Storage::Memory => Ok(Limiter::Blocking(
                RateLimiterBuilder::new(cache_size)
                    .reservation_limits(reservations)
                    .build(),
            )),
            Storage::Redis {
                url,
                response_timeout_ms,
            } => {
                let timeout = Duration::from_millis(*response_timeout_ms);
                let limiter = |response_timeout: Duration| async move {
                    let client = redis::Client::open(url.as_str())?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(timeout)
                        .set_response_timeout(response_timeout)
                        // One attempt per reconnection: a Redis that is down fails the call at
                        // once (the filter retries it), rather than after a backoff.
                        .set_number_of_retries(0);
                    let connection = ConnectionManager::new_with_config(client, config).await?;
                    let redis = AsyncRedisStorage::new_with_conn_manager(connection).await?;
                    Ok::<_, redis::RedisError>(
                        AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(Box::new(
                            redis,
                        )))
                        .reservation_limits(reservations)
                        .build(),
                    )
                };
                Ok(Limiter::Async {
                    calls: limiter(timeout).await.map_err(fail)?,
                    commits: Some(limiter(COMMIT_RESPONSE_TIMEOUT).await.map_err(fail)?),
                })
            }
            Storage::RedisCached {
                url,
                batch,
                flush_period_ms,
                max_cached,
                response_timeout_ms,
            } => {
                // The crate's builder panics on a URL it cannot parse: check it first.
                redis::Client::open(url.as_str()).map_err(fail)?;
                let cached = CachedRedisStorageBuilder::new(url)
                    .batch_size(*batch)
                    .flushing_period(Duration::from_millis(*flush_period_ms))
                    .max_cached_counters(*max_cached)
                    .response_timeout(Duration::from_millis(*response_timeout_ms))
                    .build()
                    .await
                    .map_err(fail)?;
                Ok(Limiter::Async {
                    calls: AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(
                        Box::new(cached),
                    ))
                    .reservation_limits(reservations)
                    .build(),
                    commits: None,
                })
            }
        }
    }

    /// Adds a limit (limits are held in this process with every storage).
    pub fn add_limit(&self, limit: Limit) -> bool {
        match self {
            Limiter::Blocking(l) => l.add_limit(limit),
            Limiter::Async { calls, commits } => {
                if let Some(commits) = commits {
                    commits.add_limit(limit.clone());
                }
                calls.add_limit(limit)
            }
        }
    }

    /// The limits of a namespace.
    pub fn get_limits(&self, namespace: &Namespace) -> HashSet<Limit> {
        match self {
            Limiter::Blocking(l) => l.get_limits(namespace),
            Limiter::Async { calls: l, .. } => l.get_limits(namespace),
        }
    }

    /// The live counters of a namespace (with Redis: as Redis has them).
    pub async fn get_counters(
        &self,
        namespace: &Namespace,
    ) -> Result<HashSet<Counter>, LimiterError> {
        match self {
            Limiter::Blocking(l) => blocking(|| l.get_counters(namespace)),
            Limiter::Async { calls: l, .. } => awaited(l.get_counters(namespace)).await,
        }
    }

    /// Would `delta` more fit in every counter that applies? Never writes.
    pub async fn is_rate_limited(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        delta: u64,
    ) -> Result<CheckResult, LimiterError> {
        match self {
            Limiter::Blocking(l) => blocking(|| l.is_rate_limited(namespace, ctx, delta)),
            Limiter::Async { calls: l, .. } => {
                awaited(l.is_rate_limited(namespace, ctx, delta)).await
            }
        }
    }

    /// Adds `delta` to every counter that applies, even past its maximum.
    pub async fn update_counters(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        delta: u64,
    ) -> Result<(), LimiterError> {
        match self {
            Limiter::Blocking(l) => blocking(|| l.update_counters(namespace, ctx, delta)),
            Limiter::Async { calls: l, .. } => {
                awaited(l.update_counters(namespace, ctx, delta)).await
            }
        }
    }

    /// Adds `delta` to every counter that applies if it fits in all of them.
    pub async fn check_rate_limited_and_update(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        delta: u64,
    ) -> Result<CheckResult, LimiterError> {
        match self {
            Limiter::Blocking(l) => {
                blocking(|| l.check_rate_limited_and_update(namespace, ctx, delta))
            }
            Limiter::Async { calls: l, .. } => {
                awaited(l.check_rate_limited_and_update(namespace, ctx, delta)).await
            }
        }
    }

    /// Holds `amount` on every counter that applies if it fits once their outstanding holds are
    /// counted (see the crate's `RateLimiter::reserve`).
    pub async fn reserve(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        amount: u64,
        ttl: Duration,
    ) -> Result<ReserveResult, LimiterError> {
        match self {
            Limiter::Blocking(l) => blocking(|| l.reserve(namespace, ctx, amount, Some(ttl))),
            Limiter::Async { calls: l, .. } => {
                awaited(l.reserve(namespace, ctx, amount, Some(ttl))).await
            }
        }
    }

    /// Adds `actual_amount` to every counter that applies and releases the hold of
    /// `reservation_id` (see the crate's `RateLimiter::commit_reservation`).
    pub async fn commit_reservation(
        &self,
        namespace: &Namespace,
        ctx: &Context<'_>,
        reservation_id: Option<&ReservationId>,
        actual_amount: u64,
    ) -> Result<CommitResult, LimiterError> {
        match self {
            Limiter::Blocking(l) => {
                blocking(|| l.commit_reservation(namespace, ctx, reservation_id, actual_amount))
            }
            Limiter::Async { calls, commits } => {
                let l = commits.as_ref().unwrap_or(calls);
                awaited(l.commit_reservation(namespace, ctx, reservation_id, actual_amount)).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        storage: Option<Storage>,
    }

    fn parse(args: &[&str]) -> Result<Option<Storage>, String> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map(|c| c.storage)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn storage_is_spelled_as_limitador_server_spells_it() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["memory"]).unwrap(), Some(Storage::Memory));
        assert_eq!(
            parse(&["redis", "redis://127.0.0.1:6379"]).unwrap(),
            Some(Storage::Redis {
                url: "redis://127.0.0.1:6379".into(),
                response_timeout_ms: 350
            })
        );
        assert_eq!(
            parse(&[
                "redis_cached",
                "--batch",
                "10",
                "--flush-period",
                "200",
                "--max-cached",
                "5",
                "--response-timeout",
                "100",
                "redis://r:6379"
            ])
            .unwrap(),
            Some(Storage::RedisCached {
                url: "redis://r:6379".into(),
                batch: 10,
                flush_period_ms: 200,
                max_cached: 5,
                response_timeout_ms: 100
            })
        );
        assert!(parse(&["redis"]).is_err(), "a URL is required");
        assert!(parse(&["redis_cached", "--batch", "0", "redis://r"]).is_err());
        assert!(parse(&["disk"]).is_err(), "no disk storage");
    }

    #[test]
    fn describe_hides_a_password_in_the_url() {
        let s = Storage::Redis {
            url: "redis://user:s3cret@db:6379/0".into(),
            response_timeout_ms: 1,
        };
        assert_eq!(s.describe(), "redis redis://user:***@db:6379/0");
        let s = Storage::RedisCached {
            url: "redis://db:6379".into(),
            batch: 1,
            flush_period_ms: 1,
            max_cached: 1,
            response_timeout_ms: 1,
        };
        assert_eq!(s.describe(), "redis_cached redis://db:6379");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_one_line_naming_the_storage() {
        // A port nothing listens on: bind one, take its number, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for storage in [
            Storage::Redis {
                url: format!("redis://127.0.0.1:{port}"),
                response_timeout_ms: 200,
            },
            Storage::RedisCached {
                url: format!("redis://127.0.0.1:{port}"),
                batch: 1,
                flush_period_ms: 100,
                max_cached: 10,
                response_timeout_ms: 200,
            },
        ] {
            let Err(e) = Limiter::connect(&storage, 10, ReservationLimits::default()).await else {
                panic!("connected to nothing: {storage:?}");
            };
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        }
        let Err(e) = Limiter::connect(
            &Storage::RedisCached {
                url: "not a url".into(),
                batch: 1,
                flush_period_ms: 100,
                max_cached: 10,
                response_timeout_ms: 200,
            },
            10,
            ReservationLimits::default(),
        )
        .await
        else {
            panic!("a malformed URL was taken");
        };
        assert!(e.contains("not a url"), "{e}");
    }
}
