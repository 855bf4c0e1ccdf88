//! `loadtest`: many concurrent keep-alive connections through a real Envoy running the shipped
//! `envoy/envoy.yaml` with the token-ratelimit filter, `ratelimit-service` and `llm-simulator`
//! (all on 127.0.0.1, started by the `e2e` harness), for a bounded time, with a mix of
//! streaming and non-streaming requests of every format from many users. It prints throughput,
//! latency percentiles, statuses and errors, the rate-limit calls per request and method, then
//! the token accounting. In admission mode checkReport (`--mode checkReport`):
//!
//! ```text
//! accounting: reported R = served S + estimated E: OK
//! ```
//!
//! where R is what the rate-limit service received through `Report`
//! (`ratelimit_reported_hits_total`), S the tokens the simulator served to requests whose
//! answer carried usage, and E the documented estimate the client computes for the requests
//! whose upstream sent no usage: the filter's fallback estimate (README, "The fallback
//! estimate"), computed with the filter's own counter (`e2e::prompt_estimate`, or
//! `e2e::unread_prompt_estimate` of the body's bytes in checkReport mode, where the filter
//! does not read the body; plus `e2e::answer_estimate_of` of the response body).
//! In admission mode reservation (`--mode reservation`, or `auto` against a service that
//! answers `Reserve`), R is what the service received through `Commit`
//! (`ratelimit_committed_hits_total`), and once the commits have drained no hold may be left:
//!
//! ```text
//! accounting: committed R = served S + estimated E: OK
//! holds: none left (reserved 0 on every counter, ratelimit_reservations_outstanding 0, ...)
//! ```
//!
//! Any difference is a MISMATCH, a hold still there after `--hold-wait` seconds is HOLDS LEFT,
//! and either makes the exit status 1.
//!
//! Replicas (`--replicas N`, which implies `--redis`; `--redis` alone runs one replica on
//! Redis): one `redis-server` of the run's own (`e2e::redis::Redis`), then N stacks whose
//! services run with `redis redis://127.0.0.1:<port>`, so that they share the counters as
//! Envoy replicas behind one Limitador with Redis do; connection i goes to Envoy i % N. The
//! accounting is over all of them: served is the sum of the simulators', charged the sum of
//! the services' metrics, the Envoy stats and the holds (each service shows the holds it
//! granted) are summed. With Redis the counters themselves are compared too: the gold users'
//! (their limit is never reached) sum of `max - remaining`, read through each service, must be
//! what was served to them plus their estimate:
//!
//! ```text
//! counters (Redis): G gold users' counters, sum of (max - remaining) C = served to them S + estimated E, ...: OK
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use e2e::{Options, Stack};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Load test of the token-ratelimit filter in a real Envoy (loopback only, bounded in time).
#[derive(Parser, Debug, Clone)]
#[command(name = "loadtest")]
struct Args {
    /// Seconds of load (new requests stop after it; requests in flight finish).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: u64,
    /// Concurrent client connections (one worker each, HTTP/1.1 keep-alive).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10000))]
    connections: u64,
    /// Distinct users (API keys `load-0` … `load-<users-1>`), each picked at random per request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    users: u32,
    /// Envoy worker threads (`--concurrency`).
    #[arg(long, default_value_t = 2)]
    envoy_concurrency: u32,
    /// Percent of users in group `free` (50 tokens per minute: they get 429s); the others are
    /// `gold`, whose limit is raised to `--gold-limit`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    free_percent: u32,
    /// Tokens per minute per gold user (the shipped 200 is raised so that gold users pass).
    #[arg(long, default_value_t = 100_000_000)]
    gold_limit: u64,
    /// The request mix as `kind=weight,...` (kinds: see the default).
    #[arg(
        long,
        default_value = "chat=24,chat-stream=15,chat-stream-inject=15,responses=6,responses-stream=6,\
messages=6,messages-stream=6,gemini=6,gemini-stream-sse=6,gemini-stream-array=4,chat-no-usage=3,chat-stream-no-usage=3"
    )]
    mix: String,
    /// Delay before each streamed word (`x-simulator-token-delay-ms`), to hold streams open.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
    /// Client runtime threads.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Envoy log levels to set through the admin API before the load, e.g. `wasm=debug` (the
    /// filter's debug lines: each failed and retried Report with its gRPC status).
    #[arg(long)]
    envoy_log: Option<String>,
    /// The filter's CheckRateLimit timeout (`rateLimitService.timeout`; shipped: 100ms).
    #[arg(long, default_value = "100ms")]
    check_timeout: String,
    /// Seed of the request generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Copy the logs and rendered configurations (envoy.log, ratelimit-service.log,
    /// llm-simulator.log, envoy.yaml, limits.yaml) to this directory at the end.
    #[arg(long)]
    keep_logs: Option<std::path::PathBuf>,
    /// Profile of the native stack binaries (ratelimit-service, llm-simulator,
    /// token-ratelimit): `dev` as `make build` builds them (target/debug), or `release`
    /// (target/release, build them first with `cargo build --release -p ratelimit-service
    /// -p llm-simulator -p token-ratelimit-cli --bins`).
    #[arg(long, default_value = "dev", value_parser = ["dev", "release"])]
    stack_profile: String,
    /// Admission mode (`rateLimitService.mode`): `reservation` (Reserve before the upstream,
    /// Commit after), `checkReport` (CheckRateLimit, Report per tick) or `auto` (reservation,
    /// checkReport when the service answers Reserve with UNIMPLEMENTED). Default: the mode of
    /// the shipped envoy/envoy.yaml.
    #[arg(long, value_parser = ["auto", "reservation", "checkReport"])]
    mode: Option<String>,
    /// In reservation mode, the longest wait (seconds) after the commits drained for the
    /// service to show no hold (`reserved` 0 on every counter of `/counters`,
    /// `ratelimit_reservations_outstanding` 0).
    #[arg(long, default_value_t = 10)]
    hold_wait: u64,
    /// Run ratelimit-service with `--reservations-unimplemented` (it plays Limitador 2.4:
    /// Reserve and Commit answer UNIMPLEMENTED, so `auto` falls back to checkReport).
    #[arg(long)]
    reservations_unimplemented: bool,
    /// Envoy replicas: start this many stacks (llm-simulator, ratelimit-service and Envoy
    /// each), whose services keep their counters in one Redis of the run's own (implies
    /// `--redis` when more than 1); connection i goes to Envoy i % N, and the accounting sums
    /// every replica.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: u32,
    /// Keep the counters in a Redis of the run's own (`redis-server` on a free loopback port,
    /// `e2e::redis::Redis`): every ratelimit-service runs with `redis redis://127.0.0.1:<port>`.
    #[arg(long)]
    redis: bool,
}

/// The request kinds of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    ChatStream,
    ChatStreamInject,
    Responses,
    ResponsesStream,
    Messages,
    MessagesStream,
    Gemini,
    GeminiStreamSse,
    GeminiStreamArray,
    ChatNoUsage,
    ChatStreamNoUsage,
}

const KINDS: [Kind; 12] = [
    Kind::Chat,
    Kind::ChatStream,
    Kind::ChatStreamInject,
    Kind::Responses,
    Kind::ResponsesStream,
    Kind::Messages,
    Kind::MessagesStream,
    Kind::Gemini,
    Kind::GeminiStreamSse,
    Kind::GeminiStreamArray,
    Kind::ChatNoUsage,
    Kind::ChatStreamNoUsage,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::ChatStream => "chat-stream",
            Kind::ChatStreamInject => "chat-stream-inject",
            Kind::Responses => "responses",
            Kind::ResponsesStream => "responses-stream",
            Kind::Messages => "messages",
            Kind::MessagesStream => "messages-stream",
            Kind::Gemini => "gemini",
            Kind::GeminiStreamSse => "gemini-stream-sse",
            Kind::GeminiStreamArray => "gemini-stream-array",
            Kind::ChatNoUsage => "chat-no-usage",
            Kind::ChatStreamNoUsage => "chat-stream-no-usage",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Chat => "POST /v1/chat/completions",
            Kind::ChatStream => "chat, stream, stream_options.include_usage",
            Kind::ChatStreamInject => "chat, stream, no stream_options (the filter adds include_usage)",
            Kind::Responses => "POST /v1/responses",
            Kind::ResponsesStream => "/v1/responses, stream",
            Kind::Messages => "POST /v1/messages (Anthropic)",
            Kind::MessagesStream => "/v1/messages, stream",
            Kind::Gemini => "POST /v1beta/models/sim:generateContent",
            Kind::GeminiStreamSse => ":streamGenerateContent?alt=sse",
            Kind::GeminiStreamArray => ":streamGenerateContent (JSON array)",
            Kind::ChatNoUsage => "chat, upstream sends no usage (estimate)",
            Kind::ChatStreamNoUsage => "chat, stream, filter adds include_usage, upstream ignores it (estimate)",
        }
    }

    fn no_usage(self) -> bool {
        matches!(self, Kind::ChatNoUsage | Kind::ChatStreamNoUsage)
    }

    fn streaming(self) -> bool {
        matches!(
            self,
            Kind::ChatStream
                | Kind::ChatStreamInject
                | Kind::ResponsesStream
                | Kind::MessagesStream
                | Kind::GeminiStreamSse
                | Kind::GeminiStreamArray
                | Kind::ChatStreamNoUsage
        )
    }

    /// `(path, body)` for a prompt of `prompt` and `completion` completion tokens.
    fn request(self, prompt: &str, completion: u64) -> (&'static str, Value) {
        let chat = |extra: Value| {
            let mut body = json!({"model": "sim", "messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": completion});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            body
        };
        let gemini = json!({"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                            "generationConfig": {"maxOutputTokens": completion}});
        match self {
            Kind::Chat | Kind::ChatNoUsage => ("/v1/chat/completions", chat(json!({}))),
            Kind::ChatStream => (
                "/v1/chat/completions",
                chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
            ),
            Kind::ChatStreamInject | Kind::ChatStreamNoUsage => {
                ("/v1/chat/completions", chat(json!({"stream": true})))
            }
            Kind::Responses => (
                "/v1/responses",
                json!({"model": "sim", "input": prompt, "max_output_tokens": completion}),
            ),
            Kind::ResponsesStream => (
                "/v1/responses",
                json!({"model": "sim", "input": prompt, "max_output_tokens": completion, "stream": true}),
            ),
            Kind::Messages => (
                "/v1/messages",
                json!({"model": "sim", "max_tokens": completion,
                       "messages": [{"role": "user", "content": prompt}]}),
            ),
            Kind::MessagesStream => (
                "/v1/messages",
                json!({"model": "sim", "max_tokens": completion, "stream": true,
                       "messages": [{"role": "user", "content": prompt}]}),
            ),
            Kind::Gemini => ("/v1beta/models/sim:generateContent", gemini),
            Kind::GeminiStreamSse => ("/v1beta/models/sim:streamGenerateContent?alt=sse", gemini),
            Kind::GeminiStreamArray => ("/v1beta/models/sim:streamGenerateContent", gemini),
        }
    }
}

fn parse_mix(mix: &str) -> Result<Vec<(Kind, u32)>, String> {
    let mut out = Vec::new();
    for part in mix.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let kind = KINDS
            .iter()
            .copied()
            .find(|k| k.name() == name.trim())
            .ok_or_else(|| {
                let names: Vec<_> = KINDS.iter().map(|k| k.name()).collect();
                format!("unknown kind `{name}` (kinds: {})", names.join(", "))
            })?;
        let weight: u32 = weight.trim().parse().map_err(|_| format!("bad weight in `{part}`"))?;
        if weight > 0 {
            out.push((kind, weight));
        }
    }
    if out.is_empty() {
        return Err("the mix is empty".into());
    }
    Ok(out)
}

/// The simulator's `by_user` key for requests whose answer has no usage, so that their served
/// tokens can be told apart from the others.
const NO_USAGE_USER: &str = "no-usage";

/// Counters of one request kind.
#[derive(Default, Clone)]
struct KindTally {
    sent: u64,
    ok: u64,
    limited: u64,
    other: u64,
    errors: u64,
    /// Tokens the simulator should have served for the 200s (the usage contract: prompt
    /// words + completion tokens).
    served_expected: u64,
    /// The documented estimate for the 200s of a no-usage kind.
    estimated: u64,
    /// Of `estimated`, the request's part (its text, or its bytes at 5 per token).
    estimated_request: u64,
    /// 200s whose body shows usage (`usage` / `usageMetadata`).
    usage_in_body: u64,
    /// Of `estimated`, the part of gold users' requests (what their counters were charged
    /// beyond the tokens served to them with usage).
    estimated_gold: u64,
}

struct Tally {
    latency: Histogram<u64>,
    first_byte: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    kinds: Vec<KindTally>,
    connections: u64,
    /// No-usage requests that failed after reaching the upstream: their estimate is unknown.
    no_usage_failed: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram"),
            first_byte: Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram"),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            kinds: vec![KindTally::default(); KINDS.len()],
            connections: 0,
            no_usage_failed: 0,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latency.add(&other.latency).expect("histogram");
        self.first_byte.add(&other.first_byte).expect("histogram");
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (a, b) in self.kinds.iter_mut().zip(other.kinds) {
            a.sent += b.sent;
            a.ok += b.ok;
            a.limited += b.limited;
            a.other += b.other;
            a.errors += b.errors;
            a.served_expected += b.served_expected;
            a.estimated += b.estimated;
            a.estimated_request += b.estimated_request;
            a.usage_in_body += b.usage_in_body;
            a.estimated_gold += b.estimated_gold;
        }
        self.connections += other.connections;
        self.no_usage_failed += other.no_usage_failed;
    }

    fn requests(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }
}

struct Config {
    /// The Envoy listeners: worker i connects to `addrs[i % len]`.
    addrs: Vec<SocketAddr>,
    users: u32,
    /// Users `load-<n>` with `n % 100 < free_percent` are in group `free`, the others `gold`.
    free_percent: u32,
    mix: Vec<(Kind, u32)>,
    token_delay_ms: u64,
    request_timeout: Duration,
    seed: u64,
    /// The filter reads request bodies (reservation mode): the estimate's prompt part is the
    /// request's text, else the body's bytes at 5 per token.
    body_read: bool,
}

const WORDS: [&str; 16] = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "rate", "limit",
    "envoy", "wasm", "stream", "usage", "budget",
];

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, &'static str> {
    let stream = TcpStream::connect(addr).await.map_err(|_| "connect")?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

struct Answer {
    status: u16,
    first_byte: Duration,
    body: Vec<u8>,
}

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    t0: Instant,
) -> Result<Answer, (&'static str, Option<u16>)> {
    let resp = sender.send_request(req).await.map_err(|_| ("send", None))?;
    let first_byte = t0.elapsed();
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    let mut incoming = resp.into_body();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|_| ("body", Some(status)))?;
        if let Some(data) = frame.data_ref() {
            body.extend_from_slice(data);
        }
    }
    Ok(Answer { status, first_byte, body })
}

async fn worker(id: u64, cfg: Arc<Config>, deadline: Instant, done: Arc<AtomicU64>) -> Tally {
    let mut t = Tally::new();
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let total_weight: u32 = cfg.mix.iter().map(|(_, w)| w).sum();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let addr = cfg.addrs[id as usize % cfg.addrs.len()];
    while Instant::now() < deadline {
        let mut pick = rng.u32(0..total_weight);
        let kind = cfg
            .mix
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .expect("weighted pick");
        let user = rng.u32(0..cfg.users);
        if one_request(&cfg, addr, &mut sender, &mut t, &mut rng, kind, user).await {
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
    t
}

/// Sends one request of `kind` as `load-<user>` on `sender` (connecting to `addr` first when
/// needed) and records it in `t`; false when no request could be sent (connection failed).
async fn one_request(
    cfg: &Config,
    addr: SocketAddr,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    t: &mut Tally,
    rng: &mut fastrand::Rng,
    kind: Kind,
    user: u32,
) -> bool {
    loop {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(addr).await {
                Ok(s) => {
                    t.connections += 1;
                    *sender = Some(s);
                }
                Err(e) => {
                    *t.errors.entry(e).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return false;
                }
            }
        }
        if sender.as_mut().expect("connected").ready().await.is_ok() {
            break;
        }
        // Closed while idle: not a request error, reconnect.
        *sender = None;
    }
    let s = sender.as_mut().expect("connected");

    let ki = KINDS.iter().position(|k| *k == kind).expect("kind");
    let words = rng.usize(1..=40);
    let prompt: Vec<&str> = (0..words).map(|_| WORDS[rng.usize(..WORDS.len())]).collect();
    let completion = rng.u64(1..=48);
    let (path, body) = kind.request(&prompt.join(" "), completion);
    let prompt_estimate = if cfg.body_read {
        e2e::prompt_estimate(path, &body)
    } else {
        e2e::unread_prompt_estimate(&serde_json::to_vec(&body).expect("json"))
    };
    let body = serde_json::to_vec(&body).expect("json");

    let mut req = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("authorization", format!("APIKEY load-{user}"));
    if kind.no_usage() {
        req = req
            .header("x-simulator-no-usage", "true")
            .header("x-simulator-user", NO_USAGE_USER);
    }
    if kind.streaming() && cfg.token_delay_ms > 0 {
        req = req.header("x-simulator-token-delay-ms", cfg.token_delay_ms.to_string());
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");

    t.kinds[ki].sent += 1;
    let t0 = Instant::now();
    let result = match tokio::time::timeout(cfg.request_timeout, exchange(s, req, t0)).await {
        Ok(r) => r,
        Err(_) => Err(("timeout", None)),
    };
    match result {
        Ok(a) => {
            let micros = t0.elapsed().as_micros().max(1) as u64;
            let _ = t.latency.record(micros.min(120_000_000));
            let _ = t.first_byte.record((a.first_byte.as_micros().max(1) as u64).min(120_000_000));
            *t.statuses.entry(a.status).or_default() += 1;
            let k = &mut t.kinds[ki];
            match a.status {
                200 => {
                    k.ok += 1;
                    k.served_expected += words as u64 + completion;
                    if mentions_usage(&a.body) {
                        k.usage_in_body += 1;
                    }
                    if kind.no_usage() {
                        let content_type = if kind.streaming() { "text/event-stream" } else { "application/json" };
                        let answer = e2e::answer_estimate_of(path, Some(content_type), None, &a.body);
                        k.estimated += prompt_estimate + answer;
                        k.estimated_request += prompt_estimate;
                        if user % 100 >= cfg.free_percent {
                            k.estimated_gold += prompt_estimate + answer;
                        }
                    }
                }
                429 => k.limited += 1,
                _ => k.other += 1,
            }
        }
        Err((what, status)) => {
            *t.errors.entry(what).or_default() += 1;
            t.kinds[ki].errors += 1;
            if kind.no_usage() && status != Some(429) {
                t.no_usage_failed += 1;
            }
            *sender = None;
        }
    }
    true
}

fn mentions_usage(body: &[u8]) -> bool {
    body.windows(5).any(|w| w == b"usage" || w == b"Usage")
}

/// A process's `/proc` facts.
struct ProcInfo {
    pid: u32,
}

impl ProcInfo {
    /// The first process (not this one) whose command line contains `needle`.
    fn find(needle: &str) -> Option<ProcInfo> {
        let me = std::process::id();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some(ProcInfo { pid })
        })
    }

    fn status_kb(&self, field: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// User + system CPU seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / clock_ticks())
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn self_cpu_seconds() -> Option<f64> {
    ProcInfo { pid: std::process::id() }.cpu_seconds()
}

fn self_status_kb(field: &str) -> Option<u64> {
    ProcInfo { pid: std::process::id() }.status_kb(field)
}

/// The edits to `envoy/envoy.yaml`: load users in the Lua identity table, the gold limit
/// raised, and both limits applied on every path (not only chat completions).
fn edits(args: &Args) -> Vec<(String, String)> {
    let lua = format!(
        concat!(
            "                  -- loadtest: `APIKEY load-<n>` is user load-<n>, group free when n % 100 < {free}, else gold.\n",
            "                  local function load_identity(key)\n",
            "                    local n = string.match(key, \"^load%-(%d+)$\")\n",
            "                    if n == nil then return nil end\n",
            "                    if tonumber(n) % 100 < {free} then return {{userid = \"load-\" .. n, groups = \"free\"}} end\n",
            "                    return {{userid = \"load-\" .. n, groups = \"gold\"}}\n",
            "                  end\n",
            "                  function envoy_on_request(request_handle)\n",
        ),
        free = args.free_percent
    );
    vec![
        ("                  function envoy_on_request(request_handle)\n".into(), lua),
        (
            "local identity = key and identities[key]".into(),
            "local identity = key and (identities[key] or load_identity(key))".into(),
        ),
        (
            "- {limit: 200, window: 1m}".into(),
            format!("- {{limit: {}, window: 1m}}", args.gold_limit),
        ),
    ]
}

/// The admission mode line of `envoy/envoy.yaml` (`mode: <mode>` of `rateLimitService`, with its
/// indentation and line end, for an edit) and the mode it names.
fn shipped_mode(config: &str) -> Result<(String, String), String> {
    let lines: Vec<&str> = config
        .split_inclusive('\n')
        .filter(|l| l.trim_start().starts_with("mode:"))
        .collect();
    match lines.as_slice() {
        [line] => {
            let mode = line.trim().trim_start_matches("mode:").split('#').next().unwrap_or("").trim();
            if !["auto", "reservation", "checkReport"].contains(&mode) {
                return Err(format!("envoy/envoy.yaml: unknown admission mode in `{}`", line.trim()));
            }
            Ok((line.to_string(), mode.to_string()))
        }
        [] => Err("envoy/envoy.yaml names no admission mode (`mode:` of rateLimitService)".into()),
        _ => Err(format!("envoy/envoy.yaml has {} `mode:` lines, expected one", lines.len())),
    }
}

/// The edits that make the `free` and `gold` limits apply on every path: their path predicate
/// (the one before the group predicate, which may span several lines) is removed.
fn every_path_edits(config: &str) -> Result<Vec<(String, String)>, String> {
    let lines: Vec<&str> = config.lines().collect();
    ["free", "gold"]
        .iter()
        .map(|group| {
            let needle = format!("exists(g, g == \"{group}\")");
            let i = lines
                .iter()
                .position(|l| l.contains("- predicate:") && l.contains(&needle))
                .ok_or_else(|| format!("no `{needle}` predicate in envoy/envoy.yaml"))?;
            let start = lines[..i]
                .iter()
                .rposition(|l| l.contains("- predicate:"))
                .ok_or_else(|| format!("no predicate before `{needle}`"))?;
            let block = lines[start..i].join("\n");
            if !block.contains("\"/v1/chat/completions\"") {
                return Err(format!("the predicate before `{needle}` is not the path predicate: `{}`", block.trim()));
            }
            Ok((format!("{block}\n{}\n", lines[i]), format!("{}\n", lines[i])))
        })
        .collect()
}

fn percentile_line(name: &str, h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "{name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (mean {:.2} ms)",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.mean() / 1000.0
    )
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cpus} CPU(s), {model}")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mix = match parse_mix(&args.mix) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("loadtest: --mix: {e}");
            return ExitCode::from(2);
        }
    };

    println!("machine: {}", machine());
    println!(
        "load: {} connections for {} s, {} users ({}% free: 50 tokens/min; the others gold: {} tokens/min), \
         envoy --concurrency {}, check timeout {}, client threads {}, seed {}",
        args.connections,
        args.duration,
        args.users,
        args.free_percent,
        args.gold_limit,
        args.envoy_concurrency,
        args.check_timeout,
        args.client_threads,
        args.seed
    );
    let replicas = args.replicas as usize;
    let use_redis = args.redis || replicas > 1;
    if use_redis {
        println!(
            "replicas: {replicas} (llm-simulator, ratelimit-service and Envoy each; connection i goes to Envoy i % {replicas}), \
             counters in one Redis"
        );
    }
    let total_weight: u32 = mix.iter().map(|(_, w)| w).sum();
    println!("mix:");
    for (k, w) in &mix {
        println!("  {:>5.1}%  {:<21} {}", *w as f64 * 100.0 / total_weight as f64, k.name(), k.describe());
    }

    // The harness takes the native binaries from $CARGO_TARGET_DIR/debug: for a release stack,
    // point it at a directory whose `debug` holds links to the release binaries.
    let _release_dir = if args.stack_profile == "release" {
        match release_target_dir() {
            Ok(d) => {
                // Safe: no other thread runs yet.
                std::env::set_var("CARGO_TARGET_DIR", d.path());
                Some(d)
            }
            Err(e) => {
                eprintln!("loadtest: --stack-profile release: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    println!("stack binaries: {} profile", args.stack_profile);

    let shipped = std::fs::read_to_string(e2e::repo_root().join("envoy/envoy.yaml")).unwrap_or_default();
    let mut config_edits = edits(&args);
    match every_path_edits(&shipped) {
        Ok(e) => config_edits.extend(e),
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    }
    let (mode_line, shipped_mode) = match shipped_mode(&shipped) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let mode = args.mode.clone().unwrap_or_else(|| shipped_mode.clone());
    if mode != shipped_mode {
        config_edits.push((mode_line.clone(), mode_line.replacen(&format!("mode: {shipped_mode}"), &format!("mode: {mode}"), 1)));
    }
    println!(
        "admission mode: {mode} ({}){}",
        if mode == shipped_mode { "as shipped" } else { "the shipped configuration says otherwise" },
        if args.reservations_unimplemented {
            "; ratelimit-service --reservations-unimplemented (Reserve and Commit answer UNIMPLEMENTED)"
        } else {
            ""
        }
    );
    let check_timeout: &'static str = Box::leak(args.check_timeout.clone().into_boxed_str());
    // One Redis for every replica's service (flags before the `redis URL` storage subcommand).
    let redis = use_redis.then(e2e::redis::Redis::start_new);
    let mut service_args = Vec::new();
    if args.reservations_unimplemented {
        service_args.push("--reservations-unimplemented".to_string());
    }
    if let Some(r) = &redis {
        service_args.extend(r.service_args());
        println!("redis: {} (redis-server, data and log in {})", r.url(), r.dir().display());
    }
    let stacks: Vec<Stack> = (0..replicas)
        .map(|_| {
            Stack::start(Options {
                edits: config_edits.clone(),
                check_timeout,
                concurrency: args.envoy_concurrency,
                service_args: service_args.clone(),
                ..Options::default()
            })
        })
        .collect();
    for (i, s) in stacks.iter().enumerate() {
        let p = s.ports;
        println!(
            "{}: envoy 127.0.0.1:{} (admin {}), ratelimit-service gRPC {} HTTP {}, llm-simulator {}; logs in {}",
            if replicas == 1 { "stack".to_string() } else { format!("replica {i}") },
            p.listener,
            p.admin,
            p.rls,
            p.rls_http,
            p.llm,
            s.dir.path().display()
        );
    }
    if let Some(levels) = &args.envoy_log {
        for s in &stacks {
            match admin_post(s.ports.admin, &format!("/logging?{levels}")) {
                Ok(status) => println!("envoy log levels `{levels}`: {status}"),
                Err(e) => eprintln!("loadtest: setting envoy log levels: {e}"),
            }
        }
    }
    let mut procs: Vec<(String, Option<ProcInfo>)> = Vec::new();
    for (i, s) in stacks.iter().enumerate() {
        let name = |n: &str| if replicas == 1 { n.to_string() } else { format!("{n}-{i}") };
        procs.push((name("envoy"), ProcInfo::find(&s.envoy_config.display().to_string())));
        procs.push((
            name("ratelimit-service"),
            ProcInfo::find(&s.dir.path().join("limits.yaml").display().to_string()),
        ));
        procs.push((name("llm-simulator"), ProcInfo::find(&format!("--listen 127.0.0.1:{}", s.ports.llm))));
    }
    if let Some(r) = &redis {
        // redis-server retitles itself `redis-server 127.0.0.1:<port>`.
        let found = ProcInfo::find(&format!("redis-server 127.0.0.1:{}", r.port))
            .or_else(|| ProcInfo::find(&format!("--port {} --bind", r.port)));
        procs.push(("redis-server".to_string(), found));
    }
    let cpu_before: Vec<Option<f64>> = procs
        .iter()
        .map(|(_, p)| p.as_ref().and_then(ProcInfo::cpu_seconds))
        .collect();
    let self_cpu_before = self_cpu_seconds();

    let cfg = Arc::new(Config {
        addrs: stacks
            .iter()
            .map(|s| SocketAddr::from(([127, 0, 0, 1], s.ports.listener)))
            .collect(),
        users: args.users,
        free_percent: args.free_percent,
        mix: mix.clone(),
        token_delay_ms: args.token_delay_ms,
        request_timeout: Duration::from_secs(args.request_timeout),
        seed: args.seed,
        // `auto` reserves against ratelimit-service, which answers Reserve.
        body_read: mode != "checkReport",
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");

    // Sanity: one request of each kind in the mix from one gold user, before the clock starts
    // (counted in the accounting like every other request).
    // With replicas, through each Envoy in turn.
    let mut tally = Tally::new();
    let first_request = Instant::now();
    let gold_user = (0..args.users).find(|n| n % 100 >= args.free_percent);
    if let Some(user) = gold_user {
        let mut bad = Vec::new();
        let mut rng = fastrand::Rng::with_seed(args.seed ^ 0xfeed);
        for (i, addr) in cfg.addrs.iter().enumerate() {
            runtime.block_on(async {
                let mut sender = None;
                for (kind, _) in &mix {
                    let mut t = Tally::new();
                    one_request(&cfg, *addr, &mut sender, &mut t, &mut rng, *kind, user).await;
                    if t.statuses.get(&200) != Some(&1) {
                        bad.push((
                            i,
                            format!("{}: statuses {:?}, errors {:?}", kind.name(), t.statuses, t.errors),
                        ));
                    }
                    tally.merge(t);
                }
            });
        }
        if !bad.is_empty() {
            for (i, s) in stacks.iter().enumerate() {
                if bad.iter().any(|(r, _)| *r == i) {
                    eprintln!("loadtest: sanity requests failed (envoy log: {}):", s.envoy.log.display());
                    for (_, b) in bad.iter().filter(|(r, _)| *r == i) {
                        eprintln!("  {b}");
                    }
                }
            }
            return ExitCode::FAILURE;
        }
        if replicas == 1 {
            println!("sanity: one request of each kind as load-{user}: 200");
        } else {
            println!("sanity: one request of each kind as load-{user} through each of the {replicas} Envoys: 200");
        }
    }

    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let load = runtime.block_on(async {
        let progress = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut last = 0;
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_secs(10),
                    Duration::from_secs(10),
                );
                loop {
                    tick.tick().await;
                    let n = done.load(Ordering::Relaxed);
                    eprintln!(
                        "  t={:>3.0}s  {n} requests, {:.0}/s over the last 10 s",
                        start.elapsed().as_secs_f64(),
                        (n - last) as f64 / 10.0
                    );
                    last = n;
                }
            })
        };
        let workers: Vec<_> = (0..args.connections)
            .map(|id| tokio::spawn(worker(id, cfg.clone(), deadline, done.clone())))
            .collect();
        // Per replica first (worker i ran against Envoy i % replicas).
        let mut per_replica: Vec<Tally> = (0..replicas).map(|_| Tally::new()).collect();
        let bound = Duration::from_secs(args.duration + args.request_timeout + 10);
        let joined = tokio::time::timeout(bound, async {
            for (id, w) in workers.into_iter().enumerate() {
                if let Ok(t) = w.await {
                    per_replica[id % replicas].merge(t);
                }
            }
        })
        .await;
        progress.abort();
        if joined.is_err() {
            eprintln!("loadtest: workers did not finish within {} s", bound.as_secs());
        }
        per_replica
    });
    let per_replica: Vec<(u64, BTreeMap<u16, u64>, u64)> = load
        .iter()
        .map(|t| (t.requests(), t.statuses.clone(), t.errors.values().sum()))
        .collect();
    let load = load.into_iter().fold(Tally::new(), |mut total, t| {
        total.merge(t);
        total
    });
    let elapsed = start.elapsed();
    runtime.shutdown_timeout(Duration::from_secs(1));
    let load_requests = load.requests();
    tally.merge(load);

    // --- Throughput and latency.
    println!();
    println!("== load ({:.1} s) ==", elapsed.as_secs_f64());
    println!(
        "requests: {load_requests} in {:.1} s = {:.0} requests/s over {} connections ({} connects)",
        elapsed.as_secs_f64(),
        load_requests as f64 / elapsed.as_secs_f64(),
        args.connections,
        tally.connections
    );
    println!("{}", percentile_line("latency (complete response)", &tally.latency));
    println!("{}", percentile_line("latency (response headers) ", &tally.first_byte));
    let statuses: Vec<String> = tally.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    println!("statuses (with the {} sanity requests): {}", mix.len() * replicas, statuses.join(", "));
    let errors: Vec<String> = tally.errors.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    println!(
        "transport errors: {}",
        if errors.is_empty() { "0".to_string() } else { errors.join(", ") }
    );
    if replicas > 1 {
        for (i, ((requests, statuses, errors), s)) in per_replica.iter().zip(&stacks).enumerate() {
            let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!(
                "  envoy {i} (127.0.0.1:{}): {requests} requests = {:.0} requests/s over {} connections; statuses {}; \
                 transport errors {errors}",
                s.ports.listener,
                *requests as f64 / elapsed.as_secs_f64(),
                (args.connections as usize + replicas - 1 - i) / replicas,
                statuses.join(", ")
            );
        }
    }
    println!(
        "{:<21} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>12} {:>10}",
        "kind", "sent", "200", "429", "other", "errors", "usage seen", "served(exp)", "estimated"
    );
    for (i, k) in tally.kinds.iter().enumerate() {
        if k.sent == 0 {
            continue;
        }
        println!(
            "{:<21} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>12} {:>10}",
            KINDS[i].name(),
            k.sent,
            k.ok,
            k.limited,
            k.other,
            k.errors,
            k.usage_in_body,
            k.served_expected,
            k.estimated
        );
    }

    // --- Accounting.
    // Summed over the replicas' simulators (every number of their JSON).
    let served_json = stacks.iter().map(Stack::served).fold(Value::Null, json_sum);
    let served_total = served_json["total_tokens"].as_u64().unwrap_or(0);
    let served_no_usage = served_json["by_user"][NO_USAGE_USER]["total_tokens"].as_u64().unwrap_or(0);
    let served = served_total - served_no_usage;
    let estimated: u64 = tally.kinds.iter().map(|k| k.estimated).sum();
    let expected_total: u64 = tally.kinds.iter().map(|k| k.served_expected).sum();
    let expected_no_usage: u64 = tally
        .kinds
        .iter()
        .enumerate()
        .filter(|(i, _)| KINDS[*i].no_usage())
        .map(|(_, k)| k.served_expected)
        .sum();
    // Envoy stats summed over the Envoys.
    let envoy_stat = |n: &str| stacks.iter().map(|s| s.envoy_stat(n)).sum::<u64>();
    let stat = |n: &str| envoy_stat(&format!("wasmcustom.token_ratelimit.{n}"));

    // Drain: wait until the service has everything Envoy queued (tokens_reported.total minus
    // tokens_dropped, through Report or Commit) and the figure has been stable for a second.
    let drain_start = Instant::now();
    let mut service;
    let mut stable_since: Option<(u64, Instant)> = None;
    loop {
        service = ServiceMetrics::read(&stacks);
        let charged = service.reported() + service.committed();
        let queued = stat("tokens_reported.total") - stat("tokens_dropped");
        match stable_since {
            Some((r, since)) if r == charged && charged >= queued => {
                if since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
            _ => stable_since = Some((charged, Instant::now())),
        }
        if drain_start.elapsed() > Duration::from_secs(20) {
            println!("reports and commits did not drain within 20 s (service {charged}, envoy queued {queued})");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let drain = drain_start.elapsed();
    let (reported, committed) = (service.reported(), service.committed());

    // The mode the filter ran in: `auto` reserves unless the service answered UNIMPLEMENTED.
    let unimplemented = stat("reservations_unimplemented");
    let effective = match mode.as_str() {
        "auto" if unimplemented > 0 => "checkReport",
        "auto" => "reservation",
        m => m,
    };

    // Holds: in reservation mode none may be left once the commits are in.
    let holds = (effective == "reservation").then(|| {
        let start = Instant::now();
        let first = Holds::read(&stacks);
        let mut last = first.clone();
        while !last.none() && start.elapsed() < Duration::from_secs(args.hold_wait) {
            std::thread::sleep(Duration::from_millis(200));
            last = Holds::read(&stacks);
        }
        (first, last, start.elapsed())
    });

    println!();
    println!("== accounting ==");
    println!(
        "admission mode: {mode}{}",
        match (mode.as_str(), effective) {
            ("auto", "checkReport") => format!(
                " -> checkReport (the service answered Reserve with UNIMPLEMENTED: reservations_unimplemented {unimplemented})"
            ),
            ("auto", _) => " -> reservation (the service answers Reserve)".to_string(),
            _ => String::new(),
        }
    );
    println!(
        "simulator served: {served_total} tokens in {} upstream requests (client-side contract: {expected_total}: {})",
        served_json["requests"],
        if served_total == expected_total { "same" } else { "DIFFERENT" }
    );
    println!(
        "  of which with usage in the answer: {served}; without usage (no-usage requests): {served_no_usage} \
         (contract: {expected_no_usage})"
    );
    if let Some(f) = served_json["by_format"].as_object() {
        let by: Vec<String> = f
            .iter()
            .map(|(k, v)| format!("{k} {}", v["total_tokens"]))
            .collect();
        println!("  by format: {}", by.join(", "));
    }
    let estimated_request: u64 = tally.kinds.iter().map(|k| k.estimated_request).sum();
    println!(
        "tokens estimated (client, no-usage 200s): {estimated} (request bodies {estimated_request}, response bodies {})",
        estimated - estimated_request
    );
    println!(
        "tokens charged at the rate-limit service: {committed} through Commit, {reported} through Report (drained in {:.1} s)",
        drain.as_secs_f64()
    );
    if tally.no_usage_failed > 0 {
        println!(
            "note: {} no-usage requests failed in transit; their estimate is unknown to the client",
            tally.no_usage_failed
        );
    }

    // --- Calls per request and method, from the service's own counts (sanity requests included).
    let sent = tally.requests();
    let checked = stat("requests_checked");
    println!();
    println!(
        "== rate-limit calls per request (ratelimit-service /metrics; {sent} requests sent, {checked} checked by the filter) =="
    );
    println!("  {:<16} {:>9} {:>12} {:>16}", "method", "calls", "per request", "per checked req.");
    let methods = [
        ("Reserve", service.get("ratelimit_reserve_calls_total")),
        ("Commit", service.get("ratelimit_commit_calls_total")),
        ("CheckRateLimit", service.get("ratelimit_check_calls_total")),
        ("Report", service.get("ratelimit_report_calls_total")),
        ("ShouldRateLimit", service.get("ratelimit_should_rate_limit_calls_total")),
    ];
    let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    let all = ("all", methods.iter().map(|(_, n)| n).sum::<u64>());
    for (name, n) in methods.into_iter().chain(std::iter::once(all)) {
        println!("  {name:<16} {n:>9} {:>12.4} {:>16.4}", per(n, sent), per(n, checked));
    }
    if replicas > 1 {
        // Each replica: what its Envoy served and checked, what its service answered.
        for (i, s) in stacks.iter().enumerate() {
            let m = ServiceMetrics::read(std::slice::from_ref(s));
            println!(
                "  replica {i}: envoy downstream_rq_total {} (2xx {}, 4xx {}, 5xx {}), checked {}; service Reserve {}, \
                 Commit {}, CheckRateLimit {}, Report {}; charged {} through Commit, {} through Report",
                s.envoy_stat("http.llm.downstream_rq_total"),
                s.envoy_stat("http.llm.downstream_rq_2xx"),
                s.envoy_stat("http.llm.downstream_rq_4xx"),
                s.envoy_stat("http.llm.downstream_rq_5xx"),
                s.envoy_stat("wasmcustom.token_ratelimit.requests_checked"),
                m.get("ratelimit_reserve_calls_total"),
                m.get("ratelimit_commit_calls_total"),
                m.get("ratelimit_check_calls_total"),
                m.get("ratelimit_report_calls_total"),
                m.committed(),
                m.reported()
            );
        }
    }

    // --- Envoy and process figures.
    println!();
    println!(
        "== envoy /stats (token_ratelimit){} ==",
        if replicas > 1 { format!(", summed over the {replicas} Envoys") } else { String::new() }
    );
    let envoy_lines = |filter: &str| {
        let texts: Vec<String> = stacks
            .iter()
            .map(|s| s.get(&format!("http://127.0.0.1:{}/stats?filter={filter}", s.ports.admin)))
            .collect();
        summed_lines(&texts, ": ")
    };
    for filter in [
        "token_ratelimit",
        "^http\\.llm\\.downstream_(rq_[0-9]xx|rq_total|cx_total|cx_destroy_remote_active_rq|rq_timeout)",
        "^cluster\\.ratelimit\\.(upstream_rq_(total|timeout|time|pending_overflow)|upstream_cx_total|grpc\\.)",
        "^http\\.llm\\.downstream_rq_time$",
    ] {
        for l in envoy_lines(filter) {
            println!("  {l}");
        }
    }
    println!();
    println!(
        "== ratelimit-service /metrics{} ==",
        if replicas > 1 { format!(", summed over the {replicas} services") } else { String::new() }
    );
    let metric_texts: Vec<String> = service
        .texts
        .iter()
        .map(|t| {
            t.lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("limitador_up"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    for l in summed_lines(&metric_texts, " ") {
        println!("  {l}");
    }
    println!();
    println!("== processes ==");
    let w = procs.iter().map(|(n, _)| n.len() + 1).max().unwrap_or(0).max(18);
    for ((name, p), before) in procs.iter().zip(&cpu_before) {
        match p {
            Some(p) => {
                let cpu = match (p.cpu_seconds(), before) {
                    (Some(a), Some(b)) => format!("{:.1} s CPU during the run", a - b),
                    _ => "CPU ?".into(),
                };
                println!(
                    "  {name:<w$} pid {:<8} peak RSS (VmHWM) {:>7} kB, RSS now {:>7} kB, {cpu}",
                    p.pid,
                    p.status_kb("VmHWM").unwrap_or(0),
                    p.status_kb("VmRSS").unwrap_or(0)
                );
            }
            None => println!("  {name:<w$} (process not found)"),
        }
    }
    if let (Some(a), Some(b)) = (self_cpu_seconds(), self_cpu_before) {
        println!(
            "  {:<w$} pid {:<8} peak RSS (VmHWM) {:>7} kB, {:.1} s CPU during the run",
            "loadtest",
            std::process::id(),
            self_status_kb("VmHWM").unwrap_or(0),
            a - b
        );
    }

    if let Some(dir) = &args.keep_logs {
        // With replicas, each one's in `replica-<i>/`, and Redis's log as `redis.log`.
        for (i, s) in stacks.iter().enumerate() {
            let to = if replicas == 1 { dir.clone() } else { dir.join(format!("replica-{i}")) };
            let _ = std::fs::create_dir_all(&to);
            for f in ["envoy.log", "ratelimit-service.log", "llm-simulator.log", "envoy.yaml", "limits.yaml"] {
                let _ = std::fs::copy(s.dir.path().join(f), to.join(f));
            }
        }
        if let Some(r) = &redis {
            let _ = std::fs::write(dir.join("redis.log"), r.output());
        }
        println!("  logs and configurations copied to {}", dir.display());
    }

    // Where a difference comes from: the filter's own figure (tokens it queued for Report or
    // Commit) against served + estimated, and the service's figure against what was queued.
    let queued = stat("tokens_reported.total");
    let (charged, via) = if effective == "reservation" { (committed, "Commit") } else { (reported, "Report") };
    println!();
    println!(
        "filter:   tokens queued for {via} {queued} {} served {served} + estimated {estimated}",
        if queued == served + estimated { "=" } else { "!=" }
    );
    // Every checked request ends in one admission outcome; one that got none went on (or ended)
    // before its check or reservation was answered, and is charged nothing.
    let outcomes = stat("requests_allowed")
        + stat("requests_limited")
        + stat("failure_mode_allowed")
        + stat("failure_mode_denied");
    println!(
        "admission: {checked} requests checked, {outcomes} admission outcomes (allowed {}, limited {}, failure mode \
         allowed {} / denied {}){}",
        stat("requests_allowed"),
        stat("requests_limited"),
        stat("failure_mode_allowed"),
        stat("failure_mode_denied"),
        if outcomes < checked {
            format!(": {} requests got no admission outcome", checked - outcomes)
        } else {
            String::new()
        }
    );
    if effective == "reservation" {
        println!(
            "delivery: service received {committed} of {queued} queued ({:+}); Commit calls: envoy dispatched {} \
             (retries {}, dropped {} with {} tokens), service received {} ({} duplicates ignored); \
             holds that expired before their commit: {}",
            committed as i128 - queued as i128,
            stat("commits_sent"),
            stat("commits_retried"),
            stat("commits_dropped"),
            stat("tokens_dropped"),
            service.get("ratelimit_commit_calls_total"),
            service.get("ratelimit_commit_duplicates_total"),
            stat("reservations_expired")
        );
        if reported > 0 {
            println!("note: {reported} tokens reached the service through Report in reservation mode");
        }
    } else {
        println!(
            "delivery: service received {reported} of {queued} queued ({:+}); Report calls: envoy dispatched {} \
             (retries {}, dropped {} with {} tokens), service received {}",
            reported as i128 - queued as i128,
            stat("reports_sent"),
            stat("reports_retried"),
            stat("reports_dropped"),
            stat("tokens_dropped"),
            service.get("ratelimit_report_calls_total")
        );
        if committed > 0 {
            println!("note: {committed} tokens reached the service through Commit in checkReport mode");
        }
    }

    println!();
    let exact = charged == served + estimated;
    let what = if effective == "reservation" { "committed" } else { "reported" };
    if exact {
        println!("accounting: {what} {charged} = served {served} + estimated {estimated}: OK");
    } else {
        let diff = charged as i128 - (served + estimated) as i128;
        println!(
            "accounting: {what} {charged} != served {served} + estimated {estimated} = {}: MISMATCH ({diff:+})",
            served + estimated
        );
    }
    let mut holds_ok = true;
    if let Some((first, last, waited)) = &holds {
        println!("holds right after the drain: {}", first.describe());
        if last.none() {
            println!("holds: none left after {:.1} s ({})", waited.as_secs_f64(), last.describe());
        } else {
            holds_ok = false;
            println!(
                "holds: HOLDS LEFT after {:.1} s (--hold-wait {}): {}; admission calls that failed in Envoy: \
                 {} (service_errors; cluster.ratelimit.upstream_rq_timeout {}): a hold the service granted \
                 after Envoy gave up on its Reserve stays until its TTL",
                waited.as_secs_f64(),
                args.hold_wait,
                last.describe(),
                stat("service_errors"),
                envoy_stat("cluster.ratelimit.upstream_rq_timeout")
            );
        }
    }
    // With Redis, the counters themselves: a gold user's limit is never reached, so its
    // counter's `max - remaining` is what it was charged (a free user's stops at its max), as
    // long as no counter started a second window. Read through every service: the same
    // counters (Redis) each time.
    let mut counters_ok = true;
    if use_redis {
        let is_gold = |key: &str| {
            key.strip_prefix("APIKEY load-")
                .or_else(|| key.strip_prefix("load-"))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n % 100 >= args.free_percent)
        };
        let served_gold: u64 = served_json["by_user"]
            .as_object()
            .map(|users| {
                users
                    .iter()
                    .filter(|(k, _)| is_gold(k))
                    .map(|(_, v)| v["total_tokens"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        let estimated_gold: u64 = tally.kinds.iter().map(|k| k.estimated_gold).sum();
        let expected = served_gold + estimated_gold;
        let reads: Vec<(u64, u64, u64)> = stacks
            .iter()
            .map(|s| {
                let list = s.counters().as_array().cloned().unwrap_or_default();
                let gold: Vec<&Value> = list
                    .iter()
                    .filter(|c| {
                        c["set_variables"]
                            .as_object()
                            .is_some_and(|vars| vars.values().any(|v| v.as_str().is_some_and(is_gold)))
                    })
                    .collect();
                let charged: u64 = gold
                    .iter()
                    .map(|c| {
                        c["limit"]["max_value"]
                            .as_u64()
                            .unwrap_or(0)
                            .saturating_sub(c["remaining"].as_u64().unwrap_or(0))
                    })
                    .sum();
                let window = gold.iter().filter_map(|c| c["limit"]["seconds"].as_u64()).min().unwrap_or(0);
                (charged, gold.len() as u64, window)
            })
            .collect();
        let since_first = first_request.elapsed().as_secs_f64();
        let window = reads.iter().map(|r| r.2).min().unwrap_or(0);
        let (charged_gold, gold_counters, _) = reads[0];
        let same = reads.iter().all(|r| r.0 == charged_gold && r.1 == gold_counters);
        let through = if replicas > 1 {
            format!(
                ", {} through the {replicas} services",
                if same { "the same".to_string() } else { format!("DIFFERENT: {reads:?}") }
            )
        } else {
            String::new()
        };
        if window == 0 {
            println!(
                "counters (Redis): not compared: no live gold user's counter left ({since_first:.0} s since the first \
                 request: their windows ended)"
            );
        } else if since_first >= window as f64 {
            println!(
                "counters (Redis): not compared: {since_first:.0} s since the first request, the limits' window is \
                 {window} s (counters may have started again)"
            );
        } else if charged_gold == expected && same {
            println!(
                "counters (Redis): {gold_counters} gold users' counters, sum of (max - remaining) {charged_gold} = \
                 served to them {served_gold} + estimated {estimated_gold}{through}: OK"
            );
        } else {
            counters_ok = false;
            println!(
                "counters (Redis): {gold_counters} gold users' counters, sum of (max - remaining) {charged_gold} {} \
                 served to them {served_gold} + estimated {estimated_gold} = {expected}{through}: MISMATCH ({:+})",
                if charged_gold == expected { "=" } else { "!=" },
                charged_gold as i128 - expected as i128
            );
        }
        // The free users' budget is one across the replicas: what one free user was served
        // (with usage in the answer) stays within one limit, not one per replica (in
        // checkReport a request admitted under the limit may take it past: informational).
        if window > 0 && since_first < window as f64 {
            let is_free = |key: &str| {
                key.strip_prefix("APIKEY load-")
                    .or_else(|| key.strip_prefix("load-"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n % 100 < args.free_percent)
            };
            let free_limit = stacks[0]
                .counters()
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["set_variables"]
                        .as_object()
                        .is_some_and(|vars| vars.values().any(|v| v.as_str().is_some_and(is_free)))
                })
                .and_then(|c| c["limit"]["max_value"].as_u64());
            let free: Vec<u64> = served_json["by_user"]
                .as_object()
                .map(|users| {
                    users
                        .iter()
                        .filter(|(k, _)| is_free(k))
                        .map(|(_, v)| v["total_tokens"].as_u64().unwrap_or(0))
                        .collect()
                })
                .unwrap_or_default();
            if let (Some(limit), Some(most)) = (free_limit, free.iter().max()) {
                println!(
                    "free users (one budget of {limit} per {window} s across the replicas): {} served, the most to one \
                     {most} tokens, {} over {limit}",
                    free.len(),
                    free.iter().filter(|t| **t > limit).count()
                );
            }
        }
    }
    let ok = exact && holds_ok && counters_ok && tally.kinds.iter().map(|k| k.ok).sum::<u64>() > 0;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One read of every service's `/metrics` (one text per replica).
struct ServiceMetrics {
    texts: Vec<String>,
}

impl ServiceMetrics {
    fn read(stacks: &[Stack]) -> ServiceMetrics {
        ServiceMetrics {
            texts: stacks
                .iter()
                .map(|s| s.get(&format!("http://127.0.0.1:{}/metrics", s.ports.rls_http)))
                .collect(),
        }
    }

    /// The sum of metric `name` over its label sets and the services (0 when absent).
    fn get(&self, name: &str) -> u64 {
        self.texts
            .iter()
            .flat_map(|t| t.lines())
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = if rest.starts_with('{') {
                    rest.rsplit_once('}')?.1
                } else if rest.starts_with(' ') {
                    rest
                } else {
                    return None;
                };
                value.trim().parse::<f64>().ok()
            })
            .map(|v| v as u64)
            .sum()
    }

    /// Tokens added by `Report`.
    fn reported(&self) -> u64 {
        self.get("ratelimit_reported_hits_total")
    }

    /// Tokens added by `Commit`.
    fn committed(&self) -> u64 {
        self.get("ratelimit_committed_hits_total")
    }
}

/// The holds the service shows: per counter (`/counters`, `reserved`) and in its gauges.
#[derive(Clone)]
struct Holds {
    counters_with_holds: u64,
    counters: u64,
    reserved: u64,
    outstanding: u64,
    outstanding_hits: u64,
}

impl Holds {
    /// Summed over the services: each shows only the holds it granted (`reserved`); with Redis
    /// they list the same counters, each counted once (by its limit and variables).
    fn read(stacks: &[Stack]) -> Holds {
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        for s in stacks {
            for c in s.counters().as_array().cloned().unwrap_or_default() {
                let key = format!("{} {}", c["limit"], c["set_variables"]);
                *held.entry(key).or_default() += c["reserved"].as_u64().unwrap_or(0);
            }
        }
        let metrics = ServiceMetrics::read(stacks);
        Holds {
            counters_with_holds: held.values().filter(|r| **r > 0).count() as u64,
            counters: held.len() as u64,
            reserved: held.values().sum(),
            outstanding: metrics.get("ratelimit_reservations_outstanding"),
            outstanding_hits: metrics.get("ratelimit_reserved_hits_outstanding"),
        }
    }

    fn none(&self) -> bool {
        self.reserved == 0 && self.outstanding == 0 && self.outstanding_hits == 0
    }

    fn describe(&self) -> String {
        format!(
            "{} of {} live counters with reserved > 0 (sum {}), ratelimit_reservations_outstanding {}, \
             ratelimit_reserved_hits_outstanding {}",
            self.counters_with_holds, self.counters, self.reserved, self.outstanding, self.outstanding_hits
        )
    }
}

/// `a + b` for JSON: numbers added (as u64), objects merged key by key, `null` the neutral
/// element; otherwise `b`. Sums the simulators' `/_simulator/stats`.
fn json_sum(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Null, b) => b,
        (a, Value::Null) => a,
        (Value::Number(x), Value::Number(y)) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) => json!(x + y),
            _ => Value::Number(y),
        },
        (Value::Object(mut x), Value::Object(y)) => {
            for (k, v) in y {
                let sum = json_sum(x.remove(&k).unwrap_or(Value::Null), v);
                x.insert(k, sum);
            }
            Value::Object(x)
        }
        (_, b) => b,
    }
}

/// The lines of several texts of `name<sep>value` lines (Envoy's `/stats`, Prometheus text),
/// summed by name when the value is an integer, in the order of first appearance; a line
/// whose value is not an integer (a histogram's quantiles) is kept once per text, its name
/// suffixed ` [<i>]` (the text's index). One text comes back as it is.
fn summed_lines(texts: &[String], sep: &str) -> Vec<String> {
    if texts.len() == 1 {
        return texts[0].lines().map(str::to_string).collect();
    }
    let mut order: Vec<String> = Vec::new();
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    let mut other: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, t) in texts.iter().enumerate() {
        for l in t.lines().filter(|l| !l.trim().is_empty()) {
            let (name, value) = match l.rsplit_once(sep) {
                Some((n, v)) if sep == " " => (n.to_string(), v.trim()),
                _ => match l.split_once(sep) {
                    Some((n, v)) => (n.to_string(), v.trim()),
                    None => (l.to_string(), ""),
                },
            };
            if !sums.contains_key(&name) && !other.contains_key(&name) {
                order.push(name.clone());
            }
            match value.parse::<u64>() {
                Ok(v) if !other.contains_key(&name) => *sums.entry(name).or_default() += v,
                _ => other.entry(name).or_default().push(format!("{value} [{i}]")),
            }
        }
    }
    order
        .into_iter()
        .flat_map(|name| match other.get(&name) {
            Some(values) => values.iter().map(|v| format!("{name}{sep}{v}")).collect::<Vec<_>>(),
            None => vec![format!("{name}{sep}{}", sums[&name])],
        })
        .collect()
}

/// A temporary target directory for the harness: `debug/<bin>` links to `target/release/<bin>`,
/// `wasm32-wasip1` to the real one.
fn release_target_dir() -> Result<tempfile::TempDir, String> {
    let root = e2e::repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir(dir.path().join("debug")).map_err(|e| e.to_string())?;
    for bin in ["token-ratelimit", "ratelimit-service", "llm-simulator"] {
        let src = target.join("release").join(bin);
        if !src.exists() {
            return Err(format!("{} is missing", src.display()));
        }
        std::os::unix::fs::symlink(&src, dir.path().join("debug").join(bin)).map_err(|e| e.to_string())?;
    }
    std::os::unix::fs::symlink(target.join("wasm32-wasip1"), dir.path().join("wasm32-wasip1"))
        .map_err(|e| e.to_string())?;
    Ok(dir)
}

/// `POST path` to Envoy's admin listener; returns the status line.
fn admin_post(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(c, "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out.lines().next().unwrap_or("").to_string())
}
