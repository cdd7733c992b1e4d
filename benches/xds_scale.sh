#!/usr/bin/env bash
# Control-plane scale benchmark: builds ferry-control, ferryctl and the simulated proxies (release), raises the fd
# limit, runs N = 1,000 and 10,000 (override: XDS_SCALE_PROXIES=1000,10000). Output: a table and target/bench/xds_scale.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferry-control -p ferryctl
ulimit -n "$(ulimit -Hn)"
cargo bench --bench xds_scale -- --proxies "${XDS_SCALE_PROXIES:-1000,10000}" \
  --control-bin target/release/ferry-control --ctl-bin target/release/ferryctl
