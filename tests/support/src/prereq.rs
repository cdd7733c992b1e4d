//! Test prerequisites, shared by both packages' test supports: under `CI=true` a missing one fails the test.

use std::process::{Command, Stdio};

/// Whether every prerequisite `(what, present)` of `test` is there. Under `CI=true` a missing one fails the test;
/// elsewhere the test returns early with a message.
pub fn prerequisites(test: &str, checks: &[(&str, bool)]) -> bool {
    let missing: Vec<&str> = checks.iter().filter(|(_, ok)| !ok).map(|(what, _)| *what).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("{test}: needs {}", missing.join(", "));
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message} (CI=true: prerequisites are mandatory)");
    eprintln!("skipped: {message}");
    false
}

/// Whether `program args` runs and succeeds.
pub fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}
