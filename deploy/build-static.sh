#!/usr/bin/env bash
# Builds the static release binaries that deploy/Dockerfile copies (the proxy alone, so no feature the control plane
# turns on in a shared dependency reaches it; then the control plane and CLI) and checks that each is static and runs. CI runs this; the Dockerfile's
# build stage runs the same two cargo commands.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-gnu
# The linker wrapper places the functions a proxy runs together (deploy/link-ordered.sh, deploy/text-order.txt); v0
# symbol names name each instance of a generic function apart, so the list places only the instances that ran.
# Profile-guided optimization: deploy/ferry.profdata (benches/pgo.py: the benchmark's proxies under load) lays out,
# inlines and branches the request path, the proxy's and its dependencies', as it ran; functions it has no counts for
# are built as without it (ferry-control's own, or code changed since the profile was made: rustc warns of those).
PGO=
if [ -f deploy/ferry.profdata ]; then
  PGO=" -C profile-use=$PWD/deploy/ferry.profdata"
fi
export RUSTFLAGS="-C target-feature=+crt-static -C symbol-mangling-version=v0 -C linker=$PWD/deploy/link-ordered.sh$PGO"
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
# The proxy's function order (deploy/link-ordered.sh; Rust >= 1.90, which links with LLD): none of the listed
# functions found means the list or the wrapper is broken. The summary is the one of the file cargo hard-linked.
summary=
for f in "$OUT"/deps/ferry-*.order.summary; do
  if [ -f "$f" ] && [ "${f%.order.summary}" -ef "$OUT/ferry" ]; then
    summary=$f
  fi
done
if [ -z "$summary" ]; then
  echo "$OUT/ferry: linked without a function order (rustc links with LLD from Rust 1.90; idle memory is higher)"
elif [ "$(cut -d ' ' -f 1 "$summary")" = 0 ]; then
  echo "$OUT/ferry: none of deploy/text-order.txt's functions found: $(cat "$summary")" >&2
  exit 1
else
  echo "$OUT/ferry: $(cat "$summary")"
fi
