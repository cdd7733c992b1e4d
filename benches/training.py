"""The workload the shipped proxy is optimized and laid out for (benches/pgo.py, benches/text_order.py).

The proxies benches/dataplane.sh measures, started the same way (its own set-up functions) but without Envoy: an
explicit mesh pair of Service backend with a third proxy for Service guarded (every policy on, none firing), an
explicit hop configured from a file, and a transparent pair in network namespaces behind `ferry init`'s rules (an
outbound call to a plain server and a mesh call). Phase 1 is what a sidecar in a pod does: its start-up, requests on
each path, a kubelet's probes and a Prometheus scrape. Phase 2 is rarer: the admin endpoints, a policy change while
requests run, and the drain at SIGTERM that ends every proxy. Needs root (namespaces), nginx and oha.
"""
import os
import shutil
import subprocess
import sys
import time
import types
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataplane as d  # noqa: E402

# The roles, each one proxy; every role but the hop is a mesh proxy with an identity from ferry-control.
MESH_ROLES = ["client", "server", "guarded", "t-client", "t-server"]


def get(url, ns=None):
    if ns:
        subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-m", "30", url],
                       capture_output=True)
        return
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)


def run(args, ferry, work, requests, phase_end=None, ready_timeout=30.0):
    """Runs the workload with `ferry` (the proxy binary, or a script that execs it under a tool; `ferry init` runs
    through it too), `requests` requests on each path in phase 1 and a tenth of them in phase 2. Calls
    `phase_end(roles)` between the phases. Every proxy is stopped with SIGTERM before it returns {role: pid}; a path
    that does not answer every request with 200 ends the run with an error."""
    opts = types.SimpleNamespace(ferry=ferry, control=args.control, ctl=args.ctl)
    backend = d.free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(d.NGINX_CONF.format(dir=work, port=backend, listen="127.0.0.1"))
    with open(f"{work}/ferry.yaml", "w") as f:
        f.write(d.FERRY_CONF.format(backend=backend))
    procs, node = [], None
    try:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(d.Proc("nginx", [nginx, "-c", f"{work}/nginx.conf", "-p", work], f"{work}/nginx.log"))
        d.wait_http(f"http://127.0.0.1:{backend}/")
        mesh = d.start_mesh(opts, work, backend, None, None, procs, envoy=False)
        hop_url, hop_host, start_hop = d.ferry_hop(ferry, backend, work, None, "hop")
        hop = start_hop([])[0]
        procs.append(hop)
        node = d.Node()
        transparent = d.start_transparent(opts, work, node, None, None, procs, envoy=False, timeout=ready_timeout)
        (client, server), guarded = mesh["ferry"][1], mesh["policies"][1][1]
        t_client, t_server = transparent["t-ferry-mesh"][2]
        roles = {"client": client, "server": server, "guarded": guarded, "t-client": t_client, "t-server": t_server,
                 "hop": hop}
        paths = [(mesh["ferry"][0], "backend.mesh", None), (mesh["policies"][0], "guarded.mesh", None),
                 (hop_url, hop_host, None), *((url, host, ns) for url, host, _, ns in transparent.values())]
        for url, host, ns in paths:
            if ns:
                d.wait_target(url, host, ns)
            else:
                d.wait_http(url, {"Host": host}, timeout=ready_timeout)

        def load(count):
            for url, host, ns in paths:
                ok = d.oha_count(url, host, count, None, ns)
                print(f"{url} ({host}): {ok} of {count} requests answered 200", flush=True)
                if ok < count:
                    raise RuntimeError(f"{url} ({host}): {ok} of {count} requests answered 200")

        pods = {"t-client": node.ns("ferry-client"), "t-server": node.ns("ferry-server")}

        def each(path, variable, pod_port):
            """GET `path` from every proxy's port: the explicit ones' from their `variable`, the pods' `pod_port`."""
            for role, p in roles.items():
                if role in pods:
                    get(f"http://127.0.0.1:{pod_port}{path}", pods[role])
                else:
                    get(f"http://{p.env[variable]}{path}")

        load(requests)
        for path in ["/health/live", "/health/ready", "/health/startup", "/metrics"]:
            each(path, "FERRY_HEALTH_ADDR", 15020)
        time.sleep(2)
        if phase_end:
            phase_end({role: p.pid for role, p in roles.items()})
        for path in ["/config_dump", "/endpoints"]:
            each(path, "FERRY_ADMIN_ADDR", 15000)
        ctl, _ = mesh["control"]
        ctl("apply", "-f", "-", stdin=d.FERRY_POLICY.format(name="backend").replace("15s", "10s"))
        time.sleep(3)
        load(max(requests // 10, 1))
        time.sleep(2)
        # The drain: proxies first, while what they call still answers.
        for p in roles.values():
            p.stop()
        return {role: p.pid for role, p in roles.items()}
    finally:
        for p in reversed(procs):
            p.stop()
        if node:
            node.close()

