#!/usr/bin/env python3
"""Writes deploy/ferry.profdata: the profile deploy/build-static.sh optimizes the proxy with (profile-guided
optimization: the request path's branches, inlining and layout chosen from how it ran).

Usage: benches/pgo.py --control FERRY_CONTROL --ctl FERRYCTL [--requests N] [--out deploy/ferry.profdata].
Needs root, nginx, oha (as benches/dataplane.sh) and the toolchain's llvm-tools (llvm-profdata). Builds the proxy as
deploy/build-static.sh does, instrumented (`-C profile-generate`), in target/pgo; runs benches/training.py's workload
(the explicit mesh pair with a policy-laden third proxy, the explicit hop and the transparent pair in network
namespaces, as benches/dataplane.sh runs them) with N requests on each path; each proxy writes its counts when SIGTERM
ends it (as does each `ferry init` that sets up a pod's rules); llvm-profdata merges them. Regenerate after a change
of the request path or of dependencies: a stale profile leaves the functions that changed unoptimized (rustc warns of
each mismatch), and deploy/text-order.txt should follow (benches/text_order.py).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "x86_64-unknown-linux-gnu"


# deploy/build-static.sh's flags that decide symbol names, by which the profile's functions are matched.
STATIC_FLAGS = "-C target-feature=+crt-static -C symbol-mangling-version=v0"


def build_instrumented(raw):
    """The proxy with deploy/build-static.sh's flags (the symbol names the profile is matched by), instrumented."""
    with open(os.path.join(ROOT, "deploy", "build-static.sh")) as f:
        if f'RUSTFLAGS="{STATIC_FLAGS} ' not in f.read():
            sys.exit(f"deploy/build-static.sh no longer builds with {STATIC_FLAGS!r}: update STATIC_FLAGS here")
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "pgo"),
               RUSTFLAGS=f"{STATIC_FLAGS} -C profile-generate={raw}")
    subprocess.run(["cargo", "build", "--release", "--locked", "--target", TARGET, "-p", "ferry", "--bin", "ferry"],
                   cwd=ROOT, env=env, check=True)
    return os.path.join(ROOT, "target", "pgo", TARGET, "release", "ferry")


def llvm_profdata():
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout
    tool = os.path.join(sysroot.strip(), "lib", "rustlib", TARGET, "bin", "llvm-profdata")
    if not os.path.exists(tool):
        sys.exit(f"{tool} is missing: rustup component add llvm-tools")
    return tool


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--control", required=True, help="ferry-control binary (identities for the mesh pair)")
    ap.add_argument("--ctl", required=True, help="ferryctl binary")
    ap.add_argument("--requests", type=int, default=20000, help="requests through each path in phase 1")
    ap.add_argument("--out", default=os.path.join(ROOT, "deploy", "ferry.profdata"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ferry-pgo-")
    raw = os.path.join(work, "raw")
    # Only the proxies' counts: build scripts and proc macros built with the flag write theirs elsewhere.
    ferry = build_instrumented(os.path.join(work, "build-raw"))
    os.environ["LLVM_PROFILE_FILE"] = os.path.join(raw, "ferry-%p-%m.profraw")
    os.makedirs(raw, mode=0o1777)
    os.chmod(raw, 0o1777)  # the transparent pair runs as UID 1337
    training.run(args, ferry, work, args.requests)
    counts = glob.glob(os.path.join(raw, "*.profraw"))
    if not counts:
        sys.exit("no proxy wrote a profile")
    # Sparse: functions that never ran are left out (built as without a profile), which keeps the file small.
    subprocess.run([llvm_profdata(), "merge", "--sparse", "-o", args.out, *counts], check=True)
    print(f"{args.out}: {len(counts)} profiles merged, {os.path.getsize(args.out)} bytes")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
