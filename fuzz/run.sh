#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain (the flags that
# `cargo fuzz build -s none` passes, so cargo-fuzz itself is not needed) and runs each for FUZZ_SECONDS (default 12)
# from its committed seed corpus (fuzz/corpus/<target>). New inputs go to a scratch directory, not the corpus; a crash
# or an assertion fails the run and leaves the input in target/fuzz-artifacts/. Usage: fuzz/run.sh [target...]
set -euo pipefail
cd "$(dirname "$0")"
TARGETS=(detect path authority trace_headers policy_yaml resources admission csr)
[ $# -gt 0 ] && TARGETS=("$@")
EACH=${FUZZ_SECONDS:-12}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/../target/fuzz}
export CARGO_INCREMENTAL=0
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which must not be instrumented.
HOST=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
start=$(date +%s)
cargo build --release ${FUZZ_LOCKED-"--locked"} --target "$HOST" --bins
echo "fuzz targets built in $(( $(date +%s) - start )) s"
ARTIFACTS=$PWD/../target/fuzz-artifacts
mkdir -p "$ARTIFACTS"
for target in "${TARGETS[@]}"; do
  scratch=$(mktemp -d)
  echo "== $target: ${EACH} s from $(ls corpus/"$target" | wc -l) seeds"
  if ! "$CARGO_TARGET_DIR/$HOST/release/$target" -max_total_time="$EACH" -timeout=10 -rss_limit_mb=1024 \
      -max_len=20000 -print_final_stats=1 -artifact_prefix="$ARTIFACTS/$target-" "$scratch" "corpus/$target" \
      > "$ARTIFACTS/$target.log" 2>&1; then
    tail -n 40 "$ARTIFACTS/$target.log"
    echo "fuzz target $target failed; its input is in $ARTIFACTS" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$ARTIFACTS/$target.log" | tr '\n' ' '
  grep -Eo "cov: [0-9]+ ft: [0-9]+" "$ARTIFACTS/$target.log" | tail -n 1
  rm -rf "$scratch"
done
