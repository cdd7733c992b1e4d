//! The pod suite: pods made from `ferryctl inject`'s output run in real containers of the images `deploy/Dockerfile`
//! builds, on a small test node (`node.rs`; Docker Engine, root).

#[path = "../../xds/tests/support/mod.rs"]
mod control;
mod node;
#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_xds::kubernetes::inject;
use node::{Node, Pod, docker_must, images};
use serde_json::{Value, json};

/// A Pod `shop/<name>` (service account `account`, one app container) as `ferryctl inject` writes it.
fn injected(name: &str, account: &str) -> Value {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": {"app": account}},
        "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "example.com/app:1"}]}});
    let (out, _) = inject::inject_yaml(&pod.to_string(), &inject::Settings::default()).unwrap();
    serde_saphyr::from_str(&out).unwrap()
}

/// The node's image for an image a spec names: the proxy's is the locally built one.
fn local_image(name: &str) -> String {
    let default = inject::Settings::default().proxy_image;
    assert_eq!(name, default, "the node runs only the project's images");
    images().proxy.clone()
}

/// The pod's volumes as the node mounts them: the `ferry-ca-root` ConfigMap and the projected token, as files.
fn volumes(node: &Node, pod: &str) -> BTreeMap<String, std::path::PathBuf> {
    let ca = node.dir.path().join(format!("{pod}-ca"));
    let token = node.dir.path().join(format!("{pod}-token"));
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::create_dir_all(&token).unwrap();
    let root = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(ca.join("root.pem"), root.pem()).unwrap();
    std::fs::write(token.join("token"), format!("token-{pod}")).unwrap();
    BTreeMap::from([("ferry-ca-root".to_string(), ca), ("ferry-token".to_string(), token)])
}

/// Injected containers run with exactly the security context the spec gives them, and no more: `ferry-init` writes
/// the pod's rules with NET_ADMIN and NET_RAW only (and fails without NET_ADMIN); the proxy runs as UID 1337, with
/// every capability dropped, on a read-only root (where a write fails), and answers its liveness probe.
#[test]
fn injected_containers_run_with_no_more_than_their_spec_grants() {
    if !node::available("injected_containers_run_with_no_more_than_their_spec_grants") {
        return;
    }
    let node = Node::new("sec");
    let spec = injected("api-1", "api");
    let pause = node.pause("api-1", 10, &[]);
    let pod = Pod {
        name: "api-1".into(),
        namespace: "shop".into(),
        pause: format!("{}-api-1", node.network),
        ip: pause,
        volumes: volumes(&node, "api-1"),
        spec,
    };
    let inits = pod.init_containers();
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!((init["name"].as_str(), proxy["name"].as_str()), (Some("ferry-init"), Some("ferry-proxy")));

    // The honesty of the node first: without NET_ADMIN, ferry init cannot write the rules, and says so.
    let mut weaker = init.clone();
    weaker["securityContext"]["capabilities"]["add"] = json!(["NET_RAW"]);
    let out = node.run_init(&pod, &weaker, &local_image);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "ferry init without NET_ADMIN succeeded: {said}");
    assert!(said.contains("not permitted") || said.contains("Permission denied"), "{said}");

    // As injected: the rules are in the pod's namespace, the reserved delivery source's RETURN among them.
    let out = node.run_init(&pod, init, &local_image);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferry init as injected failed: {said}");
    let network = format!("container:{}", pod.pause);
    let base = &images().base;
    let rules =
        docker_must(&["run", "--rm", "--network", &network, "--cap-add=NET_ADMIN", base, "iptables-save", "-t", "nat"]);
    assert!(
        rules.contains(":FERRY_INBOUND") && rules.contains("-A FERRY_OUTBOUND -s 127.0.0.6/32 -o lo -j RETURN"),
        "{rules}"
    );

    // The proxy: UID 1337, no capability, read-only root; alive (it has no control plane here to start).
    let name = node.start(&pod, proxy, &local_image);
    let probe = node.wait_probe(&pod, &proxy["livenessProbe"], Duration::from_secs(20));
    assert!(probe.is_ok(), "{probe:?}\n{}", node.logs(&name));
    let pid = docker_must(&["inspect", "--format", "{{.State.Pid}}", &name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
    assert!(line("Uid:").split_whitespace().skip(1).all(|u| u == "1337"), "{}", line("Uid:"));
    assert!(line("CapEff:").ends_with("0000000000000000"), "{}", line("CapEff:"));
    // Honesty again: a container with the proxy's security context cannot write to its root.
    let mut writer = proxy.clone();
    writer["name"] = json!("writer");
    writer["command"] = json!(["/bin/sh", "-c", "echo x > /written"]);
    writer["args"] = json!([]);
    let out = node.run_init(&pod, &writer, &local_image);
    assert!(!out.status.success(), "a write to a read-only root succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{out:?}");
}
