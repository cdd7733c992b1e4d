#!/usr/bin/env python3
"""Writes deploy/text-order.txt: the functions a proxy runs, which deploy/link-ordered.sh places together.

Usage: benches/text_order.py --ferry FERRY --control FERRY_CONTROL --ctl FERRYCTL [--out deploy/text-order.txt].
Needs root, valgrind, nginx and oha (as benches/dataplane.sh). Runs benches/training.py's workload (the explicit mesh
pair with a policy-laden third proxy, the explicit hop, the transparent pair in network namespaces) with every proxy
under callgrind from its first instruction: start-up, the identity, the config, requests on each path, the probes and
the scrape, then the admin endpoints, a policy change and the drain at SIGTERM. Every function callgrind saw run is
listed by its key (the name without its build hash). Variants of a C function chosen by the CPU (glibc's ifuncs,
aws-lc's assembly for AVX-512, which valgrind does not offer) are listed with the one that ran.
Regenerate after a change of dependencies or of the proxy's structure; a stale list only places fewer functions.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINKER = os.path.join(ROOT, "deploy", "link-ordered.sh")
# A C function's CPU-specific suffix: glibc's ifunc variants (__memmove_avx512_unaligned_erms, __strchr_evex) and
# aws-lc's (aes_gcm_encrypt_avx512, gcm_ghash_vpclmulqdq_avx2). Functions sharing the rest are one family.
VARIANT = re.compile(r"_(avx512\w*|avx2\w*|avx\w*|evex\w*|sse\w*|ssse3\w*|erms|vaes\w*|vpclmulqdq\w*|ifma\w*|"
                     r"aesni\w*|clmul\w*|bmi2\w*|adx\w*|rtm\w*|unaligned\w*|alt)$")


def family(name):
    return None if name.startswith(("_ZN", "_R")) else VARIANT.sub("", name.replace("_aesni_", "_aes_"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "deploy", "text-order.txt"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ferry-order-")
    os.chmod(work, 0o755)
    outs = f"{work}/cg"
    os.makedirs(outs, mode=0o1777)
    os.chmod(outs, 0o1777)  # the transparent pair runs as UID 1337
    # Every proxy under callgrind; `ferry init` (the pods' rules) as itself.
    grind = f"{work}/grind.sh"
    with open(grind, "w") as f:
        f.write(f"""#!/bin/sh
[ "$1" = init ] && exec {os.path.abspath(args.ferry)} "$@"
exec valgrind --tool=callgrind --demangle=no --compress-strings=no --show-below-main=yes \\
  --callgrind-out-file={outs}/cg.%p \\
  {os.path.abspath(args.ferry)} "$@"
""")
    os.chmod(grind, 0o755)

    # The end of phase 1, dumped by the proxies run as root. vgdb, which callgrind_control drives, cannot reach the
    # pods' proxies (UID 1337) here: their one file is read below against what the others ran in phase 2 alone.
    def dump(roles):
        for role, pid in roles.items():
            if not role.startswith("t-"):
                subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True, timeout=120)
    roles = training.run(args, grind, work, 300, phase_end=dump, ready_timeout=180)
    # Tiers, in the order the list places them: what a mesh proxy ran in phase 1, then what the explicit hop (its
    # config from a file) ran in phase 1, then phase 2. Within the first tier, functions are grouped by which mesh
    # proxies ran them (those all ran first): each proxy keeps resident the groups it runs, not code interleaved
    # with what only other roles run.
    bit = {str(pid): 1 << i for i, (role, pid) in enumerate(roles.items()) if role in training.MESH_ROLES}
    pods = {str(roles[role]) for role in roles if role.startswith("t-")}
    hop = str(roles["hop"])
    tiers, masks, whole = {}, {}, {}

    def functions_in(path):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(("fn=", "cfn=")):
                    name = re.sub(r"'\d+$", "", line.split("=", 1)[1].strip())
                    if not name.startswith(("0x", "(")):
                        yield name
    for path in glob.glob(f"{outs}/cg.*"):
        _, pid, *dump_no = os.path.basename(path).split(".")
        if pid in pods:
            whole[pid] = path
        elif pid in bit or pid == hop:
            tier = 2 if dump_no != ["1"] else 0 if pid in bit else 1
            for name in functions_in(path):
                tiers[name] = min(tier, tiers.get(name, tier))
                if tier == 0:
                    masks[name] = masks.get(name, 0) | bit[pid]
    # A pod's proxy ran in phase 1 what it ran, but for what the others ran only in phase 2 (admin, drain).
    for pid, path in whole.items():
        for name in functions_in(path):
            if tiers.get(name) != 2:
                tiers[name] = 0
                masks[name] = masks.get(name, 0) | bit[pid]
    nm = subprocess.run(["nm", "--defined-only", args.ferry], capture_output=True, text=True, check=True).stdout
    families = {}
    for name, tier in tiers.items():
        if family(name):
            t, m = families.get(family(name), (tier, 0))
            families[family(name)] = (min(t, tier), m | masks.get(name, 0))
    code = [p[2] for p in (line.split() for line in nm.splitlines()) if len(p) == 3 and p[1] in "tTwW"]
    siblings = {name: families[family(name)] for name in code if family(name) in families and name not in tiers}
    # The resolvers of the C library's CPU-specific functions, which its start-up runs (every proxy, before callgrind
    # names what runs).
    every = (1 << len(training.MESH_ROLES)) - 1
    siblings.update({name: (0, every) for name in code if name.endswith("_ifunc") and name not in tiers})
    names = list(tiers) + list(siblings)
    keys = subprocess.run([LINKER, "--keys"], input="\n".join(names) + "\n", capture_output=True, text=True,
                          check=True).stdout.splitlines()
    ranked = {}
    for name, key in zip(names, keys):
        tier, mask = siblings[name] if name in siblings else (tiers[name], masks.get(name, 0))
        t, m = ranked.get(key, (tier, 0))
        ranked[key] = (min(t, tier), m | mask)
    group = lambda k: (ranked[k][0], -bin(ranked[k][1]).count("1"), ranked[k][1]) if ranked[k][0] == 0 else \
        (ranked[k][0], 0, 0)
    order = sorted(ranked, key=lambda k: (group(k), k))
    with open(args.out, "w") as f:
        f.write("\n".join(order) + "\n")
    count = [sum(1 for t, _ in ranked.values() if t == i) for i in range(3)]
    print(f"{len(tiers)} functions ran, {len(siblings)} CPU variants and resolvers of C functions: "
          f"{len(order)} keys in {args.out} "
          f"(mesh proxies {count[0]} in {len(set(group(k) for k in order if ranked[k][0] == 0))} groups, explicit hop "
          f"{count[1]}, admin, policy change and drain {count[2]})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
