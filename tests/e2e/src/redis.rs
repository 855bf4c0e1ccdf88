//! A Redis server of the test's own ([`Redis`]): `redis-server` (the Debian package, or
//! `$REDIS_SERVER`) on a free loopback port, its data in a temporary directory with an
//! append-only file synced on every write, so that [`Redis::stop`] then [`Redis::start`] (an
//! outage) keeps every key, as a Redis with persistence does when it restarts. Point a
//! `ratelimit-service` at it with [`Redis::service_args`] in [`crate::Options::service_args`].
//!
//! Readiness and commands go over a plain TCP connection in RESP (Redis's protocol), so the
//! harness needs no Redis client library.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, wait_until, Process};

/// The Debian package that provides `redis-server`.
const INSTALL_HINT: &str = "install redis-server (Debian package: apt-get install redis-server)";

/// A `redis-server` on `127.0.0.1`, killed (SIGKILL) when dropped.
pub struct Redis {
    /// The port it listens on, the same across [`Redis::stop`] and [`Redis::start`].
    pub port: u16,
    /// The running server; `None` while stopped.
    process: Option<Process>,
    /// The data (`appendonlydir/`) and the logs (`redis-<n>.log`, one per start).
    dir: tempfile::TempDir,
    /// How often it was started.
    starts: u32,
}

/// The `redis-server` binary: `$REDIS_SERVER`, else the first on `PATH`. Panics, saying what to
/// install, when there is none.
pub fn redis_server() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER").map(PathBuf::from) {
        assert!(
            p.exists(),
            "$REDIS_SERVER ({}) does not exist: {INSTALL_HINT}",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("redis-server is not on PATH: {INSTALL_HINT}"))
}

impl Redis {
    /// Starts a fresh, empty Redis on a free loopback port; returns once it answers `PING`.
    pub fn start_new() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            process: None,
            dir: tempfile::tempdir().expect("temp dir"),
            starts: 0,
        };
        redis.start();
        redis
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The storage arguments of `ratelimit-service` for this Redis: `redis <url>` (counters and
    /// reservations in Redis), for [`crate::Options::service_args`].
    pub fn service_args(&self) -> Vec<String> {
        vec!["redis".into(), self.url()]
    }

    /// The directory holding the data and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the server is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Starts the server (again) on the same port and data directory, so that it loads what it
    /// had written before [`Redis::stop`]. Returns once it answers `PING`; panics with its log
    /// when it does not come up within 30 s.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "redis-server is running");
        self.starts += 1;
        let name = format!("redis-{}", self.starts);
        let mut process = Process::spawn(
            &name,
            Command::new(redis_server())
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                // Persistence in the append-only file only, written through on every command.
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                ])
                .arg("--dir")
                .arg(self.dir.path())
                .args(["--daemonize", "no", "--logfile", ""]),
            self.dir.path(),
        );
        let ready = wait_until("redis-server", Duration::from_secs(30), || {
            process.exited().is_some() || self.ping()
        });
        if let Some(code) = process.exited() {
            panic!("redis-server exited with {code}:\n{}", process.output());
        }
        assert!(
            ready,
            "redis-server does not answer PING:\n{}",
            process.output()
        );
        self.process = Some(process);
    }

    /// Stops the server gracefully (`SHUTDOWN`: it syncs its append-only file and closes every
    /// connection; SIGKILL after 10 s) and waits for it to exit: its port refuses connections
    /// until [`Redis::start`].
    pub fn stop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        // A paused server cannot shut down.
        let _ = Command::new("kill")
            .args(["-CONT", &process.pid().to_string()])
            .status();
        // The server closes the connection without an answer when it shuts down.
        let _ = self.command(&["SHUTDOWN"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while process.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        process.kill();
    }

    /// Freezes the server (SIGSTOP): connections stay open and commands are accepted by the
    /// kernel, but nothing is answered until [`Redis::resume`], which then runs them (a stalled
    /// Redis, or a network that stops delivering without resetting connections).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server run again (SIGCONT): it executes what it was sent meanwhile.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self
            .process
            .as_ref()
            .expect("redis-server is not running")
            .pid();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Whether the server answers `PING` with `PONG` (within 2 s).
    pub fn ping(&self) -> bool {
        matches!(self.command(&["PING"]), Ok(Resp::Simple(s)) if s == "PONG")
    }

    /// Sends one command (its arguments as RESP bulk strings) on a new connection and reads its
    /// answer (2 s at most for each).
    pub fn command(&self, args: &[&str]) -> std::io::Result<Resp> {
        let stream = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(2),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        (&stream).write_all(request.as_bytes())?;
        Resp::read(&mut BufReader::new(&stream))
    }

    /// The keys matching `pattern` (`KEYS`; a test's Redis holds few).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.command(&["KEYS", pattern]) {
            Ok(Resp::Array(items)) => items
                .into_iter()
                .filter_map(|i| match i {
                    Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
                    _ => None,
                })
                .collect(),
            other => panic!("KEYS {pattern}: {other:?}"),
        }
    }

    /// The server's output so far (all its starts).
    pub fn output(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("redis-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One RESP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc` (`None`: the null bulk string `$-1`)
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...` (the null array `*-1` reads as empty)
    Array(Vec<Resp>),
}

impl Resp {
    fn read(r: &mut impl BufRead) -> std::io::Result<Resp> {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let bad = || std::io::Error::other(format!("bad RESP line {line:?}"));
        let (kind, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        let int = || rest.parse::<i64>().map_err(|_| bad());
        Ok(match kind {
            "+" => Resp::Simple(rest.into()),
            "-" => Resp::Error(rest.into()),
            ":" => Resp::Integer(int()?),
            "$" => match usize::try_from(int()?) {
                Err(_) => Resp::Bulk(None),
                Ok(len) => {
                    let mut buf = vec![0; len + 2];
                    r.read_exact(&mut buf)?;
                    buf.truncate(len);
                    Resp::Bulk(Some(buf))
                }
            },
            "*" => {
                let n = usize::try_from(int()?).unwrap_or(0);
                (0..n)
                    .map(|_| Resp::read(r))
                    .collect::<std::io::Result<_>>()
                    .map(Resp::Array)?
            }
            _ => return Err(bad()),
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            // SIGKILL ends a paused process too.
            p.kill();
        }
    }
}
