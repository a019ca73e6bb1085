//! The Helm chart and the plain manifests: lint, render, validate against the Kubernetes
//! 1.32 schemas, stay in step with the code (CRDs, flags, metrics), and hold the
//! security and RBAC defaults users expect.

use std::collections::BTreeSet;

use crate::common::tools::{ok, repo, run};
use serde_json::Value;

const CHART: &str = "deploy/helm/dpc-operator";
const HA_VALUES: &str = "deploy/helm/test-values/ha-namespaced.yaml";

fn render(extra: &[&str]) -> String {
    let mut args = vec![
        "template",
        "dpc-operator",
        CHART,
        "--namespace",
        "dpc-operator",
    ];
    args.extend_from_slice(extra);
    ok("helm", &args)
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| d.is_object())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn env_of(deployment: &Value) -> Vec<(String, String)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn helm_lint_passes_with_default_and_production_values() {
    ok("helm", &["lint", "--strict", CHART]);
    ok("helm", &["lint", "--strict", CHART, "-f", HA_VALUES]);
}

#[test]
fn rendered_charts_pass_strict_validation_against_kubernetes_1_32() {
    let dir = std::env::temp_dir().join(format!("dpc-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, extra) in [("default", vec![]), ("ha", vec!["-f", HA_VALUES])] {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, render(&extra)).unwrap();
        let (code, stdout, stderr) = run(
            "kubernetes-validate",
            &["--strict", "-k", "1.32.0", path.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{name}:\n{stdout}\n{stderr}");
        let passed = stdout.lines().filter(|l| l.contains(" passed ")).count();
        let resources = docs(&std::fs::read_to_string(&path).unwrap()).len();
        // The Prometheus Operator's kinds have no upstream schema; everything else passed.
        let unknown = stdout.matches("Couldn't find schema").count()
            + stderr.matches("Couldn't find schema").count();
        assert_eq!(passed + unknown, resources, "{name}:\n{stdout}\n{stderr}");
        assert!(
            !stdout.contains("ERROR") && !stderr.contains("ERROR"),
            "{name}:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn the_plain_manifests_are_what_the_chart_renders() {
    let checked_in = std::fs::read_to_string(repo("deploy/manifests/dpc-operator.yaml")).unwrap();
    let rendered = render(&[]);
    assert!(
        checked_in.ends_with(&rendered),
        "deploy/manifests/dpc-operator.yaml is stale: run `bash .ci/render-manifests`"
    );
    let namespace = docs(&checked_in).into_iter().next().unwrap();
    assert_eq!(
        (
            namespace["kind"].as_str(),
            namespace["metadata"]["name"].as_str()
        ),
        (Some("Namespace"), Some("dpc-operator"))
    );
}

#[test]
fn the_charts_crds_are_what_crdgen_prints() {
    let template = std::fs::read_to_string(repo(&format!("{CHART}/templates/crds.yaml"))).unwrap();
    assert!(
        template == dpc_operator::api::crds_helm_template(),
        "the chart's CRD template is stale: run `cargo run --bin crdgen -- --helm > {CHART}/templates/crds.yaml`"
    );
    let rendered = docs(&render(&[]));
    let crds = find(&rendered, "CustomResourceDefinition");
    assert_eq!(crds.len(), 3);
    for crd in crds {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
    }
    assert!(
        find(
            &docs(&render(&["--set", "crds.install=false"])),
            "CustomResourceDefinition"
        )
        .is_empty()
    );
}

#[test]
fn the_pod_is_hardened_by_default_and_probes_the_admin_endpoints() {
    let rendered = docs(&render(&[]));
    let deployment = find(&rendered, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(
        env_of(deployment)
            .iter()
            .all(|(name, _)| name != "DPC_OPERATOR_LEADER_ELECTION"),
        "one replica: no election"
    );
}

#[test]
fn more_than_one_replica_turns_leader_election_on() {
    let rendered = docs(&render(&["--set", "replicaCount=2"]));
    let env = env_of(find(&rendered, "Deployment")[0]);
    assert!(env.contains(&("DPC_OPERATOR_LEADER_ELECTION".into(), "true".into())));
    let roles = find(&rendered, "Role");
    let lease_role = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "dpc-operator-leader-election")
        .expect("a Role for Leases");
    assert_eq!(lease_role["metadata"]["namespace"], "dpc-operator");
    assert_eq!(
        lease_role["rules"][0]["resources"],
        serde_json::json!(["leases"])
    );
    // A drain evicts one replica at a time, and replicas prefer different nodes.
    let budget = find(&rendered, "PodDisruptionBudget");
    assert_eq!(budget.len(), 1);
    assert_eq!(budget[0]["spec"]["maxUnavailable"], 1);
    assert_eq!(
        budget[0]["spec"]["selector"]["matchLabels"],
        find(&rendered, "Deployment")[0]["spec"]["selector"]["matchLabels"]
    );
    let affinity = &find(&rendered, "Deployment")[0]["spec"]["template"]["spec"]["affinity"];
    let term = &affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        term["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    // One replica: neither.
    let single = docs(&render(&[]));
    assert!(find(&single, "PodDisruptionBudget").is_empty());
    assert!(find(&single, "Deployment")[0]["spec"]["template"]["spec"]["affinity"].is_null());
}

fn rules(doc: &Value) -> Vec<(BTreeSet<String>, BTreeSet<String>)> {
    let set = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    doc["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (set(&r["resources"]), set(&r["verbs"])))
        .collect()
}

#[test]
fn rbac_is_least_privilege() {
    let read_only: BTreeSet<String> = ["get", "list", "watch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // All namespaces: one ClusterRole; Secrets and ConfigMaps read-only; no Leases there.
    let rendered = docs(&render(&[]));
    let cluster = find(&rendered, "ClusterRole");
    assert_eq!(cluster.len(), 1);
    for (resources, verbs) in rules(cluster[0]) {
        if resources.contains("secrets") || resources.contains("configmaps") {
            assert_eq!(verbs, read_only);
        }
        assert!(
            !resources.contains("leases"),
            "Leases only in the operator's namespace"
        );
        assert!(
            !verbs.contains("delete") && !verbs.contains("*"),
            "{resources:?} {verbs:?}"
        );
    }
    // Listed namespaces: Roles there, and no cluster-wide access to Secrets.
    let rendered = docs(&render(&["-f", HA_VALUES]));
    let roles = find(&rendered, "Role");
    let namespaces: BTreeSet<&str> = roles
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(
        namespaces,
        BTreeSet::from(["analytics", "data-platform", "default", "dpc-operator"])
    );
    // Events about ClusterDpcAccounts can only be in `default`: a Role for that alone.
    let events = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "dpc-operator-cluster-events")
        .expect("a Role for cluster Events");
    assert_eq!(events["metadata"]["namespace"], "default");
    assert_eq!(
        rules(events),
        vec![(
            BTreeSet::from(["events".to_string()]),
            BTreeSet::from(["create".to_string()])
        )]
    );
    // In the release namespace: Leases, and the ClusterDpcAccount credentials (read-only).
    let credentials = roles
        .iter()
        .find(|r| r["metadata"]["name"] == "dpc-operator-cluster-credentials")
        .expect("a Role for ClusterDpcAccount credentials");
    assert_eq!(credentials["metadata"]["namespace"], "dpc-operator");
    let expected: Vec<(BTreeSet<String>, BTreeSet<String>)> =
        vec![(BTreeSet::from(["secrets".to_string()]), read_only.clone())];
    assert_eq!(rules(credentials), expected);
    for (resources, _) in rules(find(&rendered, "ClusterRole")[0]) {
        assert!(
            !resources.contains("secrets") && !resources.contains("connectionoverrides"),
            "{resources:?}"
        );
    }
    let env = env_of(find(&rendered, "Deployment")[0]);
    assert!(env.contains(&(
        "DPC_OPERATOR_NAMESPACES".into(),
        "data-platform,analytics".into()
    )));
    assert!(env.contains(&("DPC_OPERATOR_SELECTOR".into(), "shard=a".into())));
}

#[test]
fn every_environment_variable_the_chart_sets_is_one_the_binary_reads() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_dpc-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for values in [
        vec![],
        vec!["-f", HA_VALUES],
        vec!["--set", "perObjectMetrics=false,allowInsecureHttp=true"],
    ] {
        for (name, _) in env_of(find(&docs(&render(&values)), "Deployment")[0]) {
            if name.starts_with("DPC_OPERATOR_") {
                assert!(
                    help.contains(&format!("env: {name}=")),
                    "{name} is not a flag's environment variable:\n{help}"
                );
            }
        }
    }
}

#[test]
fn the_alert_rules_use_metrics_the_operator_exports() {
    let rendered = docs(&render(&["-f", HA_VALUES]));
    let rule = find(&rendered, "PrometheusRule")[0];
    // A family is printed once it has a series: record one of each.
    let metrics = dpc_operator::metrics::Metrics::new(true);
    metrics.reconciled("connectionoverride", std::time::Duration::from_millis(1));
    metrics.failed("connectionoverride", "ApiRejected");
    use dpc_operator::dpc::CallObserver;
    metrics.observe(
        dpc_operator::dpc::Operation::Create,
        "success",
        std::time::Duration::from_millis(1),
    );
    metrics.waited(std::time::Duration::from_millis(1));
    let condition: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition = serde_json::from_value(
        serde_json::json!({"type": "Ready", "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
    )
    .unwrap();
    metrics.set_conditions("ns", "x", &[condition]);
    metrics.set_watch_health(
        "secrets (all namespaces)",
        std::time::Duration::from_secs(1),
        std::time::Duration::ZERO,
    );
    let exported = metrics.encode();
    let alerts = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let names: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "DpcConnectionOverrideNotReady",
            "DpcApiErrors",
            "DpcRateLimited",
            "DpcOperatorWatchFailing"
        ]
    );
    assert_eq!(alerts[0]["for"], "15m");
    for alert in alerts {
        let expr = alert["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("dpc_operator_") {
                let family = word.trim_end_matches("_total");
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "{word} (in {}) is not exported",
                    alert["alert"]
                );
            }
        }
    }
    let monitor = find(&rendered, "ServiceMonitor")[0];
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(find(&rendered, "NetworkPolicy").len(), 1);
}

#[test]
fn the_values_schema_refuses_bad_values() {
    for bad in [
        "replicaCount=0",
        "logFormat=xml",
        "concurrency=0",
        "backoff.base=soon",
        "unknownKey=1",
        "service.port=70000",
    ] {
        let (code, _, stderr) = run("helm", &["template", "x", CHART, "--set", bad]);
        assert_ne!(code, 0, "{bad} must be refused");
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "{bad}: {stderr}"
        );
    }
}
