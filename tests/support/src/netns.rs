//! Network namespaces for the interception tests: two hosts joined by a veth pair, test addresses only inside them.

use std::fs::File;

use super::works;
use std::future::Future;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;

pub const CLIENT_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
pub const CLIENT_V6: &str = "fd00:f0e7::1";
pub const SERVER_V6: &str = "fd00:f0e7::2";

/// Whether this machine can run namespace tests (root, iproute2, iptables, ip6tables, setpriv, curl). Under
/// `CI=true` a missing prerequisite fails the test; elsewhere the test returns early with a message.
pub fn available(test: &str) -> bool {
    super::prerequisites(
        test,
        &[
            ("root", Command::new("id").arg("-u").output().ok().filter(|o| o.stdout.starts_with(b"0\n")).is_some()),
            ("ip (iproute2)", works("ip", &["-V"])),
            ("iptables", works("iptables", &["--version"])),
            ("ip6tables", works("ip6tables", &["--version"])),
            ("setpriv (util-linux)", works("setpriv", &["--version"])),
            ("curl", works("curl", &["--version"])),
        ],
    )
}

/// Runs a command and panics with its output when it fails.
pub fn must(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace; the processes started in it are killed and the namespace deleted when dropped.
pub struct NetNs {
    pub name: String,
    children: Mutex<Vec<Child>>,
}

impl NetNs {
    pub fn new(name: &str) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        must("ip", &["netns", "add", name]);
        must("ip", &["-n", name, "link", "set", "lo", "up"]);
        NetNs { name: name.to_string(), children: Mutex::new(Vec::new()) }
    }

    /// `ip netns exec <ns> program args...`, waiting for it.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        Command::new("ip").args(&full).output().unwrap()
    }

    /// Like `run`, panicking on failure; returns stdout.
    pub fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "in {}: {program} {}: {}{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `program` in the namespace (killed when the namespace is dropped).
    pub fn spawn(&self, program: &str, args: &[&str], envs: &[(&str, String)], log: File) -> usize {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        let mut children = self.children.lock().unwrap();
        children.push(child);
        children.len() - 1
    }

    /// Kills (SIGKILL) what `spawn` started as `index`, and waits for it.
    pub fn kill(&self, index: usize) {
        let mut children = self.children.lock().unwrap();
        let _ = children[index].kill();
        let _ = children[index].wait();
    }

    /// Runs `f` to completion on a thread that has entered this namespace: every socket it opens lives there.
    pub fn block_on<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = File::open(&path).unwrap();
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(f())
            })
            .join()
            .unwrap()
        })
    }

    /// Runs `f` on a thread inside this namespace until the returned guard is dropped (servers for a test).
    pub fn background<F, Fut>(&self, f: F) -> Background
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let work = f();
                ready_tx.send(()).unwrap();
                tokio::select! {
                    _ = work => {}
                    _ = stopped => {}
                }
            });
        });
        ready_rx.recv().unwrap();
        Background { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Work running inside a namespace; stopped when dropped.
pub struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Two namespaces, `client` and `server`, joined by a veth pair with IPv4 and IPv6 test addresses.
pub struct Pair {
    pub client: NetNs,
    pub server: NetNs,
}

impl Pair {
    /// `tag` keeps concurrent tests apart (namespace and interface names).
    pub fn new(tag: &str) -> Pair {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let client = NetNs::new(&format!("ferry-{id}-c"));
        let server = NetNs::new(&format!("ferry-{id}-s"));
        let (vc, vs) = (format!("fc{id}"), format!("fs{id}"));
        must("ip", &["link", "add", &vc, "type", "veth", "peer", "name", &vs]);
        must("ip", &["link", "set", &vc, "netns", &client.name]);
        must("ip", &["link", "set", &vs, "netns", &server.name]);
        for (ns, dev, v4, v6) in [(&client, &vc, CLIENT_V4, CLIENT_V6), (&server, &vs, SERVER_V4, SERVER_V6)] {
            must("ip", &["-n", &ns.name, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            must("ip", &["-n", &ns.name, "-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            must("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Pair { client, server }
    }
}
