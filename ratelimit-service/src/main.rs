//! `ratelimit-service`: a Limitador-compatible rate-limit service with counters in memory or in Redis.
//! See the crate's README.md for usage.

use clap::Parser;

#[tokio::main]
async fn main() {
    let config = ratelimit_service::Config::parse();
    let level = match config.verbose {
        0 => "warn,ratelimit_service=info",
        1 => "info,ratelimit_service=debug",
        _ => "debug,ratelimit_service=trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    if let Err(e) = ratelimit_service::run(config).await {
        eprintln!("ratelimit-service: error: {e}");
        std::process::exit(1);
    }
}
