//! The `token-ratelimit` command on the shipped configurations.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

use std::process::Command;

/// The repository root, where the shipped configurations are (`envoy/`, `istio/`): the command
/// runs from there so that the paths it prints are the ones `make limits` uses.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_token-ratelimit"))
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("token-ratelimit runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_configurations_validate() {
    for file in ["envoy/envoy.yaml", "istio/wasmplugin.yaml"] {
        let (ok, stdout, stderr) = run(&["validate", file]);
        assert!(ok, "{file}: {stderr}");
        assert!(
            stdout.starts_with("ok: 2 limit(s), 2 rate(s), domain `llm`"),
            "{stdout}"
        );
    }
}

#[test]
fn generated_limits_files_are_up_to_date() {
    for (config, limits) in [
        ("envoy/envoy.yaml", "envoy/limits.yaml"),
        ("istio/wasmplugin.yaml", "istio/limits.yaml"),
    ] {
        let (ok, stdout, stderr) = run(&["limits", config]);
        assert!(ok, "{stderr}");
        let shipped = std::fs::read_to_string(format!("{ROOT}/{limits}")).unwrap();
        assert_eq!(stdout, shipped, "{limits} is stale: run `make limits`");
    }
}

#[test]
fn limits_follow_the_policy() {
    let (ok, stdout, _) = run(&["limits", "envoy/envoy.yaml"]);
    assert!(ok);
    assert!(
        stdout.contains("- namespace: llm\n  name: free\n  max_value: 50\n  seconds: 60\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  - descriptors[0]['limit.gold'] == '1'\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  - descriptors[0]['auth.identity.userid']\n"),
        "{stdout}"
    );
}

#[test]
fn a_bad_configuration_fails_with_the_field_named() {
    let dir = tempfile_dir();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "rateLimitService: {cluster: c, domain: d}\nlimits:\n  free:\n    rates: [{limit: 5, window: 1m}]\n    when: [{predicate: 'request.path =='}]\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(&["validate", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "invalid configuration at `limits.free.when[0].predicate`: CEL does not compile"
        ),
        "{stderr}"
    );

    std::fs::write(&bad, "kind: Nothing\n").unwrap();
    let (ok, _, stderr) = run(&["limits", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("no plugin configuration"), "{stderr}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("token-ratelimit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
