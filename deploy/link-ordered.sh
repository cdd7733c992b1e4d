#!/usr/bin/env bash
# The linker of the static binaries (deploy/build-static.sh passes it as `-C linker`), for a small resident proxy:
# links as rustc asked, then again with the functions a proxy runs (deploy/text-order.txt) placed together at the
# start of .text, so that the kernel, which maps 64 KiB of the binary around each page fault, maps the code an idle
# proxy ran and not the rest, and with packed relative relocations.
# Without LLD (rustc before 1.90 links with the system's ld) or without the list, the first link stands.
# ferry-control and ferryctl link the same way: the list orders the functions they share with the proxy, and RELR
# shrinks theirs too. Cargo does not track the list: after regenerating it, relink (touch src/main.rs).
# `link-ordered.sh --keys` reads symbol names on stdin and prints the key each is listed by (benches/text_order.py).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list=$here/text-order.txt

# A symbol's key: its demangled name without what changes from build to build (v0 mangling's crate disambiguators,
# the legacy mangling's hash, the `.llvm.<module hash>` of a function LTO made local). With v0 mangling
# (build-static.sh) each instance of a generic function has its own key: the name carries the type arguments.
keys() { c++filt | sed -E 's/\[[0-9a-f]{8,16}\]//g; s/::h[0-9a-f]{16}$//; s/\.llvm\.[0-9]+$//'; }
if [ "${1:-}" = --keys ]; then
  keys
  exit
fi

cc=${FERRY_LINK_CC:-cc}
out=
prev=
lld=
for arg in "$@"; do
  [ "$prev" = -o ] && out=$arg
  case $arg in -fuse-ld=lld | *gcc-ld*) lld=1 ;; esac
  prev=$arg
done
[ -n "$out" ] && rm -f "$out.order.summary"
"$cc" "$@"
if [ -z "$lld" ] || [ -z "$out" ] || [ ! -s "$list" ]; then
  echo "link-ordered.sh: linked without a function order (LLD: ${lld:-no}, list: $list)" >&2
  exit 0
fi
for tool in nm c++filt; do
  command -v "$tool" >/dev/null || { echo "link-ordered.sh: $tool (binutils) is missing" >&2; exit 1; }
done
# Every defined code symbol whose key is listed, in the list's order (text_order.py's tiers, then names); LLD places
# the sections that define them first.
order=$out.order
nm --defined-only "$out" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u > "$order.names"
# Demangled names have spaces: the key and the symbol are tab-separated.
paste <(keys < "$order.names") "$order.names" \
  | awk -F '\t' 'NR == FNR {rank[$0] = NR; next} ($1 in rank) {print rank[$1] "\t" $2}' "$list" - \
  | sort -n -k1,1 > "$order.ranked"
cut -f 2 "$order.ranked" > "$order"
# What build-static.sh reports: how many of the listed functions this build has (a stale list finds fewer).
echo "$(cut -f 1 "$order.ranked" | uniq | wc -l) of $(wc -l < "$list") listed functions found, $(wc -l < "$order") symbols placed first" \
  > "$order.summary"
rm -f "$order.names" "$order.ranked"
# Packed relative relocations (RELR, glibc >= 2.36): a static PIE's ~30,000 pointer fix-ups take 9 KiB instead
# of 729 KiB of .rela.dyn, which start-up reads and the page cache keeps mapped.
"$cc" "$@" -Wl,--symbol-ordering-file="$order" -Wl,--no-warn-symbol-ordering -Wl,-z,pack-relative-relocs
