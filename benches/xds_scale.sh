#!/usr/bin/env bash
# Control-plane scale benchmark: builds ferry, ferry-control, ferryctl and the simulated proxies (release), raises the
# fd limit, runs N = 1,000 and 10,000 simulated on-demand proxies (override: XDS_SCALE_PROXIES=1000,10000), then one
# real proxy calling 10 Services in meshes of 100, 1,000 and 10,000 (XDS_SCALE_MESHES; the binary: FERRY_BIN, default
# target/release/ferry, e.g. the static build's). Output: tables and target/bench/xds_scale*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferry --bin ferry
cargo build --release -p ferry-control -p ferryctl
ulimit -n "$(ulimit -Hn)"
cargo bench --bench xds_scale -- --proxies "${XDS_SCALE_PROXIES:-1000,10000}" \
  --control-bin target/release/ferry-control --ctl-bin target/release/ferryctl
cargo bench --bench xds_scale -- --proxy-rss "${XDS_SCALE_MESHES:-100,1000,10000}" \
  --ferry-bin "${FERRY_BIN:-target/release/ferry}" \
  --control-bin target/release/ferry-control --ctl-bin target/release/ferryctl
