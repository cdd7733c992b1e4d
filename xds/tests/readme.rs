//! Every YAML example in the README is applied to a real `ferry-control` with `ferryctl`, and accepted.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The ```yaml blocks of the README, and the YAML heredocs (`<<'YAML'` ... `YAML`) inside its shell examples.
fn yaml_examples(readme: &str) -> Vec<String> {
    let mut examples = Vec::new();
    let mut current: Option<(String, &str)> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some((String::new(), "```")),
            None if line.trim_end().ends_with("<<'YAML'") => current = Some((String::new(), "YAML")),
            Some((text, end)) if line.trim() == *end => {
                examples.push(std::mem::take(text));
                current = None;
            }
            Some((text, _)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    examples
}

#[test]
fn every_readme_yaml_example_is_accepted() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let examples = yaml_examples(&readme);
    assert!(examples.len() >= 4, "found {} examples", examples.len());
    let state = std::env::temp_dir().join(format!("ferry-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (api, metrics) = (free(), free());
    let mut control = Command::new(env!("CARGO_BIN_EXE_ferry-control"))
        .args([
            "serve",
            "--state-dir",
            state.to_str().unwrap(),
            "--api-addr",
            &api.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(api).is_err() {
        assert!(Instant::now() < deadline, "ferry-control did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = std::fs::read_to_string(state.join("admin.token")).unwrap();
    for (i, example) in examples.iter().enumerate() {
        let mut ctl = Command::new(env!("CARGO_BIN_EXE_ferryctl"))
            .args(["apply", "-f", "-"])
            .env("FERRY_TOKEN", &token)
            .env("FERRY_CONTROL_API", format!("http://{api}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        ctl.stdin.take().unwrap().write_all(example.as_bytes()).unwrap();
        let out = ctl.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "README example {} refused: {}\n{example}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(" created") || said.contains(" configured") || said.contains(" unchanged"), "{said}");
    }
    let _ = control.kill();
    let _ = control.wait();
    let _ = std::fs::remove_dir_all(&state);
}
