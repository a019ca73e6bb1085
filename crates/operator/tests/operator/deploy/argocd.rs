//! The Argo CD health check, run with lua5.1 (Argo's Lua) on one fixture per case.

use crate::common::tools::{ok, repo};
use serde_json::Value;

#[test]
fn the_health_check_gives_each_fixture_its_expected_health() {
    let mut checked = 0;
    let mut paths: Vec<_> = std::fs::read_dir(repo(
        "crates/operator/tests/operator/deploy/argocd/fixtures",
    ))
    .unwrap()
    .map(|e| e.unwrap().path())
    .collect();
    paths.sort();
    for path in paths {
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let output = ok(
            "lua5.1",
            &[
                "crates/operator/tests/operator/deploy/argocd/run.lua",
                "deploy/argocd/health.lua",
                path.to_str().unwrap(),
            ],
        );
        let health: Value = serde_json::from_str(output.trim())
            .unwrap_or_else(|e| panic!("{}: {e}: {output}", path.display()));
        let expect = &fixture["expect"];
        assert_eq!(
            health["status"],
            expect["status"],
            "{}: {health}",
            path.display()
        );
        let message = health["message"].as_str().unwrap();
        let wanted = expect["message"].as_str().unwrap();
        assert!(
            message.contains(wanted),
            "{}: {message:?} lacks {wanted:?}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 15, "{checked} fixtures");
}

#[test]
fn every_health_status_is_covered_by_a_fixture() {
    let mut statuses = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(repo(
        "crates/operator/tests/operator/deploy/argocd/fixtures",
    ))
    .unwrap()
    {
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        statuses.insert(fixture["expect"]["status"].as_str().unwrap().to_string());
    }
    let all: std::collections::BTreeSet<String> =
        ["Degraded", "Healthy", "Progressing", "Suspended"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    assert_eq!(statuses, all);
}
