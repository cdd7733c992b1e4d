//! The README's demo command must keep working: run the built `demo` example against this build's `ferry`.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn demo_runs_and_reports_no_failures() {
    // cargo test builds the examples next to the test binaries: target/<profile>/examples/demo.
    let exe = std::env::current_exe().unwrap();
    let demo: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples").join("demo");
    if !demo.exists() {
        // `cargo test --test demo` alone does not build examples; build it (same profile, same target dir).
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", "demo", "-p", "ferry"]);
        if exe.parent().unwrap().parent().unwrap().ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building the demo example failed");
    }
    // The control-plane binaries live in the other package: build them (same profile) and point the demo at them.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let mut build = Command::new(&cargo);
    build.args(["build", "-p", "ferry-xds", "--bins"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "building ferry-control and ferryctl failed");
    let out = Command::new(&demo)
        .env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_CONTROL_BIN", profile_dir.join("ferry-control"))
        .env("FERRYCTL_BIN", profile_dir.join("ferryctl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("300 ok, 0 failed"), "{stdout}");
    for line in [
        "service.ferry.dev/api created",
        "trafficpolicy.ferry.dev/api created",
        "authorizationpolicy.ferry.dev/api created",
    ] {
        assert!(stdout.contains(line), "ferryctl apply output missing {line:?}:\n{stdout}");
    }
    assert!(
        stdout.contains(r#"ferry_requests_total{direction="outbound",service="api.default",status_class="2xx"} 301"#),
        "{stdout}"
    );
    assert_eq!(stdout.matches("exited: exit status: 0").count(), 2, "{stdout}");
}
