//! The `ratelimit-service` binary as a user runs it: refusing bad limits files, validating,
//! serving on the given ports until SIGTERM.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ratelimit_proto::Code;

const BIN: &str = env!("CARGO_BIN_EXE_ratelimit-service");

/// A command for the binary that ignores the caller's Limitador-style environment variables.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "LIMITS_FILE",
        "ENVOY_RLS_HOST",
        "ENVOY_RLS_PORT",
        "HTTP_API_HOST",
        "HTTP_API_PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs the binary, which is expected to exit by itself; kills it after 20 s (test failure).
fn run_with(file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut child = command()
        .arg(file)
        .args(extra)
        .args(["--rls-ip", "127.0.0.1", "--http-ip", "127.0.0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "ratelimit-service did not exit: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(yaml: &str) -> String {
    let file = limits_file(yaml);
    // Port 0: should it wrongly start, it collides with nothing, and run_with kills it.
    let out = run_with(&file, &["--rls-port", "0", "--http-port", "0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&file.display().to_string()),
        "names the file: {stderr}"
    );
    stderr
}

#[test]
fn bad_limits_files_are_refused_with_the_reason() {
    let e = refused("- {namespace: llm, max_value: 5, seconds: 60, conditons: []}");
    assert!(e.contains("unknown field `conditons`"), "{e}");

    let e = refused(
        "- {namespace: llm, name: free, max_value: 5, seconds: 60, \
           conditions: [\"descriptors[0]['limit.free'] = '1'\"]}",
    );
    assert!(
        e.contains("limit #0 (\"free\")") && e.contains("not valid CEL"),
        "{e}"
    );

    let e = refused("- {namespace: llm, max_value: -5, seconds: 60}");
    assert!(
        e.contains("max_value") || e.contains("invalid value"),
        "{e}"
    );

    let e = refused("");
    assert!(e.contains("empty"), "{e}");

    let missing = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-limits.yaml");
    let out = run_with(&missing, &["--rls-port", "0", "--http-port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot read limits file"), "{stderr}");
}

#[test]
fn validate_prints_the_limits_and_exits() {
    let file = limits_file(
        "- {namespace: llm, name: free, max_value: 5, seconds: 60, \
           conditions: [\"descriptors[0]['limit.free'] == '1'\"]}",
    );
    let out = command().arg(&file).arg("--validate").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["name"], "free");
    assert_eq!(json[0]["max_value"], 5);

    let bad = limits_file("- {namespace: llm, max_value: 5}");
    let out = command().arg(&bad).arg("--validate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing field `seconds`"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn binary_serves_on_given_ports_and_stops_on_sigterm() {
    let file = limits_file(
        "- {namespace: llm, name: free, max_value: 5, seconds: 60, \
           conditions: [\"descriptors[0]['limit.free'] == '1'\"], \
           variables: [\"descriptors[0]['user']\"]}",
    );
    let (rls_port, http_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::from(command())
        .arg(&file)
        .args(["-b", "127.0.0.1", "-p", &rls_port.to_string()])
        .args([
            "--http-ip",
            "127.0.0.1",
            "--http-port",
            &http_port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http_addr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let rls_addr = format!("127.0.0.1:{rls_port}").parse().unwrap();

    // Wait for /status.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(http_addr).await.is_ok()
            && http_get(http_addr, "/status").await.0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "service did not come up");
        assert!(child.try_wait().unwrap().is_none(), "service exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut c = kuadrant_client(rls_addr).await;
    let req = request("llm", &[("limit.free", "1"), ("user", "u1")], 5);
    assert_eq!(
        code(&c.check_rate_limit(req.clone()).await.unwrap().into_inner()),
        Code::Ok
    );
    c.report(req.clone()).await.unwrap();
    assert_eq!(
        code(&c.check_rate_limit(req).await.unwrap().into_inner()),
        Code::OverLimit
    );
    let (_, metrics) = http_get(http_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ratelimit_reported_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(5)
    );

    // SIGTERM to the process we started, by its id.
    let pid = child.id().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(out.status.success(), "graceful exit: {out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!(
            "gRPC (RLS) server listening on 127.0.0.1:{rls_port}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("HTTP server listening on 127.0.0.1:{http_port}")),
        "{log}"
    );
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let file = limits_file("[]");
    let out = run_with(&file, &["--rls-port", &port, "--http-port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot listen for gRPC on 127.0.0.1:{port}")),
        "{stderr}"
    );
}
