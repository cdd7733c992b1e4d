#!/usr/bin/env bash
# Builds the `ferry` binary of a commit (release, as benches/dataplane.sh builds today's) for the A/B mode, in a
# temporary worktree, with its own target directory kept between calls (target/ab-target: the dependencies are built
# once). Prints the binary's path: target/ab/ferry-<short commit>.
#   benches/dataplane.sh --ab "$(benches/build-at.sh main~3)" target/release/ferry
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT=$(git rev-parse --short "${1:?usage: benches/build-at.sh COMMIT}")
OUT="target/ab/ferry-$COMMIT"
if [ ! -x "$OUT" ]; then
  TREE=$(mktemp -d)
  git worktree add --detach "$TREE" "$COMMIT" >&2
  trap 'git worktree remove --force "$TREE" >&2' EXIT
  CARGO_TARGET_DIR="$PWD/target/ab-target" cargo build --release -p ferry --bin ferry --manifest-path "$TREE/Cargo.toml" >&2
  mkdir -p target/ab
  cp "target/ab-target/release/ferry" "$OUT"
fi
echo "$OUT"
