//! `ferryctl inject` / `uninject` on real-world manifests of every kind: golden files, structural checks, idempotence,
//! a semantic round trip, and `kubernetes-validate --strict` for Kubernetes 1.33 on every input and output.

use ferry_test_support::control as support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_api::kubernetes::inject::{self, Outcome, Settings};
use serde_json::{Value, json};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn inputs() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir().join("input")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

fn docs(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Every pod template (or Pod) in a document, Lists unrolled.
fn templates(doc: &Value) -> Vec<&Value> {
    match doc["kind"].as_str().unwrap_or_default() {
        "List" => doc["items"].as_array().unwrap().iter().flat_map(templates).collect(),
        "Pod" => vec![doc],
        "CronJob" => vec![&doc["spec"]["jobTemplate"]["spec"]["template"]],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => vec![&doc["spec"]["template"]],
        _ => vec![],
    }
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|c| c["name"] == name)
}

/// The app container as it was, apart from probes the injector may rewrite.
fn without_probes(c: &Value) -> Value {
    let mut c = c.clone();
    for p in ["livenessProbe", "readinessProbe", "startupProbe"] {
        c.as_object_mut().unwrap().remove(p);
    }
    c
}

fn check_injected(file: &str, before: &Value, after: &Value) {
    let annotations = &before["metadata"]["annotations"];
    let native = annotations["ferry.dev/native-sidecar"] != "false";
    let spec = &after["spec"];
    let inits = spec["initContainers"].as_array().unwrap_or_else(|| panic!("{file}: no initContainers"));
    // ferry init first: NET_ADMIN and NET_RAW only, everything else dropped.
    let init = &inits[0];
    assert_eq!(init["name"], "ferry-init", "{file}");
    assert_eq!(init["args"][0], "init", "{file}");
    assert_eq!(init["securityContext"]["capabilities"], json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}));
    assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
    if let Some(ports) = annotations["ferry.dev/skip-inbound-ports"].as_str() {
        assert!(
            init["args"].as_array().unwrap().contains(&json!(format!("--exclude-inbound-ports={ports}"))),
            "{file}"
        );
    }
    // Then the proxy: a native sidecar right after it (before the app's own init containers), or the first container.
    let proxy = if native {
        assert_eq!(inits[1]["name"], "ferry-proxy", "{file}");
        assert_eq!(inits[1]["restartPolicy"], "Always", "{file}");
        &inits[1]
    } else {
        assert_eq!(spec["containers"][0]["name"], "ferry-proxy", "{file}");
        assert!(spec["containers"][0].get("restartPolicy").is_none());
        &spec["containers"][0]
    };
    for (probe, path) in
        [("startupProbe", "/health/startup"), ("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")]
    {
        assert_eq!(proxy[probe]["httpGet"]["path"], path, "{file} {probe}");
        assert_eq!(proxy[probe]["httpGet"]["port"], 15020, "{file} {probe}");
    }
    let sc = &proxy["securityContext"];
    assert_eq!((sc["runAsUser"].clone(), sc["runAsNonRoot"].clone()), (json!(1337), json!(true)), "{file}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{file}");
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{file}");
    let res = &proxy["resources"];
    let want_cpu = annotations["ferry.dev/proxy-cpu"].as_str().unwrap_or("100m");
    let want_memory_limit = annotations["ferry.dev/proxy-memory-limit"].as_str().unwrap_or("256Mi");
    assert_eq!(res["requests"]["cpu"], want_cpu, "{file}");
    assert_eq!(res["limits"]["memory"], want_memory_limit, "{file}");
    let env: Vec<&str> = proxy["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    for (var, field) in [
        ("FERRY_NAMESPACE", "metadata.namespace"),
        ("FERRY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("FERRY_POD_NAME", "metadata.name"),
        ("FERRY_POD_IP", "status.podIP"),
    ] {
        assert_eq!(named(&proxy["env"], var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"], field, "{file}");
    }
    assert!(env.contains(&"FERRY_CONTROL_ADDR") && env.contains(&"FERRY_SERVICE_ACCOUNT_TOKEN"), "{file}: {env:?}");
    let token = named(&spec["volumes"], "ferry-token").unwrap();
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "ferry.dev", "{file}");
    // The app's own init containers follow, unchanged and in order.
    let theirs: Vec<&Value> = inits.iter().filter(|c| !c["name"].as_str().unwrap().starts_with("ferry-")).collect();
    let before_inits: Vec<&Value> =
        before["spec"]["initContainers"].as_array().map(|l| l.iter().collect()).unwrap_or_default();
    assert_eq!(theirs.len(), before_inits.len(), "{file}");
    for (a, b) in theirs.iter().zip(&before_inits) {
        assert_eq!(without_probes(a), without_probes(b), "{file}: init container changed");
    }
    // App containers: unchanged but for probes moved onto the health port.
    let apps: Vec<&Value> =
        spec["containers"].as_array().unwrap().iter().filter(|c| c["name"] != "ferry-proxy").collect();
    let before_apps = before["spec"]["containers"].as_array().unwrap();
    assert_eq!(apps.len(), before_apps.len(), "{file}");
    for (a, b) in apps.iter().zip(before_apps) {
        assert_eq!(without_probes(a), without_probes(b), "{file}: container {} changed", b["name"]);
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let (was, now) = (&b[probe], &a[probe]);
            let plain_http =
                was["httpGet"].is_object() && was["httpGet"]["scheme"].as_str().is_none_or(|s| s == "HTTP");
            if plain_http || was["tcpSocket"].is_object() {
                let path = format!("/app-health/{}/{}", b["name"].as_str().unwrap(), &probe[..probe.len() - 5]);
                let path = path.replace("liveness", "live").replace("readiness", "ready");
                assert_eq!(now["httpGet"], json!({"path": path, "port": 15020}), "{file} {probe}");
                assert!(now.get("tcpSocket").is_none());
                for (k, v) in was.as_object().unwrap() {
                    if k != "httpGet" && k != "tcpSocket" {
                        assert_eq!(&now[k], v, "{file}: {probe}.{k} kept");
                    }
                }
            } else {
                assert_eq!(now, was, "{file}: {probe} left as it was");
            }
        }
    }
}

#[test]
fn inject_golden_structure_idempotence_round_trip() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok();
    let settings = Settings::default();
    for (file, input) in inputs() {
        let (out, report) = inject::inject_yaml(&input, &settings).unwrap_or_else(|e| panic!("{file}: {e}"));
        let golden = dir().join("golden").join(&file);
        if update {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &out).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        assert!(out == want, "{file}: output differs from tests/inject/golden/{file} (UPDATE_GOLDEN=1 to rewrite)");

        // Structure: each injected template has what it should, each skipped one is untouched.
        let (before, after) = (docs(&input), docs(&out));
        let pairs: Vec<(&Value, &Value)> =
            before.iter().zip(&after).flat_map(|(b, a)| templates(b).into_iter().zip(templates(a))).collect();
        let outcomes: Vec<&Outcome> =
            report.iter().filter(|(_, o)| *o != Outcome::NotAWorkload).map(|(_, o)| o).collect();
        assert_eq!(pairs.len(), outcomes.len(), "{file}: {report:?}");
        for ((b, a), outcome) in pairs.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Injected => check_injected(&file, b, a),
                Outcome::Skipped(_) => assert_eq!(a, b, "{file}: a skipped pod is untouched"),
                other => panic!("{file}: {other:?}"),
            }
        }

        // Injecting twice is a no-op; uninject restores the input, compared as parsed objects.
        let (twice, report) = inject::inject_yaml(&out, &settings).unwrap();
        assert_eq!(twice, out, "{file}: injecting twice changed it");
        assert!(!report.iter().any(|(_, o)| *o == Outcome::Injected), "{file}: {report:?}");
        let (restored, _) = inject::uninject_yaml(&out).unwrap();
        assert_eq!(docs(&restored), before, "{file}: uninject did not restore the input");
    }
}

#[test]
fn every_kind_is_covered() {
    let mut kinds: Vec<String> = inputs()
        .iter()
        .flat_map(|(_, y)| docs(y))
        .flat_map(|d| if d["kind"] == "List" { d["items"].as_array().unwrap().clone() } else { vec![d] })
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    for kind in ["CronJob", "DaemonSet", "Deployment", "Job", "Pod", "ReplicaSet", "Service", "StatefulSet"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} among the inputs: {kinds:?}");
    }
}

#[test]
fn bad_annotations_name_the_object_and_field() {
    let pod = |key: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ns, annotations: {{{key}: \"{value}\"}}}}\nspec: {{containers: [{{name: a, image: a}}]}}\n"
        )
    };
    for (key, value, want) in [
        ("ferry.dev/proxy-cpu", "lots", "`lots` is not a quantity"),
        ("ferry.dev/skip-inbound-ports", "80,http", "`http` is not a port"),
        ("ferry.dev/native-sidecar", "maybe", "must be true or false"),
    ] {
        let err = inject::inject_yaml(&pod(key, value), &Settings::default()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("Pod ns/p: metadata.annotations[{key}]: ")), "{err}");
        assert!(err.contains(want), "{err}");
    }
    let err = inject::inject_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n",
        &Settings::default(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(err, "Deployment d: spec.template: missing: no pod template");
}

/// The CLI end to end: stdin to stdout, a report per object on stderr, and the same bytes as the library.
#[test]
fn ferryctl_inject_and_uninject() {
    let ctl = support::ctl_bin();
    let run = |args: &[&str], input: &str| {
        let mut child = Command::new(&ctl)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let input = std::fs::read_to_string(dir().join("input/list.yaml")).unwrap();
    let (out, report) = run(&["inject", "-f", "-"], &input);
    assert_eq!(out, std::fs::read_to_string(dir().join("golden/list.yaml")).unwrap());
    assert_eq!(
        report,
        "Service shop/cart no pods, passed through\n\
         Deployment shop/cart-admin skipped: annotation ferry.dev/inject: disabled\n\
         Deployment shop/cart injected\n"
    );
    let (restored, report) = run(&["uninject", "-f", "-"], &out);
    assert_eq!(docs(&restored), docs(&input));
    assert!(report.contains("Deployment shop/cart uninjected"), "{report}");
    let (legacy, _) =
        run(&["inject", "-f", "-", "--native-sidecar=false", "--proxy-image", "example.com/ferry:dev"], &input);
    let cart = &docs(&legacy)[0]["items"][2]["spec"]["template"]["spec"];
    assert_eq!(cart["containers"][0]["name"], "ferry-proxy");
    assert_eq!(cart["containers"][0]["image"], "example.com/ferry:dev");
}

/// Every input and every injected output is a valid Kubernetes 1.33 object, strictly (no unknown field, no warning).
#[test]
fn inputs_and_outputs_validate_for_kubernetes_1_33() {
    if !ferry_test_support::prerequisites(
        "kubernetes-validate",
        &[("kubernetes-validate (pip)", ferry_test_support::works("kubernetes-validate", &["--version"]))],
    ) {
        return;
    }
    let mut files = vec![];
    for (file, _) in inputs() {
        files.push(dir().join("input").join(&file));
        files.push(dir().join("golden").join(&file));
    }
    support::kubernetes_validate(&files);
}
