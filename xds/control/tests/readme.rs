//! Every YAML example in the README is applied to a real `ferry-control` with `ferryctl`, and accepted.

use ferry_test_support::control as support;

use support::{ControlPlane, state_dir};

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
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let examples = yaml_examples(&readme);
    assert!(examples.len() >= 4, "found {} examples", examples.len());
    let cp = ControlPlane::start(&state_dir("readme"));
    for (i, example) in examples.iter().enumerate() {
        let out = cp.ctl(&["apply", "-f", "-"], Some(example));
        assert!(
            out.status.success(),
            "README example {} refused: {}\n{example}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(" created") || said.contains(" configured") || said.contains(" unchanged"), "{said}");
    }
    let _ = std::fs::remove_dir_all(&cp.state);
}
