#!/usr/bin/env bash
# Builds the static release binaries that deploy/Dockerfile copies (the proxy alone, so no feature the control plane
# turns on in a shared dependency reaches it; then the control plane and CLI) and checks that each is static and runs. CI runs this; the Dockerfile's
# build stage runs the same two cargo commands.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
export RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --locked --target "$TARGET" -p ferry --bin ferry
cargo build --release --locked --target "$TARGET" -p ferry-control -p ferryctl
OUT="${CARGO_TARGET_DIR:-target}/$TARGET/release"
for bin in ferry ferry-control ferryctl; do
  if ! file "$OUT/$bin" | grep -Eq "static(-pie)? linked|statically linked"; then
    echo "$OUT/$bin is not statically linked: $(file "$OUT/$bin")" >&2
    exit 1
  fi
  "$OUT/$bin" --version >/dev/null
  echo "$OUT/$bin: static, $(du -h "$OUT/$bin" | cut -f1)"
done
