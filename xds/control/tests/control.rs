//! `ferry-control` and `ferryctl` as real processes: round trips, validation messages, durability, security.

use ferry_test_support::control as support;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_test_support::free_addr;
use support::{ControlPlane, control_bin, ctl_bin, state_dir};

const SERVICE: &str = "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {name: payments, namespace: shop}\nspec: {ports: [{port: 8080, protocol: http}], addresses: [payments, payments.shop], identities: [payments]}\n";
const TRAFFIC: &str = "apiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: payments, namespace: shop}\nspec:\n  targetRef: {kind: Service, name: payments}\n  timeout: 2s\n  retries: {attempts: 2, perTryTimeout: 500ms, on: [connect-failure, \"503\"], budget: {percent: 20, minPerSecond: 10}}\n  circuitBreaker: {failureRatio: 0.6, minRequests: 3, interval: 60s, openFor: 10s}\n  rateLimit: {requestsPerSecond: 100, burst: 200}\n";
const AUTHZ: &str = "apiVersion: ferry.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: payments, namespace: shop}\nspec: {targetRef: {kind: Service, name: payments}, defaultAction: deny, allow: [{from: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}}]}\n";

#[test]
fn apply_get_delete_round_trip_for_every_kind() {
    let dir = state_dir("roundtrip");
    let cp = ControlPlane::start(&dir);
    let all = format!("{SERVICE}---\n{TRAFFIC}---\n{AUTHZ}");
    assert_eq!(
        cp.ok(&["apply", "-f", "-"], Some(&all)),
        "service.ferry.dev/payments created\ntrafficpolicy.ferry.dev/payments created\nauthorizationpolicy.ferry.dev/payments created\n"
    );
    assert_eq!(
        cp.ok(&["apply", "-f", "-"], Some(&all)),
        "service.ferry.dev/payments unchanged\ntrafficpolicy.ferry.dev/payments unchanged\nauthorizationpolicy.ferry.dev/payments unchanged\n"
    );
    let changed = TRAFFIC.replace("timeout: 2s", "timeout: 3s");
    assert_eq!(cp.ok(&["apply", "-f", "-"], Some(&changed)), "trafficpolicy.ferry.dev/payments configured\n");
    // A file and a directory work like stdin.
    let file = dir.with_extension("yaml");
    std::fs::write(&file, &all).unwrap();
    assert!(
        cp.ok(&["apply", "-f", file.to_str().unwrap()], None).contains("trafficpolicy.ferry.dev/payments configured")
    );

    for (kind, spelling, doc) in [
        ("Service", "services", SERVICE),
        ("TrafficPolicy", "TrafficPolicy", TRAFFIC),
        ("AuthorizationPolicy", "authorizationpolicies", AUTHZ),
    ] {
        let json: serde_json::Value =
            serde_json::from_str(&cp.ok(&["get", spelling, "payments", "-n", "shop", "-o", "json"], None)).unwrap();
        assert_eq!(json["kind"], kind);
        assert_eq!(json["metadata"]["namespace"], "shop");
        let applied: serde_json::Value = serde_json::to_value(&ferry_api::parse_documents(doc).unwrap()[0]).unwrap();
        if kind != "TrafficPolicy" {
            assert_eq!(json["spec"], applied["spec"], "{kind} comes back as applied");
        }
        let yaml = cp.ok(&["get", spelling, "payments", "-n", "shop", "-o", "yaml"], None);
        assert!(yaml.contains(&format!("kind: {kind}")), "{yaml}");
        let table = cp.ok(&["get", spelling], None);
        assert!(table.contains("shop") && table.contains("payments"), "{table}");
    }
    let tp: serde_json::Value =
        serde_json::from_str(&cp.ok(&["get", "tp", "payments", "-n", "shop", "-o", "json"], None)).unwrap();
    assert_eq!((tp["spec"]["timeout"].as_str(), tp["metadata"]["generation"].as_u64()), (Some("2s"), Some(3)));

    for kind in ["authorizationpolicy", "trafficpolicy", "service"] {
        assert_eq!(
            cp.ok(&["delete", kind, "payments", "-n", "shop"], None),
            format!("{kind}.ferry.dev/payments deleted\n")
        );
        assert!(cp.fails(&["get", kind, "payments", "-n", "shop"], None).contains("not found"));
    }
    assert!(cp.fails(&["delete", "service", "payments", "-n", "shop"], None).contains("not found"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_refused_naming_the_field_and_stores_nothing() {
    let dir = state_dir("invalid");
    let cp = ControlPlane::start(&dir);
    let cases: &[(String, &str)] = &[
        ("kind: [unclosed".into(), "YAML"),
        (SERVICE.replace("kind: Service", "kind: Gateway"), "kind: unknown kind `Gateway`"),
        (
            SERVICE.replace("identities: [payments]", "identities: [payments], colour: red"),
            "spec.colour: unknown field `colour`",
        ),
        (TRAFFIC.replace("timeout: 2s", "timeout: banana"), "spec.timeout: `banana`"),
        (TRAFFIC.replace("timeout: 2s", "timeout: -5s"), "spec.timeout: `-5s`"),
        (TRAFFIC.replace("percent: 20", "percent: 150"), "spec.retries.budget.percent: must be 0-100"),
        (TRAFFIC.replace("failureRatio: 0.6", "failureRatio: 1.5"), "spec.circuitBreaker.failureRatio"),
        (TRAFFIC.replace("burst: 200", "burst: 0"), "spec.rateLimit.burst: must be at least 1"),
        (TRAFFIC.replace("attempts: 2", "attempts: -1"), "spec.retries.attempts"),
        (TRAFFIC.replace("  targetRef: {kind: Service, name: payments}\n", ""), "spec: missing field `targetRef`"),
        (
            SERVICE.replace("metadata: {name: payments, namespace: shop}", "metadata: {namespace: shop}"),
            "metadata: missing field `name`",
        ),
    ];
    for (doc, want) in cases {
        // Each bad document travels with a good one: the apply stores neither.
        let body = format!("{SERVICE}---\n{doc}");
        let err = cp.fails(&["apply", "-f", "-"], Some(&body));
        assert!(err.contains(want), "\n  got: {err}\n want: {want}");
        // The same rules offline.
        let out = Command::new(ctl_bin())
            .args(["validate", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = out;
        out.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = out.wait_with_output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(want));
    }
    assert!(!cp.ok(&["get", "services"], None).contains("payments"), "nothing was stored");

    // A second TrafficPolicy for the same Service names the first.
    cp.ok(&["apply", "-f", "-"], Some(&format!("{SERVICE}---\n{TRAFFIC}")));
    let second = TRAFFIC.replace("metadata: {name: payments,", "metadata: {name: payments-fast,");
    let err = cp.fails(&["apply", "-f", "-"], Some(&second));
    assert!(
        err.contains("TrafficPolicy shop/payments-fast") && err.contains("already has TrafficPolicy `payments`"),
        "{err}"
    );

    // A 10 MiB document is refused before it is read whole.
    let huge = format!("{SERVICE}# {}\n", "x".repeat(10 * 1024 * 1024));
    let err = cp.fails(&["apply", "-f", "-"], Some(&huge));
    assert!(err.contains("request body over 4 MiB") && err.contains("413"), "{err}");
    // The server's own limit: a declared 10 MiB body is refused with 413 before any of it is read.
    let mut s = std::net::TcpStream::connect(cp.api).unwrap();
    write!(
        s,
        "POST /v1/apply HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        cp.token().trim(),
        10 * 1024 * 1024
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = std::io::Read::read(&mut s, &mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413") && head.contains("request body over 4 MiB"), "{head}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raw API call with an optional token: (status, body).
fn raw(api: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(api).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: api\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.split_whitespace().nth(1).unwrap().parse().unwrap(), out)
}

#[test]
fn security_defaults() {
    let dir = state_dir("security");
    let cp = ControlPlane::start(&dir);
    assert_eq!(raw(cp.api, "GET", "/v1/services", None).0, 401);
    assert_eq!(raw(cp.api, "GET", "/v1/services", Some("wrong")).0, 401);
    assert_eq!(raw(cp.api, "GET", "/v1/services", Some(&"0".repeat(64))).0, 401);
    assert_eq!(raw(cp.api, "GET", "/v1/services", Some(cp.token().trim())).0, 200);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("admin.token")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    // The API's default address is loopback (the flag's documented default).
    let help = String::from_utf8_lossy(&Command::new(control_bin()).args(["serve", "--help"]).output().unwrap().stdout)
        .to_string();
    assert!(help.contains("[default: 127.0.0.1:15011]"), "{help}");
    let (status, body) = raw(cp.metrics, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("ferry_control_api_requests_total{code=\"401\"} 3"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigkill_during_applies_loses_nothing_accepted() {
    let dir = state_dir("durability");
    let mut cp = ControlPlane::start(&dir);
    let token = cp.token();
    let api = cp.api;
    // A bounded stream of applies from another thread; each returns only after the store committed it.
    let writer = std::thread::spawn(move || {
        let mut accepted = Vec::new();
        for i in 0..400 {
            let body = format!(
                "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{port: 80}}]}}\n---\napiVersion: ferry.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: tp-{i}}}\nspec: {{targetRef: {{kind: Service, name: svc-{i}}}, timeout: {}s}}\n",
                i % 50 + 1
            );
            let Ok(mut s) = std::net::TcpStream::connect(api) else { break };
            let req = format!(
                "POST /v1/apply HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                token.trim(),
                body.len()
            );
            if s.write_all(req.as_bytes()).is_err() {
                break;
            }
            let mut out = String::new();
            use std::io::Read;
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                accepted.push(i);
            } else {
                break;
            }
        }
        accepted
    });
    std::thread::sleep(Duration::from_millis(400));
    cp.child.kill().unwrap(); // SIGKILL
    cp.child.wait().unwrap();
    let accepted = writer.join().unwrap();
    assert!(!accepted.is_empty(), "some applies completed before the kill");
    let cp = ControlPlane::start(&dir);
    let services: serde_json::Value = serde_json::from_str(&cp.ok(&["get", "services", "-o", "json"], None)).unwrap();
    let policies: serde_json::Value = serde_json::from_str(&cp.ok(&["get", "tp", "-o", "json"], None)).unwrap();
    let names = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_array().unwrap().iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect()
    };
    let (services, policies) = (names(&services), names(&policies));
    for i in &accepted {
        assert!(
            services.contains(&format!("svc-{i}")) && policies.contains(&format!("tp-{i}")),
            "accepted apply {i} lost"
        );
    }
    // All-or-nothing: every stored Service has its TrafficPolicy (they were applied together).
    for s in &services {
        assert!(policies.contains(&s.replace("svc-", "tp-")), "{s} stored without its policy: a half-written apply");
    }
    eprintln!("{} applies accepted before SIGKILL, {} Services after restart", accepted.len(), services.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_object_file_stops_startup_naming_it() {
    let dir = state_dir("corrupt");
    {
        let cp = ControlPlane::start(&dir);
        cp.ok(&["apply", "-f", "-"], Some(SERVICE));
    }
    let file = dir.join("objects/Service/shop/payments.json");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &text[..text.len() / 3]).unwrap();
    let mut cp = ControlPlane::spawn(&dir);
    let status = cp.child.wait().unwrap();
    assert!(!status.success(), "must refuse to start");
    let log = std::fs::read_to_string(&cp.log).unwrap();
    assert!(log.contains("objects/Service/shop/payments.json") && log.contains("corrupt"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn openssl_verify(ca: &Path, cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", ca.to_str().unwrap(), cert.to_str().unwrap()])
        .output()
        .expect("openssl");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn mesh_root_is_created_once_and_signs_the_serving_certificate() {
    let dir = state_dir("ca");
    let first_root;
    {
        let _cp = ControlPlane::start(&dir);
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("ca.key"), mode("server.key")), (0o600, 0o600));
        first_root = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        assert_eq!(
            openssl_verify(&dir.join("ca.crt"), &dir.join("server.crt")).trim_end(),
            format!("{}: OK", dir.join("server.crt").display())
        );
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", dir.join("server.crt").to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("DNS:ferry-control") && text.contains("IP Address:127.0.0.1") && text.contains("CA:FALSE"),
            "{text}"
        );
    }
    // A restart keeps the root (proxies trust it) and signs a fresh serving certificate with it.
    let _cp = ControlPlane::start(&dir);
    assert_eq!(std::fs::read_to_string(dir.join("ca.crt")).unwrap(), first_root);
    assert!(openssl_verify(&dir.join("ca.crt"), &dir.join("server.crt")).trim_end().ends_with(": OK"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_supplied_root_is_used_and_a_readable_key_refused() {
    let own = state_dir("byo-root");
    std::fs::create_dir_all(&own).unwrap();
    let key = own.join("root.key");
    let cert = own.join("root.crt");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=Operator root",
        ])
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-keyout", key.to_str().unwrap(), "-out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = state_dir("byo-state");
    let run = |extra: &[&str]| {
        let mut child = Command::new(control_bin())
            .args([
                "serve",
                "--state-dir",
                dir.to_str().unwrap(),
                "--api-addr",
                &free_addr().to_string(),
                "--metrics-addr",
                &free_addr().to_string(),
                "--xds-addr",
                &free_addr().to_string(),
            ])
            .args(["--ca-cert", cert.to_str().unwrap(), "--ca-key", key.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("server.crt").exists() && child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = child.kill();
        child.wait_with_output().unwrap()
    };
    run(&[]);
    assert!(
        openssl_verify(&cert, &dir.join("server.crt")).trim_end().ends_with(": OK"),
        "signed by the operator's root"
    );
    assert!(!dir.join("ca.key").exists(), "no root of our own when one is supplied");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root.key") && err.contains("must be 0600"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&own);
}

#[test]
fn dry_run_directories_replace_and_version() {
    let dir = state_dir("ctl-misc");
    let cp = ControlPlane::start(&dir);
    // --dry-run validates on the server and stores nothing.
    assert_eq!(
        cp.ok(&["apply", "--dry-run", "-f", "-"], Some(SERVICE)),
        "service.ferry.dev/payments created (dry run)\n"
    );
    assert!(cp.fails(&["get", "service", "payments", "-n", "shop"], None).contains("not found"));
    // A directory: every .yaml/.yml/.json file in name order, applied as one all-or-nothing batch.
    let files = dir.with_extension("d");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("1-service.yaml"), SERVICE).unwrap();
    std::fs::write(files.join("2-traffic.yml"), TRAFFIC).unwrap();
    std::fs::write(files.join("notes.txt"), "not a policy").unwrap();
    assert_eq!(
        cp.ok(&["apply", "-f", files.to_str().unwrap()], None),
        "service.ferry.dev/payments created\ntrafficpolicy.ferry.dev/payments created\n"
    );
    // Replace one object by name; the body must be that object.
    let token = cp.token();
    let put = |path: &str, body: &str| {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(cp.api).unwrap();
        write!(s, "PUT {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", token.trim(), body.len()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let reply = put("/v1/trafficpolicies/shop/payments", &TRAFFIC.replace("timeout: 2s", "timeout: 4s"));
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\"outcome\": \"configured\""), "{reply}");
    let reply = put("/v1/trafficpolicies/shop/other", TRAFFIC);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("exactly one document: TrafficPolicy shop/other"),
        "{reply}"
    );
    assert_eq!(cp.ok(&["version"], None), format!("ferryctl {}\n", env!("CARGO_PKG_VERSION")));
    assert!(cp.fails(&["get", "gateways"], None).contains("unknown kind `gateways`"));
    let _ = std::fs::remove_dir_all(&files);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn join_tokens_create_list_revoke_and_survive_restart() {
    let dir = state_dir("tokens");
    let token;
    {
        let cp = ControlPlane::start(&dir);
        token = cp
            .ok(&["token", "create", "-n", "shop", "--service-account", "payments", "--ttl", "1h"], None)
            .trim()
            .to_string();
        let (id, secret) = token.split_once('.').expect("<id>.<secret>");
        assert_eq!((id.len(), secret.len()), (16, 64));
        let list = cp.ok(&["token", "list"], None);
        assert!(list.contains(id) && list.contains("payments") && !list.contains(secret), "{list}");
        // The secret is never stored: only its digest.
        let on_disk = std::fs::read_to_string(dir.join("tokens").join(format!("{id}.json"))).unwrap();
        assert!(!on_disk.contains(secret));
        assert!(
            cp.fails(&["token", "create", "-n", "Shop!", "--service-account", "payments"], None)
                .contains("namespace: `Shop!` must be a DNS label")
        );
        assert!(
            cp.fails(&["token", "create", "-n", "shop", "--service-account", "a", "--ttl", "forever"], None)
                .contains("ttl:")
        );
        assert!(cp.fails(&["token", "revoke", "0000"], None).contains("no such token"));
    }
    // Durable: after a restart the token is listed, and revocation sticks.
    let cp = ControlPlane::start(&dir);
    let id = token.split_once('.').unwrap().0;
    assert!(cp.ok(&["token", "list"], None).contains(id));
    assert_eq!(cp.ok(&["token", "revoke", id], None), format!("token {id} revoked\n"));
    drop(cp);
    let cp = ControlPlane::start(&dir);
    let list = cp.ok(&["token", "list"], None);
    let row = list.lines().find(|l| l.contains(id)).unwrap();
    assert!(row.trim_end().ends_with("true"), "{row}");
    let _ = std::fs::remove_dir_all(&dir);
}
