#!/usr/bin/env python3
"""Writes deploy/text-order.txt: the functions a proxy runs, which deploy/link-ordered.sh places together.

Usage: benches/text_order.py --ferry FERRY --control FERRY_CONTROL --ctl FERRYCTL [--out deploy/text-order.txt].
Needs valgrind, nginx and oha (as benches/dataplane.sh). Runs ferry-control, a mesh pair (a client-side proxy and a
server-side one, each with an identity, the sidecar TrafficPolicy) and one explicit hop under callgrind from their
first instruction: start-up, the identity, the config, requests through both paths, the probes and the scrape, a
policy change, idle time and the drain at SIGTERM. Every function callgrind saw run is listed by its key (the name
without its build hash). Variants of a C function chosen by the CPU (glibc's ifuncs, aws-lc's assembly for AVX-512,
which valgrind does not offer) are listed with the one that ran.
Regenerate after a change of dependencies or of the proxy's structure; a stale list only places fewer functions.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataplane as d  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINKER = os.path.join(ROOT, "deploy", "link-ordered.sh")
# A C function's CPU-specific suffix: glibc's ifunc variants (__memmove_avx512_unaligned_erms, __strchr_evex) and
# aws-lc's (aes_gcm_encrypt_avx512, gcm_ghash_vpclmulqdq_avx2). Functions sharing the rest are one family.
VARIANT = re.compile(r"_(avx512\w*|avx2\w*|avx\w*|evex\w*|sse\w*|ssse3\w*|erms|vaes\w*|vpclmulqdq\w*|ifma\w*|"
                     r"aesni\w*|clmul\w*|bmi2\w*|adx\w*|rtm\w*|unaligned\w*|alt)$")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)


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
    backend = d.free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(d.NGINX_CONF.format(dir=work, port=backend, listen="127.0.0.1"))
    with open(f"{work}/ferry.yaml", "w") as f:
        f.write(d.FERRY_CONF.format(backend=backend))
    grind = ["valgrind", "--tool=callgrind", "--demangle=no", "--compress-strings=no",
             f"--callgrind-out-file={work}/cg.%p"]
    procs = []
    try:
        procs.append(d.Proc("nginx", ["nginx", "-c", f"{work}/nginx.conf", "-p", work], f"{work}/nginx.log"))
        d.wait_http(f"http://127.0.0.1:{backend}/")
        ctl, base = d.start_control(args, work, None, procs)
        ctl("apply", "-f", "-", stdin="""apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: backend, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [backend.mesh], identities: [backend]}
---
""" + d.FERRY_POLICY.format(name="backend"))
        port = {side: {k: d.free_port() for k in ["INBOUND", "OUTBOUND", "HEALTH", "ADMIN"]}
                for side in ["client", "server", "hop"]}
        addrs = lambda side: {f"FERRY_{k}_ADDR": f"127.0.0.1:{p}" for k, p in port[side].items()}
        token = lambda account: ctl("token", "create", "-n", "default", "--service-account", account)
        envs = {
            "client": dict(os.environ, **base, **addrs("client"), FERRY_JOIN_TOKEN=token("client"),
                           FERRY_NODE_ID="client"),
            "server": dict(os.environ, **base, **addrs("server"), FERRY_JOIN_TOKEN=token("backend"),
                           FERRY_SERVICE="backend", FERRY_APP_ADDR=f"127.0.0.1:{backend}", FERRY_NODE_ID="server"),
            "hop": dict(os.environ, **addrs("hop"), FERRY_CONFIG_FILE=f"{work}/ferry.yaml", FERRY_WORKERS="1",
                        FERRY_ACCESS_LOG="off", FERRY_LOG_LEVEL="warn"),
        }
        proxies = {side: d.Proc(side, grind + [args.ferry], f"{work}/{side}.log", env=env) for side, env in envs.items()}
        procs += proxies.values()
        paths = [(f"http://127.0.0.1:{port['client']['OUTBOUND']}/", "backend.mesh"),
                 (f"http://127.0.0.1:{port['hop']['OUTBOUND']}/", "backend")]
        for url, host in paths:
            d.wait_http(url, {"Host": host}, timeout=120)  # valgrind starts slowly
        # Phase 1, what a sidecar in a pod does: requests in and out, a kubelet's probes, a Prometheus scrape.
        for url, host in paths:
            print(f"{url}: {d.oha_count(url, host, 300, None)} of 300 requests", flush=True)
        for side in port:
            for path in ["/health/live", "/health/ready", "/health/startup", "/metrics"]:
                get(f"http://127.0.0.1:{port[side]['HEALTH']}{path}")
        time.sleep(2)
        for p in proxies.values():
            subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True, timeout=60)
        # Phase 2, less often: the admin endpoints, a policy change while requests run, the drain at SIGTERM.
        for side in port:
            for path in ["/config_dump", "/endpoints"]:
                get(f"http://127.0.0.1:{port[side]['ADMIN']}{path}")
        ctl("apply", "-f", "-", stdin=d.FERRY_POLICY.format(name="backend").replace("15s", "10s"))
        time.sleep(3)
        for url, host in paths:
            d.oha_count(url, host, 100, None)
        time.sleep(2)
    finally:
        for p in reversed(procs):
            p.stop()
    # Tiers, in the order the list places them: what a mesh proxy ran in phase 1, then what the explicit hop (its
    # config from a file) ran in phase 1, then phase 2. A proxy in a pod keeps the first tier resident.
    mesh = {str(proxies[side].pid) for side in ["client", "server"]}
    tiers = {}
    for path in glob.glob(f"{work}/cg.*"):
        _, pid, *dump = os.path.basename(path).split(".")
        tier = 2 if dump != ["1"] else 0 if pid in mesh else 1
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(("fn=", "cfn=")):
                    name = re.sub(r"'\d+$", "", line.split("=", 1)[1].strip())
                    if not name.startswith(("0x", "(")):
                        tiers[name] = min(tier, tiers.get(name, tier))
    nm = subprocess.run(["nm", "--defined-only", args.ferry], capture_output=True, text=True, check=True).stdout
    families = {}
    for name, tier in tiers.items():
        if family(name):
            families[family(name)] = min(tier, families.get(family(name), tier))
    siblings = {p[2]: families[family(p[2])] for p in (line.split() for line in nm.splitlines())
                if len(p) == 3 and p[1] in "tTwW" and family(p[2]) in families and p[2] not in tiers}
    names = list(tiers) + list(siblings)
    keys = subprocess.run([LINKER, "--keys"], input="\n".join(names) + "\n", capture_output=True, text=True,
                          check=True).stdout.splitlines()
    ranked = {}
    for name, key in zip(names, keys):
        tier = tiers.get(name, siblings.get(name))
        ranked[key] = min(tier, ranked.get(key, tier))
    order = sorted(ranked, key=lambda k: (ranked[k], k))
    with open(args.out, "w") as f:
        f.write("\n".join(order) + "\n")
    count = [sum(1 for t in ranked.values() if t == i) for i in range(3)]
    print(f"{len(tiers)} functions ran, {len(siblings)} CPU variants of C functions: {len(order)} keys in {args.out} "
          f"(mesh proxy {count[0]}, explicit hop {count[1]}, admin, policy change and drain {count[2]})")


if __name__ == "__main__":
    main()
