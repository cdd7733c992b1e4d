//! `deploy/`: every Kubernetes manifest validates strictly for Kubernetes 1.33, both kustomizations render, and every
//! Ferry policy object (in `deploy/` and in the README) validates against the CRD schema generated from the types.

use ferry_test_support::control as support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Kubernetes manifests under `deploy/` (YAML, not the kustomizations, the Grafana dashboards or Prometheus' own
/// configuration).
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "grafana" && name != "prometheus" {
                    walk(&path, out);
                }
            } else if name.ends_with(".yaml") && name != "kustomization.yaml" {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy(), &mut files);
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn is_ferry_policy(doc: &Value) -> bool {
    doc["apiVersion"].as_str().is_some_and(|v| v.starts_with("ferry.dev/"))
}

/// Validates Ferry policy objects against the openAPIV3Schema of their kind's generated CRD with Python's
/// `jsonschema` (Draft 4, the dialect of OpenAPI v3.0 schemas); returns one error line per invalid object.
fn crd_schema_errors(docs: &[Value]) -> Vec<String> {
    let schemas: serde_json::Map<String, Value> = ["TrafficPolicy", "AuthorizationPolicy"]
        .iter()
        .map(|k| (k.to_string(), ferry_api::kubernetes::crd::schema(k).unwrap()))
        .collect();
    let input = json!({"schemas": schemas, "documents": docs}).to_string();
    let script = r#"
import json, sys, jsonschema
data = json.load(sys.stdin)
for i, doc in enumerate(data["documents"]):
    schema = data["schemas"].get(doc.get("kind"))
    if schema is None:
        print(f"document {i}: no CRD for kind {doc.get('kind')}")
        continue
    for e in jsonschema.Draft4Validator(schema).iter_errors(doc):
        print(f"document {i} ({doc['kind']} {doc['metadata']['name']}): {'.'.join(map(str, e.absolute_path))}: {e.message}")
"#;
    python(script, &input).lines().map(str::to_string).collect()
}

/// Runs a Python `script` with `input` on its stdin; its stdout.
fn python(script: &str, input: &str) -> String {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn have_jsonschema() -> bool {
    ferry_test_support::prerequisites(
        "CRD schema checks",
        &[("python3 with jsonschema", ferry_test_support::works("python3", &["-c", "import jsonschema"]))],
    )
}

#[test]
fn manifests_validate_for_kubernetes_1_33() {
    let ok = ferry_test_support::prerequisites(
        "deploy manifests",
        &[("kubernetes-validate (pip)", ferry_test_support::works("kubernetes-validate", &["--version"]))],
    );
    if !ok {
        return;
    }
    // Files with Ferry policy objects are checked against the CRD schema instead (the other test).
    let files: Vec<PathBuf> = manifests().into_iter().filter(|f| !documents(f).iter().any(is_ferry_policy)).collect();
    let names: Vec<String> = files.iter().map(|f| f.strip_prefix(deploy()).unwrap().display().to_string()).collect();
    for want in [
        "namespace.yaml",
        "crds/trafficpolicies.ferry.dev.yaml",
        "control-plane/deployment.yaml",
        "control-plane/rbac.yaml",
        "control-plane/webhook.yaml",
        "control-plane/pdb.yaml",
        "example/api.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not among {names:?}");
    }
    support::kubernetes_validate(&files);
}

#[test]
fn policy_objects_validate_against_the_crd_schema() {
    if !have_jsonschema() {
        return;
    }
    let docs: Vec<Value> = manifests().iter().flat_map(|f| documents(f)).filter(is_ferry_policy).collect();
    assert!(docs.len() >= 2, "{docs:?}");
    assert_eq!(crd_schema_errors(&docs), Vec::<String>::new());
    // The check can fail: each broken copy of the example TrafficPolicy is refused, naming the field.
    let traffic = docs.iter().find(|d| d["kind"] == "TrafficPolicy").unwrap();
    let mut broken = Vec::new();
    for (pointer, value) in [
        ("/spec/retries/attempts", json!(11)),
        ("/spec/timeout", json!("2 seconds")),
        ("/spec/retries/on/0", json!("sometimes")),
        ("/spec/mtls", json!("sometimes")),
        ("/spec/targetRef/kind", json!("Pod")),
    ] {
        let mut doc = traffic.clone();
        *doc.pointer_mut(pointer).unwrap() = value;
        broken.push(doc);
    }
    let errors = crd_schema_errors(&broken);
    assert_eq!(errors.len(), 5, "{errors:?}");
    for (error, field) in errors.iter().zip([
        "spec.retries.attempts",
        "spec.timeout",
        "spec.retries.on.0",
        "spec.mtls",
        "spec.targetRef.kind",
    ]) {
        assert!(error.contains(field), "{error}");
    }
}

/// The ```yaml examples of the README that are policies (local-mode `Service` documents have no CRD).
#[test]
fn readme_policy_examples_validate_against_the_crd_schema() {
    if !have_jsonschema() {
        return;
    }
    let readme = std::fs::read_to_string(deploy().join("../README.md")).unwrap();
    let mut docs = Vec::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match &mut block {
            None if line.trim_start() == "```yaml" => block = Some(String::new()),
            Some(text) if line.trim() == "```" => {
                let parsed: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
                docs.extend(parsed.into_iter().filter(is_ferry_policy).filter(|d| d["kind"] != "Service"));
                block = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(kinds.contains(&"TrafficPolicy") && kinds.contains(&"AuthorizationPolicy"), "{kinds:?}");
    assert_eq!(crd_schema_errors(&docs), Vec::<String>::new());
}

#[test]
fn kustomizations_render() {
    if !ferry_test_support::prerequisites(
        "kustomize",
        &[("kubectl", ferry_test_support::works("kubectl", &["version", "--client"]))],
    ) {
        return;
    }
    for (dir, want) in [
        (
            "",
            vec![
                "Namespace",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "MutatingWebhookConfiguration",
            ],
        ),
        ("example", vec!["Namespace", "Deployment", "TrafficPolicy", "AuthorizationPolicy"]),
    ] {
        let out = Command::new("kubectl").args(["kustomize"]).arg(deploy().join(dir)).output().unwrap();
        assert!(out.status.success(), "kubectl kustomize deploy/{dir}: {}", String::from_utf8_lossy(&out.stderr));
        let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in want {
            assert!(kinds.contains(&kind), "deploy/{dir}: no {kind} in {kinds:?}");
        }
        if dir.is_empty() {
            let control = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
            assert_eq!(control["spec"]["replicas"], 2);
        }
    }
}

/// Every `x-kubernetes-validations` rule of a schema, with where it sits: (JSON pointer, rule, message).
fn cel_rules(schema: &Value, at: &str, out: &mut Vec<(String, String, String)>) {
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for r in rules {
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            out.push((at.to_string(), text("rule"), text("message")));
        }
    }
    for (key, child) in schema["properties"].as_object().into_iter().flatten() {
        cel_rules(child, &format!("{at}/{key}"), out);
    }
    if schema["items"].is_object() {
        cel_rules(&schema["items"], &format!("{at}/items"), out);
    }
}

/// Every string and list under `schema` that is not bounded (`maxLength` or `enum`; `maxItems`).
fn unbounded(schema: &Value, at: &str, out: &mut Vec<String>) {
    match schema["type"].as_str() {
        Some("string") if schema["maxLength"].is_null() && schema["enum"].is_null() => out.push(at.to_string()),
        Some("array") if schema["maxItems"].is_null() => out.push(at.to_string()),
        _ => {}
    }
    for (key, child) in schema["properties"].as_object().into_iter().flatten() {
        unbounded(child, &format!("{at}/{key}"), out);
    }
    if schema["items"].is_object() {
        unbounded(&schema["items"], &format!("{at}/items"), out);
    }
}

/// The CRDs' CEL rules, evaluated by a CEL implementation (cel-python) on valid and invalid objects: each rule holds
/// where it should and fails where it should, every rule is covered both ways, and every string and list of a spec
/// is bounded, so that the API server can bound the rules' cost.
#[test]
fn cel_rules_hold_on_valid_and_invalid_objects() {
    let ok = ferry_test_support::prerequisites(
        "CEL rules",
        &[(
            "python3 with cel-python (pip install cel-python)",
            ferry_test_support::works("python3", &["-c", "import celpy"]),
        )],
    );
    if !ok {
        return;
    }
    // (kind, the rule's message, `self` at the rule's place, whether the rule holds)
    let (tp, ap) = ("TrafficPolicy", "AuthorizationPolicy");
    let per_try = "retries.perTryTimeout is longer than timeout";
    let backoff = "max is less than base";
    let (rule, from) = ("needs `from`, `to` or both", "names no identities and no namespaces");
    let retries = |timeout: Option<&str>, per_try: &str| match timeout {
        Some(t) => json!({"timeout": t, "retries": {"attempts": 1, "perTryTimeout": per_try}}),
        None => json!({"retries": {"attempts": 1, "perTryTimeout": per_try}}),
    };
    let cases: Vec<(&str, &str, Value, bool)> = vec![
        (tp, per_try, json!({"targetRef": {"kind": "Service", "name": "a"}}), true),
        (tp, per_try, json!({"timeout": "2s", "retries": {"attempts": 1}}), true),
        (tp, per_try, retries(None, "1h"), true),
        (tp, per_try, retries(Some("2s"), "500ms"), true),
        (tp, per_try, retries(Some("1m30s"), "90s"), true),
        (tp, per_try, retries(Some("1s"), "3s"), false),
        (tp, per_try, retries(Some("1m"), "1m1s"), false),
        (tp, backoff, json!({"base": "25ms", "max": "250ms"}), true),
        (tp, backoff, json!({"base": "1s", "max": "1000ms"}), true),
        (tp, backoff, json!({"base": "1s", "max": "500ms"}), false),
        (ap, rule, json!({"from": {"namespaces": ["shop"]}}), true),
        (ap, rule, json!({"to": {"methods": ["GET"]}}), true),
        (ap, rule, json!({}), false),
        (ap, from, json!({"identities": ["spiffe://cluster.local/ns/a/sa/b"]}), true),
        (ap, from, json!({"namespaces": ["shop"]}), true),
        (ap, from, json!({}), false),
        (ap, from, json!({"identities": [], "namespaces": []}), false),
    ];
    let mut rules = Vec::new();
    for kind in ["TrafficPolicy", "AuthorizationPolicy"] {
        let schema = ferry_api::kubernetes::crd::schema(kind).unwrap();
        let mut found = Vec::new();
        cel_rules(&schema["properties"]["spec"], "/spec", &mut found);
        let mut open = Vec::new();
        unbounded(&schema["properties"]["spec"], "/spec", &mut open);
        assert_eq!(open, Vec::<String>::new(), "{kind}: unbounded strings or lists");
        rules.extend(found.into_iter().map(|(at, rule, message)| (kind, at, rule, message)));
    }
    assert_eq!(rules.len(), 4, "{rules:?}");
    // Every rule is exercised both ways.
    for (kind, at, _, message) in &rules {
        for want in [true, false] {
            assert!(
                cases.iter().any(|(k, m, _, w)| k == kind && m == message && *w == want),
                "{kind} {at}: no case where `{message}` is {want}"
            );
        }
    }
    let input: Vec<Value> = cases
        .iter()
        .map(|(kind, message, object, _)| {
            let (_, _, rule, _) = rules.iter().find(|(k, _, _, m)| k == kind && m == message).unwrap();
            json!({"rule": rule, "self": object})
        })
        .collect();
    let script = r#"
import json, sys, celpy
env = celpy.Environment()
for case in json.load(sys.stdin):
    try:
        result = env.program(env.compile(case["rule"])).evaluate({"self": celpy.json_to_cel(case["self"])})
        print(json.dumps(bool(result) if isinstance(result, celpy.celtypes.BoolType) else f"not a bool: {result!r}"))
    except Exception as e:
        print(json.dumps(f"error: {e}"))
"#;
    let out = python(script, &Value::from(input).to_string());
    let results: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), cases.len());
    for ((kind, message, object, want), got) in cases.iter().zip(results) {
        assert_eq!(got, json!(want), "{kind} `{message}` on {object}");
    }
}
