//! The `ferry` command: `ferry run` (the default) starts the sidecar proxy; `ferry init` writes the pod's iptables rules.

use clap::{Args, Parser, Subcommand};
use ferry::init::{self, Cidr, Family, InitConfig, Mode};
use ferry::settings::Settings;

/// mimalloc instead of the C library's allocator: a proxied request allocates and frees about 50 small blocks, where
/// glibc's malloc (`_int_malloc`, `malloc_consolidate`) cost about 6 % of the proxy's CPU in the flame graphs
/// (benches/README.md, "Data-path cuts"). Built without transparent huge pages (`no_thp`, and `run` turns them off
/// for the process): a 2 MiB page under its arena added 6 MiB to an idle proxy's RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry's per-pod sidecar proxy. Settings come from FERRY_* environment variables (see README)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Write the nat-table rules that redirect the pod's TCP to the proxy (needs CAP_NET_ADMIN; run in the pod's
    /// network namespace, before the app starts).
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// Print the rules (iptables-restore input, per family) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Remove Ferry's chains and jumps (only those) and exit.
    #[arg(long)]
    cleanup: bool,
    /// The proxy's UID, whose own traffic is never redirected.
    #[arg(long, env = "FERRY_PROXY_UID", default_value_t = 1337)]
    proxy_uid: u32,
    /// The inbound listener's port.
    #[arg(long, env = "FERRY_INIT_INBOUND_PORT", default_value_t = 15006)]
    inbound_port: u16,
    /// The outbound listener's port.
    #[arg(long, env = "FERRY_INIT_OUTBOUND_PORT", default_value_t = 15001)]
    outbound_port: u16,
    /// The health port, never intercepted.
    #[arg(long, env = "FERRY_INIT_HEALTH_PORT", default_value_t = 15020)]
    health_port: u16,
    /// Inbound ports to intercept (comma-separated); empty or `*` means all.
    #[arg(long, env = "FERRY_INCLUDE_INBOUND_PORTS", value_delimiter = ',', value_parser = port_or_star)]
    include_inbound_ports: Vec<Option<u16>>,
    /// Inbound ports never intercepted (comma-separated).
    #[arg(long, env = "FERRY_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports never intercepted (comma-separated).
    #[arg(long, env = "FERRY_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations to intercept (CIDRs, comma-separated); empty or `*` means all.
    #[arg(long, env = "FERRY_INCLUDE_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = cidr_or_star)]
    include_outbound_cidrs: Vec<Option<Cidr>>,
    /// Outbound destinations never intercepted (CIDRs, comma-separated).
    #[arg(long, env = "FERRY_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Which iptables to drive.
    #[arg(long, env = "FERRY_IPTABLES_MODE", value_enum, default_value_t = Mode::Auto)]
    iptables_mode: Mode,
    /// Also write ip6tables rules: `auto` when the host has IPv6.
    #[arg(long, env = "FERRY_INIT_IPV6", value_enum, default_value_t = Ipv6::Auto)]
    ipv6: Ipv6,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Ipv6 {
    Auto,
    On,
    Off,
}

fn port_or_star(s: &str) -> Result<Option<u16>, String> {
    if s.trim() == "*" { Ok(None) } else { s.trim().parse().map(Some).map_err(|e| format!("`{s}`: {e}")) }
}

fn cidr_or_star(s: &str) -> Result<Option<Cidr>, String> {
    if s.trim() == "*" { Ok(None) } else { s.parse().map(Some) }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(),
        Command::Init(args) => run_init(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Kernels with transparent huge pages `always` would back the allocator's arena with 2 MiB pages; a sidecar's heap
    // is a few MiB, so its RSS would be mostly untouched huge pages. Best effort: an old kernel refuses it harmlessly.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let settings = Settings::from_env()?;
    let log = ferry::telemetry::logging::init(settings.log_format, &settings.log_level);
    let runtime = if settings.workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(settings.workers).enable_all().build()?
    };
    runtime.block_on(ferry::app::run(settings, Some(log)))?;
    // Upgraded connections and pooled-connection tasks are not waited for past the drain.
    runtime.shutdown_background();
    Ok(())
}

fn run_init(args: InitArgs) -> anyhow::Result<()> {
    let cfg = InitConfig {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        health_port: args.health_port,
        include_inbound_ports: args.include_inbound_ports.into_iter().flatten().collect(),
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        include_outbound_cidrs: args.include_outbound_cidrs.into_iter().flatten().collect(),
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
    };
    let ipv6 = match args.ipv6 {
        Ipv6::On => true,
        Ipv6::Off => false,
        Ipv6::Auto => std::path::Path::new("/proc/net/if_inet6").exists(),
    };
    let families: Vec<Family> = if ipv6 { vec![Family::V4, Family::V6] } else { vec![Family::V4] };
    for family in families {
        let rules = init::rules(&cfg, family);
        if args.dry_run {
            println!("# {} (iptables-restore --noflush)\n{rules}", family.tools_name());
            continue;
        }
        let tools = init::select_tools(args.iptables_mode, family)?;
        if args.cleanup {
            init::cleanup(&tools)?;
            eprintln!("ferry init: removed Ferry's {} rules ({})", family.tools_name(), tools.iptables);
        } else {
            init::apply(&tools, &rules)?;
            init::add_inbound_source(family)?;
            eprintln!("ferry init: {} rules installed with {}", family.tools_name(), tools.restore);
        }
    }
    Ok(())
}
