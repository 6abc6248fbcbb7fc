//! The binary as an operator runs it: `check-config` and argument errors.

use std::process::Command;

use api_shield_tests::daemon::{binary, tempdir::TempDir};

fn check_config(yaml: &str) -> (i32, String, String) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_shipped_configs() {
    for file in ["api-shield.example.yaml", "default.yaml"] {
        let path = format!("{}/../config/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(binary())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn check_config_names_key_and_line_and_exits_1() {
    for (yaml, key, line) in [
        (
            "interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: -1\n",
            "limits.default.pps",
            "line 5",
        ),
        (
            "interfaces:\n  - name: eth0\nblocklist:\n  - 192.0.2.0/24\n  - 300.0.0.0/8\n",
            "blocklist",
            "line 5",
        ),
        (
            "interfaces:\n  - name: eth0\n  - name: eth0\n",
            "interfaces[1].name",
            "line 3",
        ),
        (
            "interfaces:\n  - name: eth0\nratelimit: 5\n",
            "unknown field `ratelimit`",
            "line 3",
        ),
    ] {
        let (code, _, stderr) = check_config(yaml);
        assert_eq!(code, 1, "{yaml}");
        assert!(
            stderr.contains(key) && stderr.contains(line),
            "{yaml}\n{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
    }
}

#[test]
fn a_missing_file_or_unknown_verb_is_a_clear_error() {
    let out = Command::new(binary())
        .args(["check-config", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/x.yaml"));
    let out = Command::new(binary()).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(format!(
        "{}/../config/api-shield.service",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // The unit names the installed path; verify it against the binary just built.
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("api-shield.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/api-shield", &binary().display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn the_prometheus_samples_pass_promtool() {
    let dir = format!("{}/../config", env!("CARGO_MANIFEST_DIR"));
    for args in [
        ["check", "rules", "api-shield.rules.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
