//! `ferry init`: the nat-table rules that send a pod's TCP through the proxy, built as text, applied with iptables-restore.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// What `ferry init` intercepts and what it leaves alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// The proxy's UID: its own traffic is never redirected.
    pub proxy_uid: u32,
    /// Where intercepted inbound traffic goes (the inbound listener's port).
    pub inbound_port: u16,
    /// Where intercepted outbound traffic goes (the outbound listener's port).
    pub outbound_port: u16,
    /// Never intercepted inbound (kubelet probes and Prometheus reach it directly).
    pub health_port: u16,
    /// Inbound ports to intercept; empty means all.
    pub include_inbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations to intercept; empty means all.
    pub include_outbound_cidrs: Vec<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            health_port: 15020,
            include_inbound_ports: vec![],
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            include_outbound_cidrs: vec![],
            exclude_outbound_cidrs: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `iptables` or `ip6tables`.
    pub fn tools_name(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address the proxy dials the app from when it delivers inbound traffic to the pod's own address
    /// (as Istio does): the one connection from UID 1337 over `lo` that is not sent back to the inbound listener.
    pub fn inbound_source(self) -> std::net::IpAddr {
        match self {
            Family::V4 => INBOUND_SOURCE_V4.into(),
            Family::V6 => INBOUND_SOURCE_V6.into(),
        }
    }

    fn matches(self, cidr: &Cidr) -> bool {
        matches!((self, cidr.addr), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }
}

pub use ferry_api::cidr::Cidr;

/// The proxy's source address for inbound delivery to the app (IPv4: inside 127.0.0.0/8, always on `lo`).
pub const INBOUND_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6: `::6`, which is not a loopback address by itself; `ferry init` adds it to `lo`.
pub const INBOUND_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

pub const CHAINS: [&str; 4] = ["FERRY_INBOUND", "FERRY_IN_REDIRECT", "FERRY_OUTBOUND", "FERRY_REDIRECT"];
/// The jumps from the built-in chains into Ferry's, as `iptables` arguments (removed again by `--cleanup`).
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "FERRY_INBOUND"), ("OUTPUT", "FERRY_OUTBOUND")];

/// Pure: the `iptables-restore --noflush` input for one address family.
pub fn rules(cfg: &InitConfig, family: Family) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        out += &format!(":{chain} - [0:0]\n");
    }
    for (builtin, chain) in JUMPS {
        out += &format!("-A {builtin} -p tcp -j {chain}\n");
    }
    out += &format!("-A FERRY_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", cfg.inbound_port);
    out += &format!("-A FERRY_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", cfg.outbound_port);

    // Inbound: everything arriving for the pod, except the health port and exclusions.
    out += &format!("-A FERRY_INBOUND -p tcp --dport {} -j RETURN\n", cfg.health_port);
    for port in &cfg.exclude_inbound_ports {
        out += &format!("-A FERRY_INBOUND -p tcp --dport {port} -j RETURN\n");
    }
    if cfg.include_inbound_ports.is_empty() {
        out += "-A FERRY_INBOUND -p tcp -j FERRY_IN_REDIRECT\n";
    } else {
        for port in &cfg.include_inbound_ports {
            out += &format!("-A FERRY_INBOUND -p tcp --dport {port} -j FERRY_IN_REDIRECT\n");
        }
    }

    // Outbound: everything the app sends, except the proxy's own traffic, loopback and exclusions.
    let lo = family.loopback();
    let uid = cfg.proxy_uid;
    // The proxy delivering inbound traffic to the app at the pod's own address, from its reserved source: not
    // intercepted again (the app sees this source address).
    let source = family.inbound_source();
    let bits = if source.is_ipv4() { 32 } else { 128 };
    out += &format!("-A FERRY_OUTBOUND -o lo -s {source}/{bits} -j RETURN\n");
    // Any other call of the proxy to its own pod's address goes through its inbound side, as a peer's call would.
    out += &format!("-A FERRY_OUTBOUND -o lo ! -d {lo} -m owner --uid-owner {uid} -j FERRY_IN_REDIRECT\n");
    // The app talking to itself over loopback (or its own address) is not mesh traffic.
    out += &format!("-A FERRY_OUTBOUND -o lo -m owner ! --uid-owner {uid} -j RETURN\n");
    out += &format!("-A FERRY_OUTBOUND -m owner --uid-owner {uid} -j RETURN\n");
    out += &format!("-A FERRY_OUTBOUND -d {lo} -j RETURN\n");
    for port in &cfg.exclude_outbound_ports {
        out += &format!("-A FERRY_OUTBOUND -p tcp --dport {port} -j RETURN\n");
    }
    for cidr in cfg.exclude_outbound_cidrs.iter().filter(|c| family.matches(c)) {
        out += &format!("-A FERRY_OUTBOUND -d {cidr} -j RETURN\n");
    }
    if cfg.include_outbound_cidrs.is_empty() {
        out += "-A FERRY_OUTBOUND -j FERRY_REDIRECT\n";
    } else {
        for cidr in cfg.include_outbound_cidrs.iter().filter(|c| family.matches(c)) {
            out += &format!("-A FERRY_OUTBOUND -d {cidr} -j FERRY_REDIRECT\n");
        }
    }
    out += "COMMIT\n";
    out
}

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The one that already holds rules, else nft when present, else `iptables`.
    Auto,
    Nft,
    Legacy,
}

/// The binaries of one implementation and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub iptables: String,
    pub save: String,
    pub restore: String,
}

impl Tools {
    fn new(family: Family, variant: &str) -> Self {
        let base = family.tools_name();
        let name = |suffix: &str| {
            if variant.is_empty() { format!("{base}{suffix}") } else { format!("{base}-{variant}{suffix}") }
        };
        Tools { iptables: name(""), save: name("-save"), restore: name("-restore") }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{0} not found: install iptables and iproute2 (Debian: apt-get install iptables iproute2) or choose --iptables-mode"
    )]
    Missing(String),
    #[error(
        "{command} was not permitted ({detail}): ferry init needs root or CAP_NET_ADMIN in the pod's network namespace"
    )]
    NotPermitted { command: String, detail: String },
    #[error("{command} failed: {detail}")]
    Failed { command: String, detail: String },
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => InitError::Missing(program.to_string()),
            _ => InitError::Failed { command: program.to_string(), detail: e.to_string() },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| InitError::Failed { command: program.into(), detail: e.to_string() })?;
    }
    let out =
        child.wait_with_output().map_err(|e| InitError::Failed { command: program.into(), detail: e.to_string() })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let command = format!("{program} {}", args.join(" "));
    let lower = detail.to_lowercase();
    if lower.contains("permission denied")
        || lower.contains("must be root")
        || lower.contains("operation not permitted")
    {
        Err(InitError::NotPermitted { command, detail })
    } else {
        Err(InitError::Failed { command, detail })
    }
}

/// Picks the implementation: in auto mode, the one whose nat table already has rules (another init step or
/// kube-proxy wrote them), else nft if installed, else plain `iptables`.
pub fn select_tools(mode: Mode, family: Family) -> Result<Tools, InitError> {
    match mode {
        Mode::Nft => return Ok(Tools::new(family, "nft")),
        Mode::Legacy => return Ok(Tools::new(family, "legacy")),
        Mode::Auto => {}
    }
    let has_rules = |t: &Tools| {
        run(&t.save, &["-t", "nat"], None).map(|s| s.lines().any(|l| l.starts_with("-A "))).unwrap_or(false)
    };
    let (nft, legacy) = (Tools::new(family, "nft"), Tools::new(family, "legacy"));
    if has_rules(&legacy) && !has_rules(&nft) {
        return Ok(legacy);
    }
    if run(&nft.save, &["-t", "nat"], None).is_ok() {
        return Ok(nft);
    }
    Ok(Tools::new(family, ""))
}

/// Removes Ferry's jumps and chains (only those); a no-op when none exist.
pub fn cleanup(tools: &Tools) -> Result<(), InitError> {
    for (builtin, chain) in JUMPS {
        // A jump may have been added more than once by hand: remove every copy.
        while run(&tools.iptables, &["-t", "nat", "-D", builtin, "-p", "tcp", "-j", chain], None).is_ok() {}
    }
    let existing = run(&tools.save, &["-t", "nat"], None)?;
    for chain in CHAINS {
        if existing.lines().any(|l| l.starts_with(&format!(":{chain} "))) {
            run(&tools.iptables, &["-t", "nat", "-F", chain], None)?;
        }
    }
    for chain in CHAINS {
        if existing.lines().any(|l| l.starts_with(&format!(":{chain} "))) {
            run(&tools.iptables, &["-t", "nat", "-X", chain], None)?;
        }
    }
    Ok(())
}

/// Puts `::6` on `lo` (IPv6 only; IPv4's source is already a loopback address), so the proxy can dial the app from
/// it. Idempotent: an address already there is fine.
pub fn add_inbound_source(family: Family) -> Result<(), InitError> {
    if family == Family::V4 {
        return Ok(());
    }
    let disabled = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6");
    if disabled.is_ok_and(|v| v.trim() == "1") {
        eprintln!("ferry init: IPv6 is disabled on lo: no ::6 added (there is no IPv6 traffic to deliver)");
        return Ok(());
    }
    let address = format!("{}/128", family.inbound_source());
    match run("ip", &["-6", "addr", "add", &address, "dev", "lo", "nodad"], None) {
        Err(InitError::Failed { detail, .. })
            if detail.contains("File exists") || detail.contains("already assigned") =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// Installs the rules: cleanup first, so running twice leaves one copy.
pub fn apply(tools: &Tools, rules: &str) -> Result<(), InitError> {
    cleanup(tools)?;
    run(&tools.restore, &["--noflush"], Some(rules)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_v4() {
        let want = "\
*nat
:FERRY_INBOUND - [0:0]
:FERRY_IN_REDIRECT - [0:0]
:FERRY_OUTBOUND - [0:0]
:FERRY_REDIRECT - [0:0]
-A PREROUTING -p tcp -j FERRY_INBOUND
-A OUTPUT -p tcp -j FERRY_OUTBOUND
-A FERRY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A FERRY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A FERRY_INBOUND -p tcp --dport 15020 -j RETURN
-A FERRY_INBOUND -p tcp -j FERRY_IN_REDIRECT
-A FERRY_OUTBOUND -o lo -s 127.0.0.6/32 -j RETURN
-A FERRY_OUTBOUND -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j FERRY_IN_REDIRECT
-A FERRY_OUTBOUND -o lo -m owner ! --uid-owner 1337 -j RETURN
-A FERRY_OUTBOUND -m owner --uid-owner 1337 -j RETURN
-A FERRY_OUTBOUND -d 127.0.0.1/32 -j RETURN
-A FERRY_OUTBOUND -j FERRY_REDIRECT
COMMIT
";
        assert_eq!(rules(&InitConfig::default(), Family::V4), want);
    }

    #[test]
    fn exclusions_and_inclusions() {
        let cfg = InitConfig {
            exclude_inbound_ports: vec![22],
            include_inbound_ports: vec![8080, 9090],
            exclude_outbound_ports: vec![3306],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            include_outbound_cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        };
        let v4 = rules(&cfg, Family::V4);
        for line in [
            "-A FERRY_INBOUND -p tcp --dport 22 -j RETURN\n",
            "-A FERRY_INBOUND -p tcp --dport 8080 -j FERRY_IN_REDIRECT\n",
            "-A FERRY_INBOUND -p tcp --dport 9090 -j FERRY_IN_REDIRECT\n",
            "-A FERRY_OUTBOUND -p tcp --dport 3306 -j RETURN\n",
            "-A FERRY_OUTBOUND -d 10.0.0.0/8 -j RETURN\n",
            "-A FERRY_OUTBOUND -d 192.0.2.0/24 -j FERRY_REDIRECT\n",
        ] {
            assert!(v4.contains(line), "missing {line:?} in\n{v4}");
        }
        assert!(!v4.contains("-A FERRY_INBOUND -p tcp -j FERRY_IN_REDIRECT"), "only included ports are intercepted");
        assert!(!v4.contains("-A FERRY_OUTBOUND -j FERRY_REDIRECT"), "only included CIDRs are intercepted");
        assert!(!v4.contains("fd00"), "IPv6 blocks stay out of the IPv4 table");
        let v6 = rules(&cfg, Family::V6);
        assert!(v6.contains("-A FERRY_OUTBOUND -d fd00::/8 -j RETURN\n"));
        assert!(v6.contains("-A FERRY_OUTBOUND -d ::1/128 -j RETURN\n"));
        assert!(v6.contains("-A FERRY_OUTBOUND -o lo -s ::6/128 -j RETURN\n"), "{v6}");
        assert!(!v6.contains("10.0.0.0"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        for bad in ["10.0.0.0/33", "x/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tool_names() {
        assert_eq!(Tools::new(Family::V6, "nft").restore, "ip6tables-nft-restore");
        assert_eq!(Tools::new(Family::V4, "").save, "iptables-save");
    }
}
