//! The alerting rules operators load (`docker/seqd-rules.yml`): Prometheus's
//! own `promtool` (Debian's `prometheus` package, installed by
//! scripts/setup.sh) checks them and runs their unit tests, and every rule
//! must name only metrics seqd exports and be fired by a unit test. That a
//! real Prometheus evaluates them against a live cluster, and fires one when
//! a node dies, is in tests/metrics.rs.

use std::path::PathBuf;
use std::process::Command;

fn docker_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(docker_dir())
        .output()
        .expect("run promtool (installed with prometheus by scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The names after `- alert:` in the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn the_rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "seqd-rules.yml"]);
    let rules = std::fs::read_to_string(docker_dir().join("seqd-rules.yml")).unwrap();
    let found = format!("SUCCESS: {} rules found", alert_names(&rules).len());
    assert!(checked.contains(&found), "{checked}");
    let tested = promtool(&["test", "rules", "seqd-rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// An alert whose metric name is misspelt, or was renamed, never fires and
/// says nothing: every `seqd_` name in the rules must be one seqd exports.
#[test]
fn the_rules_name_only_metrics_seqd_exports() {
    let rules = std::fs::read_to_string(docker_dir().join("seqd-rules.yml")).unwrap();
    let source = include_str!("../src/metrics.rs");
    let exported: Vec<&str> = source
        .split('"')
        .filter(|s| {
            s.starts_with("seqd_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect();
    assert!(exported.len() > 30, "{exported:?}");
    let mut used = Vec::new();
    let mut rest = rules.as_str();
    while let Some(at) = rest.find("seqd_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        used.push(base);
    }
    assert!(used.len() > 15, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(&name.as_str()),
            "the rules use {name}, which src/metrics.rs does not export"
        );
    }
}

/// Every alert has a unit test in which it fires (promtool passes a rules
/// file whose alerts no test mentions).
#[test]
fn every_alert_is_fired_by_a_unit_test() {
    let rules = std::fs::read_to_string(docker_dir().join("seqd-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(docker_dir().join("seqd-rules.test.yml")).unwrap();
    let mut fired = Vec::new();
    let mut current = None;
    for line in tests.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if line.starts_with("- exp_labels:") {
            fired.extend(current.clone());
        }
    }
    for name in alert_names(&rules) {
        assert!(
            fired.contains(&name),
            "no unit test in seqd-rules.test.yml fires {name}"
        );
    }
}
