#!/usr/bin/env python3
"""What of a running proxy's binary is resident: its file-backed RSS by ELF section and, within .text, by crate.

Usage: benches/resident.py PID [--top N]. Needs root (reads /proc/PID/pagemap) and binutils (readelf, nm). A page
of the binary counts when it is present in the process's page tables (pagemap bit 63), which is what VmRSS's
RssFile counts for the binary's mappings; a page's bytes are attributed to the symbols that overlap it (a page two
crates share counts for both, in proportion). Read-only: it never writes to the process.
"""
import argparse
import bisect
import collections
import os
import re
import struct
import subprocess

PAGE = os.sysconf("SC_PAGE_SIZE")


def mappings(pid, binary):
    """The binary's mappings: (start, end, file offset, perms)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == binary:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, int(parts[2], 16), parts[1]))
    return out


def resident_offsets(pid, maps):
    """File offsets of the binary's pages present in the process."""
    offsets = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for start, end, offset, _ in maps:
            pm.seek(start // PAGE * 8)
            data = pm.read((end - start) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry >> 63 & 1:
                    offsets.append(offset + i * PAGE)
    return offsets


def sections(binary):
    """(name, address, file offset, size) of each allocated section."""
    out = []
    text = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+\S+\s+(\S*A\S*)", text):
        name, addr, off, size, _ = m.groups()
        if int(addr, 16):
            out.append((name, int(addr, 16), int(off, 16), int(size, 16)))
    return out


def crate_of(symbol):
    """The crate a demangled symbol belongs to: the first path's first segment (`<a::T as b::Trait>::f` counts for
    crate a, the implementing type's)."""
    s = symbol.lstrip("<&*").removeprefix("mut ").removeprefix("dyn ")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", s)
    if m:
        return m.group(1)
    return "(C, or no path)" if s else "(none)"


def text_symbols(binary):
    """Sorted (address, size, crate) of the defined code symbols."""
    out = []
    nm = subprocess.run(["nm", "-C", "--defined-only", "-S", binary], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTwW" and int(parts[1], 16):
            out.append((int(parts[0], 16), int(parts[1], 16), crate_of(parts[3])))
    out.sort()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pid", type=int)
    ap.add_argument("--top", type=int, default=25, help="crates to list (default 25)")
    args = ap.parse_args()
    binary = os.path.realpath(f"/proc/{args.pid}/exe")
    maps = mappings(args.pid, binary)
    offsets = resident_offsets(args.pid, maps)
    secs = sections(binary)
    by_section = collections.Counter()
    text_pages = []
    for off in offsets:
        for name, addr, soff, size in secs:
            lo, hi = max(off, soff), min(off + PAGE, soff + size)
            if lo < hi and name != ".tbss":
                by_section[name] += hi - lo
                if name == ".text":
                    text_pages.append((addr + lo - soff, addr + hi - soff))
    mapped = sum(end - start for start, end, _, _ in maps)
    print(f"{binary}: {len(offsets) * PAGE // 1024} KiB of {mapped // 1024} KiB mapped resident")
    for name, size in by_section.most_common():
        total = next(s for n, _, _, s in secs if n == name)
        print(f"  {name:<22} {size // 1024:>6} KiB resident of {total // 1024:>6} KiB")
    syms = text_symbols(binary)
    starts = [a for a, _, _ in syms]
    by_crate, whole = collections.Counter(), collections.Counter()
    for addr, size, crate in syms:
        whole[crate] += size
    for lo, hi in text_pages:
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(syms) and syms[i][0] < hi:
            a, size, crate = syms[i]
            overlap = min(hi, a + size) - max(lo, a)
            if overlap > 0:
                by_crate[crate] += overlap
            i += 1
    print(f"  .text by crate (resident KiB / the crate's code KiB), top {args.top}:")
    for crate, size in by_crate.most_common(args.top):
        print(f"    {crate:<28} {size / 1024:>8.0f} / {whole[crate] / 1024:.0f}")


if __name__ == "__main__":
    main()
