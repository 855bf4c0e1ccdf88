//! `llm-simulator`: an LLM upstream (OpenAI, Anthropic and Gemini formats) with deterministic token usage.
//! See the `llm_simulator` library docs (or README.md) for the endpoints and the usage contract.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llm_simulator::{app, serve, Config};

/// LLM upstream simulator (OpenAI, Anthropic and Gemini formats) with deterministic token usage.
#[derive(Parser, Debug)]
#[command(name = "llm-simulator", version, about)]
struct Cli {
    /// Address to listen on (host:port; port 0 picks a free port, printed at startup).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Delay in milliseconds before each LLM endpoint answers.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay in milliseconds before each streamed word chunk.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Compress response bodies (gzip, br or deflate, from the request's accept-encoding);
    /// the x-simulator-compress header overrides it per request.
    #[arg(long)]
    compress: bool,
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("llm-simulator: cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                eprintln!("llm-simulator: cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    println!("llm-simulator: shutting down");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = Config {
        latency: Duration::from_millis(cli.latency_ms),
        token_delay: Duration::from_millis(cli.token_delay_ms),
        compress: cli.compress,
    };
    let listener = match tokio::net::TcpListener::bind(&cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llm-simulator: cannot listen on {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("llm-simulator listening on {addr}"),
        Err(_) => println!("llm-simulator listening on {}", cli.listen),
    }
    match serve(listener, app(config), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-simulator: server error: {e}");
            ExitCode::FAILURE
        }
    }
}
