//! Shared by the control-plane tests: a real `ferry-control` process over a temporary state directory, and ferryctl.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const CONTROL: &str = env!("CARGO_BIN_EXE_ferry-control");
pub const CTL: &str = env!("CARGO_BIN_EXE_ferryctl");

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A `ferry-control serve` process over a state directory; killed when dropped.
pub struct ControlPlane {
    pub child: Child,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl ControlPlane {
    pub fn start(state: &Path) -> ControlPlane {
        let cp = Self::spawn(state);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(cp.api).is_err() {
            assert!(
                Instant::now() < deadline,
                "ferry-control did not start: {}",
                std::fs::read_to_string(&cp.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cp
    }

    pub fn spawn(state: &Path) -> ControlPlane {
        let (api, metrics) = (free_addr(), free_addr());
        let log = state.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(CONTROL)
            .args([
                "serve",
                "--state-dir",
                state.to_str().unwrap(),
                "--api-addr",
                &api.to_string(),
                "--metrics-addr",
                &metrics.to_string(),
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        ControlPlane { child, api, metrics, state: state.to_path_buf(), log }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state.join("admin.token")).unwrap()
    }

    /// Runs ferryctl against this control plane, with `stdin` piped in when given.
    pub fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(CTL)
            .args(args)
            .env("FERRY_TOKEN", self.token())
            .env("FERRY_CONTROL_API", format!("http://{}", self.api))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.ctl(args, stdin);
        assert!(out.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.ctl(args, stdin);
        assert!(!out.status.success(), "ferryctl {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn state_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-control-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
