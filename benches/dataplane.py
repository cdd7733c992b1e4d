#!/usr/bin/env python3
"""Data-plane benchmark to a fixed-response nginx: direct; one hop (a Ferry outbound vs an Envoy listener); and the
mesh path (client -> Ferry -> mTLS -> Ferry -> nginx vs client -> Envoy -> mTLS -> Envoy -> nginx, TLS 1.3 with client
certificates and SPIFFE URI SAN checks on both sides, HTTP/2 between the proxies). Explicit targets on loopback;
transparent targets ("t-") in network namespaces of the bench's own (pods on a bridge, behind `ferry init` rules).

Latency: open-loop at constant rates with oha's latency correction, runs interleaved (direct, ferry, envoy rotated),
each run's added latency (proxied - direct) and the Ferry/Envoy ratio per run; medians and spread are reported.
Efficiency: closed-loop load, requests per proxy CPU-second (utime+stime from /proc/PID/stat).
Memory: proxy RSS (and anonymous RSS) idle and after the highest-rate runs.
Pinning: proxies on CPU 1, load generator and backend on CPU 0 (when the machine has 2+ CPUs).
Writes target/bench/dataplane.json and prints a table. Traffic goes to 127.0.0.1 and to the bench's own namespaces
only; every run is bounded in time.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, headers=None, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            extra = dict(h.split(": ", 1) for h in EXTRA_HEADERS)
            req = urllib.request.Request(url, headers={**extra, **(headers or {})})
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not answering")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_kib": out.get("VmRSS", 0), "anon_kib": out.get("RssAnon", 0)}


def pinned(cmd, cpu):
    if cpu is None or not shutil.which("taskset"):
        return cmd
    return ["taskset", "-c", str(cpu)] + cmd


NGINX_CONF = """
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen {listen}:{port} reuseport backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

# Envoy's configurations, built as data (Envoy reads JSON as YAML): the pieces every target shares.
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
TLS13 = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}
ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}
# A mesh sidecar's outbound route as the data-path issue's independent run configured it: a 15 s route timeout (Envoy's
# own default) and 2 retries on 5xx; the same as Ferry's TrafficPolicy below. (Istio's own defaults differ: no route
# timeout, 2 retries on connect-failure, refused-stream, unavailable, cancelled and retriable status codes.) The bare
# Envoy targets leave the route without them.
SIDECAR_ROUTE = {"timeout": "15s", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}


def hcm(prefix, cluster, route=None, client_cert=False):
    """An HTTP connection manager sending everything to `cluster` (route fields added from `route`); with
    `client_cert`, the peer's URI SAN passed on in `x-forwarded-client-cert` (the mesh's inbound side)."""
    config = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                       "HttpConnectionManager",
              "stat_prefix": prefix, "codec_type": "AUTO", "http_filters": [ROUTER],
              "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                  {"match": {"prefix": "/"}, "route": {"cluster": cluster, **(route or {})}}]}]}}
    if client_cert:
        config.update(forward_client_cert_details="SANITIZE_SET", set_current_client_cert_details={"uri": True})
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def tls_context(work, side, san):
    """TLS 1.3 with a certificate of the bench CA (`side`: client or server); the peer's URI SAN matched by `san`."""
    return {"tls_params": TLS13, "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": f"{work}/{side}.crt"},
                                  "private_key": {"filename": f"{work}/{side}.key"}}],
            "validation_context": {"trusted_ca": {"filename": f"{work}/ca.crt"},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]}}


def downstream_tls(work):
    """The mesh's inbound side: a client certificate of the bench CA with a SPIFFE ID required."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": tls_context(work, "server", {"prefix": "spiffe://cluster.local/"})}}


def cluster(name, address, port, mesh_tls=None, bind=None):
    """A static cluster of one endpoint; `mesh_tls` (work, sni): HTTP/2 over mTLS to the server's SPIFFE ID;
    `bind`: the source address of upstream connections."""
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}]}]}}
    if mesh_tls:
        work, sni = mesh_tls
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": sni,
            "common_tls_context": tls_context(work, "client", {"exact": "spiffe://cluster.local/ns/default/sa/backend"})}}
    if bind:
        c["upstream_bind_config"] = {"source_address": {"address": bind, "port_value": 0}}
    return c


def listener(name, address, port, chains, original_dst=False):
    out = {"name": name, "address": {"socket_address": {"address": address, "port_value": port}},
           "filter_chains": chains}
    if original_dst:
        out["listener_filters"] = [ORIGINAL_DST]
    return out


def envoy_conf(admin, listeners, clusters):
    return json.dumps({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
                       "static_resources": {"listeners": listeners, "clusters": clusters}}, indent=1)


def envoy_hop(admin, port, backend, route):
    """One explicit hop to nginx on loopback."""
    return envoy_conf(admin, [listener("bench", "127.0.0.1", port, [{"filters": [hcm("bench", "backend", route)]}])],
                      [cluster("backend", "127.0.0.1", backend)])


def envoy_mesh_client(admin, port, peer, work, route):
    """The mesh pair's client side on loopback: mTLS (TLS 1.3, h2, the server's SPIFFE ID checked) to `peer`."""
    return envoy_conf(admin, [listener("outbound", "127.0.0.1", port, [{"filters": [hcm("outbound", "mesh", route)]}])],
                      [cluster("mesh", "127.0.0.1", peer, mesh_tls=(work, "80.backend.default.mesh"))])


def envoy_mesh_server(admin, port, backend, work):
    """The mesh pair's server side on loopback: a client certificate required, HTTP/1.1 to nginx."""
    chain = {"transport_socket": downstream_tls(work), "filters": [hcm("inbound", "backend", client_cert=True)]}
    return envoy_conf(admin, [listener("inbound", "127.0.0.1", port, [chain])], [cluster("backend", "127.0.0.1", backend)])


FERRY_POLICY = """apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: default}}
spec: {{targetRef: {{kind: Service, name: {name}}}, timeout: 15s, retries: {{attempts: 2, on: [5xx]}}}}
"""


MESH_SERVICE = """apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: backend, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [backend.mesh], identities: [backend]}
"""

# The same backend as Service `guarded`, with every policy enabled and set so that none fires at the benchmark's
# rates: the caller's proxy applies the timeout, retries (with a budget), the breaker and its caps, outlier
# detection and P2C; the destination's proxy strict mTLS, the AuthorizationPolicy and the rate limit.
MESH_POLICIES = """apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {name: guarded, namespace: default}
spec: {ports: [{port: 80, protocol: http}], addresses: [guarded.mesh], identities: [guarded]}
---
apiVersion: ferry.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: guarded, namespace: default}
spec:
  targetRef: {kind: Service, name: guarded}
  timeout: 30s
  retries: {attempts: 2, perTryTimeout: 10s, on: [connect-failure, refused-stream, reset, gateway-error],
            budget: {percent: 20, minPerSecond: 10}}
  circuitBreaker: {failureRatio: 0.5, minRequests: 100, interval: 10s, consecutiveFailures: 1000, openFor: 5s,
                   halfOpenRequests: 3, maxConnections: 10000, maxPendingRequests: 10000, maxRequests: 10000}
  outlierDetection: {consecutive5xx: 100, baseEjectionTime: 30s, maxEjectionPercent: 50}
  rateLimit: {requestsPerSecond: 1000000, burst: 1000000}
  loadBalancer: p2c-ewma
  mtls: strict
---
apiVersion: ferry.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: guarded, namespace: default}
spec:
  targetRef: {kind: Service, name: guarded}
  defaultAction: deny
  allow: [{from: {identities: ["spiffe://cluster.local/ns/default/sa/client"]}, to: {methods: [GET], paths: [/]}}]
"""


def envoy_mesh_certs(work):
    """A CA and two leaves (EC P-256, URI SANs like Ferry's) for the Envoy pair, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=bench mesh CA", "-keyout", f"{work}/ca.key", "-out", f"{work}/ca.crt")
    for name, account in [("client", "client"), ("server", "backend")]:
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{work}/{name}.key", "-out", f"{work}/{name}.csr")
        with open(f"{work}/{name}.ext", "w") as f:
            f.write(f"subjectAltName=URI:spiffe://cluster.local/ns/default/sa/{account}\n"
                    "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{work}/{name}.csr", "-CA", f"{work}/ca.crt", "-CAkey", f"{work}/ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{work}/{name}.ext", "-out", f"{work}/{name}.crt")


# `--routes`: 100 HTTPRoute rules on a Service (7 routes: 16 rules each is the CRD's bound), all alike but for the
# header they match, so every request is matched against each rule's regular expression (which matches) and header
# (which does not) until the last rule, the only one whose header it carries.
ROUTE_RULES = 100
ROUTE_PATH = "/api/v1/items/42"
ROUTE_HEADER = f"x-bench: rule-{ROUTE_RULES - 1}"


def bench_routes(service):
    docs = []
    for r in range(0, ROUTE_RULES, 16):
        rules = "".join(
            f"  - matches: [{{path: {{type: RegularExpression, value: '/api/v[0-9]+/items/[0-9]+'}}, "
            f"headers: [{{name: x-bench, value: rule-{i}}}]}}]\n    backendRefs: [{{name: {service}, port: 80}}]\n"
            for i in range(r, min(r + 16, ROUTE_RULES)))
        docs.append(f"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
                    f"metadata: {{name: bench-{r // 16}, namespace: default}}\nspec:\n"
                    f"  parentRefs: [{{group: '', kind: Service, name: {service}}}]\n  rules:\n{rules}---\n")
    return "".join(docs)


FERRY_CONF = """apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: default}}
spec:
  ports: [{{port: 80, protocol: http}}]
  endpoints: [{{address: "127.0.0.1:{backend}"}}]
---
""" + FERRY_POLICY.replace("{name}", "backend")


class Proc:
    def __init__(self, name, cmd, log, env=None, cpu=None):
        self.name = name
        self.env = env
        self.log = open(log, "w")
        self.p = subprocess.Popen(pinned(cmd, cpu), stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self):
        return self.p.pid

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def oha_json_flag():
    out = subprocess.run(["oha", "--help"], capture_output=True, text=True).stdout
    return ["--output-format", "json"] if "--output-format" in out else ["-j"]


# Headers every request carries besides Host (`--routes`: the header the last route rule matches).
EXTRA_HEADERS = []


def run_oha(url, host, args, seconds, rate, conns, cpu, ns=None):
    cmd = ["oha", "--no-tui", *oha_json_flag(), "-z", f"{seconds}s", "-c", str(conns), "-H", f"Host: {host}"]
    for h in EXTRA_HEADERS:
        cmd += ["-H", h]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    cmd.append(url)
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed: {out.stderr}")
    data = json.loads(out.stdout)
    summary = data["summary"]
    pct = data["latencyPercentiles"]
    codes = data.get("statusCodeDistribution", {})
    errors = data.get("errorDistribution", {})
    ok = int(codes.get("200", 0))
    # Requests still in flight when `-z` ends are reported as "aborted due to deadline": not failures.
    aborted = sum(int(v) for k, v in errors.items() if "deadline" in k)
    total = sum(int(v) for v in codes.values()) + sum(int(v) for v in errors.values()) - aborted
    return {
        "rps": summary["requestsPerSec"],
        "p50_ms": pct["p50"] * 1000,
        "p90_ms": pct["p90"] * 1000,
        "p99_ms": pct["p99"] * 1000,
        "p99.9_ms": pct["p99.9"] * 1000,
        "ok": ok,
        "failed": total - ok,
        "aborted_at_end": aborted,
        "errors": errors,
    }


def spread(values):
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "values": values}


# ---- Transparent targets: pods as network namespaces on a bridge, behind `ferry init` rules ----

# The bench's own namespaces: a "node" holding a bridge (ferry-control listens there) and one namespace per pod.
NODE_NET = "198.18.77"
PODS = {"load-direct": 2, "plain-server": 3, "ferry-client": 4, "ferry-server": 5, "envoy-client": 6,
        "envoy-bare-client": 7, "envoy-server": 8}

def envoy_t_client(work, plain, server, route):
    """Envoy as a sidecar in transparent mode: the outbound listener on 15001 reads the original destination (as
    Istio's virtualOutbound does) and picks the chain by destination IP; the plain server is reached over HTTP/1.1, the
    Envoy-fronted server over mTLS. Same rules as Ferry's (`ferry init`)."""
    match = lambda ip: {"prefix_ranges": [{"address_prefix": ip, "prefix_len": 32}]}
    chains = [{"filter_chain_match": match(plain), "filters": [hcm("outbound_plain", "plain", route)]},
              {"filter_chain_match": match(server), "filters": [hcm("outbound_mesh", "mesh", route)]}]
    return envoy_conf(15000, [listener("virtualOutbound", "0.0.0.0", 15001, chains, original_dst=True)],
                      [cluster("plain", plain, 80),
                       cluster("mesh", server, 80, mesh_tls=(work, "outbound_.80_._.backend.default.svc.cluster.local"))])


def envoy_t_server(work, server):
    """The server side's inbound listener on 15006 (the redirected port 80): mTLS required, then HTTP/1.1 to the app
    at the pod's own IP from 127.0.0.6, as Ferry delivers (and Istio since 1.10)."""
    chain = {"transport_socket": downstream_tls(work),
             "filters": [hcm("inbound", "app", {"timeout": "0s"}, client_cert=True)]}
    return envoy_conf(15000, [listener("virtualInbound", "0.0.0.0", 15006, [chain], original_dst=True)],
                      [cluster("app", server, 80, bind="127.0.0.6")])


def sh(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


class Node:
    """The node namespace (a bridge at NODE_NET.1) and the pods' namespaces, each with a veth on the bridge. Only
    addresses inside these namespaces are used; everything is deleted by `close`."""

    def __init__(self):
        self.tag = f"fb{os.getpid()}"
        self.node = f"{self.tag}-node"
        self.namespaces = []
        self.remove_stale()
        try:
            self.build()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def remove_stale():
        """Namespaces of an earlier run whose process is gone (killed before it could clean up)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        for ns in (line.split()[0] for line in listed if line.strip()):
            pid = ns[2:].split("-")[0] if ns.startswith("fb") and "-" in ns else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def build(self):
        self.add_ns(self.node)
        self.exec(self.node, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(self.node, "ip", "addr", "add", f"{NODE_NET}.1/24", "dev", "br0")
        self.exec(self.node, "ip", "link", "set", "br0", "up")
        self.pods = {}
        for name, n in PODS.items():
            ns = f"{self.tag}-{name}"
            self.add_ns(ns)
            outer, inner = f"{self.tag}v{n}a", f"{self.tag}v{n}b"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", self.node)
            sh("ip", "link", "set", inner, "netns", ns)
            self.exec(self.node, "ip", "link", "set", outer, "master", "br0", "up")
            self.exec(ns, "ip", "link", "set", inner, "name", "eth0")
            self.exec(ns, "ip", "addr", "add", f"{NODE_NET}.{n}/24", "dev", "eth0")
            self.exec(ns, "ip", "link", "set", "eth0", "up")
            self.pods[name] = (ns, f"{NODE_NET}.{n}")

    def add_ns(self, ns):
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.exec(ns, "ip", "link", "set", "lo", "up")

    @staticmethod
    def exec(ns, *cmd):
        return sh("ip", "netns", "exec", ns, *cmd)

    def ns(self, pod):
        return self.pods[pod][0]

    def ip(self, pod):
        return self.pods[pod][1]

    def wait_http(self, pod, url, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["ip", "netns", "exec", self.ns(pod), "curl", "-sf", "-o", "/dev/null", "-m", "1", url],
                                 capture_output=True)
            if out.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{url} not answering in {pod}")

    def close(self):
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns, cmd, as_proxy=False):
    """`cmd` in namespace `ns` (as UID 1337, the proxies' user that `ferry init` exempts, when `as_proxy`)."""
    prefix = ["ip", "netns", "exec", ns]
    if as_proxy:
        prefix += ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups", "--"]
    return prefix + cmd


def start_transparent(args, work, node, proxy_cpu, load_cpu, procs, envoy=True, timeout=30.0):
    """Pods on `node`'s bridge: nginx in three servers; a Ferry pair and two Envoy clients (sidecar and bare config)
    and an Envoy server (not with `envoy=False`), each behind `ferry init`'s rules; ferry-control on the node. Each
    proxy is given `timeout` seconds to be ready. Returns the targets (the caller stops `procs` and closes `node`,
    whatever happens)."""
    os.chmod(work, 0o755)  # the proxies (UID 1337) read their certificates and the CA root here
    for pod in ["plain-server", "ferry-server"] + ["envoy-server"] * envoy:
        conf = f"{work}/nginx-{pod}.conf"
        os.makedirs(f"{work}/nginx-{pod}", exist_ok=True)
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=f"{work}/nginx-{pod}", port=80, listen="0.0.0.0"))
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(Proc(f"nginx-{pod}", in_ns(node.ns(pod), [nginx_bin, "-c", conf, "-p", f"{work}/nginx-{pod}"]),
                          f"{work}/nginx-{pod}.log", cpu=load_cpu))
    for pod in ["ferry-client", "ferry-server"] + ["envoy-client", "envoy-bare-client", "envoy-server"] * envoy:
        node.exec(node.ns(pod), args.ferry, "init")
    # The control plane on the node, its API on the node's loopback.
    cp_dir = f"{work}/t-control"
    api = 15080
    control = Proc("t-ferry-control", in_ns(node.node, [args.control, "serve", "--state-dir", cp_dir, "--api-addr",
                                                       f"127.0.0.1:{api}", "--xds-addr", f"{NODE_NET}.1:15010",
                                                       "--metrics-addr", "127.0.0.1:15014"]),
                   f"{work}/t-control.log", cpu=load_cpu)
    procs.append(control)
    deadline = time.time() + 20
    while not os.path.exists(f"{cp_dir}/admin.token"):
        if time.time() > deadline:
            raise RuntimeError("ferry-control (transparent) did not start")
        time.sleep(0.05)
    time.sleep(0.5)
    ctl_env = dict(os.environ, FERRY_CONTROL_API=f"http://127.0.0.1:{api}",
                   FERRY_TOKEN=open(f"{cp_dir}/admin.token").read().strip())
    ctl = lambda *a, stdin=None: subprocess.run(in_ns(node.node, [args.ctl, *a]), env=ctl_env, input=stdin,
                                                capture_output=True, text=True, check=True).stdout.strip()
    plain, server = node.ip("plain-server"), node.ip("ferry-server")
    services = f"""apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {{name: plain, namespace: default}}
spec: {{ports: [{{port: 80, protocol: http}}], addresses: ["{plain}"], endpoints: [{{address: "{plain}:80"}}]}}
---
apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: default}}
spec: {{ports: [{{port: 80, protocol: http}}], addresses: [backend.mesh], identities: [backend]}}
---
""" + FERRY_POLICY.format(name="plain") + "---\n" + FERRY_POLICY.format(name="backend")
    ctl("apply", "-f", "-", stdin=services)
    shutil.copy(f"{cp_dir}/ca.crt", f"{work}/t-ca.crt")
    os.chmod(f"{work}/t-ca.crt", 0o644)
    base = {"FERRY_CONTROL_ADDR": f"{NODE_NET}.1:15010", "FERRY_CONTROL_SERVER_NAME": "ferry-control",
            "FERRY_CA_ROOT": f"{work}/t-ca.crt", "FERRY_WORKERS": "1", "FERRY_ACCESS_LOG": "off",
            "FERRY_LOG_LEVEL": "warn", "FERRY_NAMESPACE": "default"}
    ferries = {}
    for pod, account, extra in [("ferry-server", "backend", {"FERRY_SERVICE": "backend"}),
                                ("ferry-client", "client", {})]:
        env = dict(os.environ, **base, **extra, FERRY_NODE_ID=f"t-{pod}",
                   FERRY_JOIN_TOKEN=ctl("token", "create", "-n", "default", "--service-account", account))
        ferries[pod] = Proc(f"t-{pod}", in_ns(node.ns(pod), [args.ferry, "run"], as_proxy=True), f"{work}/t-{pod}.log",
                            env=env, cpu=proxy_cpu)
        procs.append(ferries[pod])
        node.wait_http(pod, "http://127.0.0.1:15020/health/ready", timeout)
    fc, fs = ferries["ferry-client"], ferries["ferry-server"]
    ferry_targets = {
        "t-ferry": (f"http://{plain}/", plain, [fc], node.ns("ferry-client")),
        "t-ferry-mesh": (f"http://{server}/", server, [fc, fs], node.ns("ferry-client")),
    }
    if not envoy:
        return ferry_targets
    # Envoy: certificates from openssl (made by envoy_mesh_certs for the loopback pair), readable by UID 1337.
    for name in ["ca.crt", "client.crt", "client.key", "server.crt", "server.key"]:
        os.chmod(f"{work}/{name}", 0o644)
    envoys = {}
    for i, (pod, conf) in enumerate([
            ("envoy-server", envoy_t_server(work, node.ip("envoy-server"))),
            ("envoy-client", envoy_t_client(work, plain, node.ip("envoy-server"), SIDECAR_ROUTE)),
            ("envoy-bare-client", envoy_t_client(work, plain, node.ip("envoy-server"), None))]):
        with open(f"{work}/t-{pod}.yaml", "w") as f:
            f.write(conf)
        envoys[pod] = Proc(f"t-{pod}", in_ns(node.ns(pod), [args.envoy, "-c", f"{work}/t-{pod}.yaml", "--concurrency",
                                                           "1", "--log-level", "warn", "--disable-hot-restart",
                                                           "--base-id", str(i + 20)], as_proxy=True),
                           f"{work}/t-{pod}.log", cpu=proxy_cpu)
        procs.append(envoys[pod])
        node.wait_http(pod, "http://127.0.0.1:15000/ready")
    es, ec, eb = envoys["envoy-server"], envoys["envoy-client"], envoys["envoy-bare-client"]
    targets = {
        "t-direct": (f"http://{plain}/", plain, [], node.ns("load-direct")),
        "t-ferry": ferry_targets["t-ferry"],
        "t-envoy": (f"http://{plain}/", plain, [eb], node.ns("envoy-bare-client")),
        "t-envoy-sc": (f"http://{plain}/", plain, [ec], node.ns("envoy-client")),
        "t-ferry-mesh": ferry_targets["t-ferry-mesh"],
        "t-envoy-mesh": (f"http://{node.ip('envoy-server')}/", node.ip("envoy-server"), [eb, es],
                         node.ns("envoy-bare-client")),
        "t-envoy-sc-mesh": (f"http://{node.ip('envoy-server')}/", node.ip("envoy-server"), [ec, es],
                            node.ns("envoy-client")),
    }
    return targets


# ---- Instructions, allocations and syscalls per request (repeatable whatever else the machine does) ----

# The C library's and mimalloc's entry points (the proxy's global allocator is mimalloc; ferry-control and older builds use
# the C library's).
ALLOC_FUNCTIONS = {"malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign",
                   "mi_malloc", "mi_zalloc", "mi_realloc", "mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"}


def callgrind_totals(path):
    """(instructions, allocation calls) of a callgrind output file: the `totals:`/`summary:` Ir, and the calls into
    the C allocator (`calls=` lines under a `cfn=` naming one of ALLOC_FUNCTIONS)."""
    names, current, ir, allocs = {}, None, 0, 0
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                ir = int(line.split()[1])
            elif line.startswith(("fn=", "cfn=")):
                # Compressed names: `(id) name` the first time (under fn= or cfn=), `(id)` afterwards.
                ref = line.split("=", 1)[1].strip()
                key, name = ref, ref
                if ref.startswith("("):
                    key, _, name = ref.partition(")")
                    name = name.strip()
                    if name:
                        names[key] = name
                    name = names.get(key)
                if line.startswith("cfn="):
                    current = name
            elif line.startswith("calls=") and current in ALLOC_FUNCTIONS:
                allocs += int(line[6:].split()[0])
    return ir, allocs


def oha_count(url, host, count, cpu, ns=None):
    cmd = ["oha", "--no-tui", *oha_json_flag(), "-n", str(count), "-c", "4", "-H", f"Host: {host}"]
    for h in EXTRA_HEADERS:
        cmd += ["-H", h]
    cmd.append(url)
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, timeout=600)
    data = json.loads(out.stdout)
    return int(data.get("statusCodeDistribution", {}).get("200", 0))


def per_request(args, work, label, start, url, host, requests, load_cpu, proxy_cpu):
    """Instructions and allocations per request (callgrind, counting only while `requests` requests run after a
    warm-up) and syscalls per request (strace -c on a native run) of the proxies `start` launches.
    `start(wrapper) -> [Proc]` starts the proxies of a path, each command prefixed with `wrapper`."""
    outs = f"{work}/callgrind-{label}"
    os.makedirs(outs, exist_ok=True)
    grind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={outs}/out.%p"]
    procs = start(grind)
    try:
        wait_http(url, {"Host": host}, timeout=120)
        oha_count(url, host, 200, load_cpu)
        for p in procs:
            subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], capture_output=True, check=True, timeout=60)
        ok = oha_count(url, host, requests, load_cpu)
        for p in procs:
            subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], capture_output=True, check=True, timeout=60)
    finally:
        for p in procs:
            p.stop()
    ir = allocs = 0
    for p in procs:
        i, a = callgrind_totals(f"{outs}/out.{p.pid}")
        ir, allocs = ir + i, allocs + a
    # Syscalls: a native run, strace attached to every thread of each proxy for `requests` requests.
    procs = start([])
    syscalls = 0
    try:
        wait_http(url, {"Host": host}, timeout=30)
        oha_count(url, host, 200, load_cpu)
        tracers = []
        for p in procs:
            tids = [a for t in os.listdir(f"/proc/{p.pid}/task") for a in ("-p", t)]
            tracers.append(subprocess.Popen(["strace", "-c", "-f", *tids], stderr=subprocess.PIPE, text=True))
        time.sleep(1)
        traced_ok = oha_count(url, host, requests, load_cpu)
        for t in tracers:
            t.send_signal(2)
            _, err = t.communicate(timeout=30)
            # The summary's last line: `100.00  <seconds>  <usecs/call>  <calls>  [<errors>]  total`.
            total = [line for line in err.splitlines() if line.strip().endswith("total")]
            if not total:
                raise RuntimeError(f"strace printed no summary: {err[-500:]}")
            syscalls += int(total[-1].split()[3])
    finally:
        for p in procs:
            p.stop()
    return {"requests": ok, "instructions": ir / max(ok, 1), "allocations": allocs / max(ok, 1),
            "syscalls": syscalls / max(traced_ok, 1)}


# (report label, a, b): latency added by a vs by b, and their CPU per request. Envoy appears twice per path: as a mesh
# sidecar is configured ("-sc": route timeout and retries, like Ferry's TrafficPolicy) and bare; the goals are read
# against the better of the two.
PAIRS = [("hop", "ferry", "envoy"), ("hop", "ferry", "envoy-sc"),
         ("mesh", "ferry-mesh", "envoy-mesh"), ("mesh", "ferry-mesh", "envoy-sc-mesh"),
         ("t-hop", "t-ferry", "t-envoy"), ("t-hop", "t-ferry", "t-envoy-sc"),
         ("t-mesh", "t-ferry-mesh", "t-envoy-mesh"), ("t-mesh", "t-ferry-mesh", "t-envoy-sc-mesh"),
         ("policies", "ferry-policies", "ferry-mesh"), ("tracing", "ferry-traced", "ferry")]


def baseline(target):
    """The direct target a proxied target's added latency is measured against."""
    return "t-direct" if target.startswith("t-") else "direct"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--control", required=True, help="ferry-control binary (the mesh path gets identities from it)")
    ap.add_argument("--ctl", required=True, help="ferryctl binary")
    ap.add_argument("--otlp-sink", required=True, help="the otlp_sink example (receives the traced target's spans)")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 3)))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 20)))
    ap.add_argument("--rates", default=os.environ.get("BENCH_RATES", "1000 4000"))
    ap.add_argument("--conns", type=int, default=int(os.environ.get("BENCH_CONNS", 32)))
    ap.add_argument("--cpu-seconds", type=int, default=int(os.environ.get("BENCH_CPU_SECONDS", 10)))
    ap.add_argument("--targets", default=os.environ.get("BENCH_TARGETS", ""),
                    help="only these targets (space-separated; default all)")
    ap.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", 2000)),
                    help="requests counted per callgrind / strace measurement")
    ap.add_argument("--no-instructions", action="store_true", help="skip callgrind, allocations and syscalls")
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"), help="compare two ferry builds (A/B mode)")
    ap.add_argument("--routes", action="store_true",
                    help="A/B of the --ferry build (or --ab's) without and with 100 HTTPRoute rules on b's Services")
    ap.add_argument("--ab-reps", type=int, default=int(os.environ.get("BENCH_AB_REPS", 3)),
                    help="A/B mode: callgrind repetitions per build")
    ap.add_argument("--flame", metavar="DIR",
                    help="flame graphs instead of figures: perf (cpu-clock samples, DWARF stacks) of --ferry's hop "
                         "and mesh pair (or --ab's builds) at the highest rate, SVGs written to DIR")
    ap.add_argument("--out", default="target/bench/dataplane.json")
    args = ap.parse_args()
    if args.ab or args.routes or args.flame:
        return ab_main(args)
    rates = [int(r) for r in args.rates.split()]
    two_cpus = (os.cpu_count() or 1) >= 2 and os.environ.get("BENCH_PIN", "1") != "0"
    proxy_cpu, load_cpu = (1, 0) if two_cpus else (None, None)

    work = tempfile.mkdtemp(prefix="ferry-bench-")
    backend, ferry_port, envoy_port, envoy_sc_port = free_port(), free_port(), free_port(), free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(dir=work, port=backend, listen="127.0.0.1"))
    for name, port, route in [("envoy", envoy_port, None), ("envoy-sc", envoy_sc_port, SIDECAR_ROUTE)]:
        with open(f"{work}/{name}.yaml", "w") as f:
            f.write(envoy_hop(free_port(), port, backend, route))
    with open(f"{work}/ferry.yaml", "w") as f:
        f.write(FERRY_CONF.format(backend=backend))
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    envoy_version = subprocess.run([args.envoy, "--version"], capture_output=True, text=True).stdout.strip()

    procs = []
    node = None
    try:
        nginx = Proc("nginx", [nginx_bin, "-c", f"{work}/nginx.conf", "-p", work], f"{work}/nginx.log", cpu=load_cpu)
        procs.append(nginx)
        wait_http(f"http://127.0.0.1:{backend}/")
        env = dict(os.environ)
        env.update({
            "FERRY_OUTBOUND_ADDR": f"127.0.0.1:{ferry_port}",
            "FERRY_INBOUND_ADDR": f"127.0.0.1:{free_port()}",
            "FERRY_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "FERRY_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
            "FERRY_CONFIG_FILE": f"{work}/ferry.yaml",
            "FERRY_WORKERS": "1",
            "FERRY_ACCESS_LOG": "off",
            "FERRY_LOG_LEVEL": "warn",
        })
        ferry = Proc("ferry", [args.ferry], f"{work}/ferry.log", env=env, cpu=proxy_cpu)
        # The same single hop with every request traced: sampling 100 %, spans exported over OTLP/gRPC to a sink.
        sink_port, traced_port = free_port(), free_port()
        sink = Proc("otlp-sink", [args.otlp_sink, f"127.0.0.1:{sink_port}"], f"{work}/otlp-sink.log", cpu=load_cpu)
        traced_env = dict(env, FERRY_OUTBOUND_ADDR=f"127.0.0.1:{traced_port}",
                          FERRY_INBOUND_ADDR=f"127.0.0.1:{free_port()}", FERRY_ADMIN_ADDR=f"127.0.0.1:{free_port()}",
                          FERRY_HEALTH_ADDR=f"127.0.0.1:{free_port()}", FERRY_TRACE_SAMPLING="1",
                          FERRY_OTLP_ENDPOINT=f"http://127.0.0.1:{sink_port}")
        traced = Proc("ferry-traced", [args.ferry], f"{work}/ferry-traced.log", env=traced_env, cpu=proxy_cpu)
        procs += [sink, traced]
        envoys = {name: Proc(name, [args.envoy, "-c", f"{work}/{name}.yaml", "--concurrency", "1", "--log-level",
                                    "warn", "--disable-hot-restart", "--base-id", str(i + 1)],
                             f"{work}/{name}.log", cpu=proxy_cpu) for i, name in enumerate(["envoy", "envoy-sc"])}
        procs += [ferry, *envoys.values()]
        mesh = start_mesh(args, work, backend, proxy_cpu, load_cpu, procs)
        node = Node()
        transparent = start_transparent(args, work, node, proxy_cpu, load_cpu, procs)
        targets = {
            "direct": (f"http://127.0.0.1:{backend}/", "backend", [], None),
            "ferry": (f"http://127.0.0.1:{ferry_port}/", "backend", [ferry], None),
            "envoy": (f"http://127.0.0.1:{envoy_port}/", "backend", [envoys["envoy"]], None),
            "envoy-sc": (f"http://127.0.0.1:{envoy_sc_port}/", "backend", [envoys["envoy-sc"]], None),
            "ferry-mesh": (mesh["ferry"][0], "backend.mesh", mesh["ferry"][1], None),
            "envoy-mesh": (mesh["envoy"][0], "backend.mesh", mesh["envoy"][1], None),
            "envoy-sc-mesh": (mesh["envoy-sc"][0], "backend.mesh", mesh["envoy-sc"][1], None),
            "ferry-policies": (mesh["policies"][0], "guarded.mesh", mesh["policies"][1], None),
            "ferry-traced": (f"http://127.0.0.1:{traced_port}/", "backend", [traced], None),
            **transparent,
        }
        if args.targets:
            wanted = set(args.targets.split())
            wanted |= {baseline(t) for t in wanted}
            targets = {k: v for k, v in targets.items() if k in wanted}
        pairs = [p for p in PAIRS if p[1] in targets and p[2] in targets]
        proxies = list(dict.fromkeys(t for _, a, b in pairs for t in (a, b)))
        for name, (url, host, _, ns) in targets.items():
            wait_target(url, host, ns)
        time.sleep(1)
        rss_idle = {t: rss_of(targets[t][2]) for t in proxies}
        print(f"idle RSS: {rss_idle}", flush=True)

        # Warm-up (connection pools, allocator), not recorded.
        for name, (url, host, _, ns) in targets.items():
            run_oha(url, host, args, 3, 1000, args.conns, load_cpu, ns)

        latency = {rate: {t: [] for t in targets} for rate in rates}
        order = list(targets)
        for run in range(args.runs):
            for rate in rates:
                rotated = order[run % len(order):] + order[:run % len(order)]
                for name in rotated:
                    url, host, _, ns = targets[name]
                    r = run_oha(url, host, args, args.seconds, rate, args.conns, load_cpu, ns)
                    latency[rate][name].append(r)
                    print(f"run {run + 1}/{args.runs} {rate:>5} req/s {name:<16} p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  p99.9 {r['p99.9_ms']:.3f} ms  ok {r['ok']} failed {r['failed']}",
                          flush=True)
        rss_after = {t: rss_of(targets[t][2]) for t in proxies}

        # Closed loop: requests per proxy CPU-second (the mesh path: both proxies' CPU together).
        efficiency = {t: [] for t in proxies}
        for run in range(args.runs):
            for name in (proxies if run % 2 == 0 else proxies[::-1]):
                url, host, procs_of, ns = targets[name]
                before = sum(cpu_seconds(p.pid) for p in procs_of)
                r = run_oha(url, host, args, args.cpu_seconds, None, args.conns, load_cpu, ns)
                used = sum(cpu_seconds(p.pid) for p in procs_of) - before
                efficiency[name].append(r["ok"] / used if used > 0 else 0.0)
                print(f"closed loop {name:<16} {r['rps']:.0f} req/s, {used:.2f} CPU-s, "
                      f"{efficiency[name][-1]:.0f} req per CPU-s", flush=True)
        rss_end = {t: rss_of(targets[t][2]) for t in proxies}
        instructions = {}
        if not args.no_instructions:
            hop = ferry_hop(args.ferry, backend, work, proxy_cpu, "cg-hop")
            pair = ferry_pair(args.ferry, mesh["control"], "cg-backend", backend, work, proxy_cpu)
            for label, (url, host, start) in [("hop", hop), ("mesh", pair)]:
                instructions[label] = per_request(args, work, label, start, url, host, args.requests, load_cpu,
                                                  proxy_cpu)
                print(f"per request, {label}: {instructions[label]}", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
        if node:
            node.close()

    report = {"rates": {}, "machine": {
        "cpus": os.cpu_count(), "kernel": platform.release(), "cpu": cpu_model(), "pinning": two_cpus,
    }, "envoy_version": envoy_version, "runs": args.runs, "seconds": args.seconds, "conns": args.conns,
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command_line()}
    failures = 0
    for rate in rates:
        entry = {}
        for label, a, b in pairs:
            path = {"a": a, "b": b}
            for q in ["p50_ms", "p90_ms", "p99_ms", "p99.9_ms"]:
                direct = [r[q] for r in latency[rate][baseline(a)]]
                a_add = [r[q] - d for r, d in zip(latency[rate][a], direct)]
                b_add = [r[q] - d for r, d in zip(latency[rate][b], direct)]
                ratios = [x / y if y > 0 else float("inf") for x, y in zip(a_add, b_add)]
                path[q] = {
                    "direct": spread(direct),
                    "a": spread([r[q] for r in latency[rate][a]]),
                    "b": spread([r[q] for r in latency[rate][b]]),
                    "a_added": spread(a_add),
                    "b_added": spread(b_add),
                    "ratio_added": spread(ratios),
                }
            entry[f"{a}/{b}"] = path
        for t in targets:
            failures += sum(r["failed"] for r in latency[rate][t])
        entry["achieved_rps"] = {t: spread([r["rps"] for r in latency[rate][t]]) for t in targets}
        report["rates"][str(rate)] = entry
    report["requests_per_cpu_second"] = {k: spread(v) for k, v in efficiency.items()}
    for _, a, b in pairs:
        report["requests_per_cpu_second"][f"ratio {a}/{b}"] = (
            report["requests_per_cpu_second"][a]["median"] / report["requests_per_cpu_second"][b]["median"])
    report["rss"] = {"idle": rss_idle, "after_latency_runs": rss_after, "after_closed_loop": rss_end,
                     "ratio_after_latency_runs": {
                         f"{a}/{b}": rss_after[a]["rss_kib"] / rss_after[b]["rss_kib"] for _, a, b in pairs}}
    report["per_request"] = instructions
    report["failed_requests"] = failures
    report["error_kinds"] = sorted({k for rate in rates for t in targets for r in latency[rate][t] for k in r["errors"]})
    report["raw"] = {str(rate): latency[rate] for rate in rates}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    text = print_table(report, rates, pairs)
    print(text)
    print(f"\nwrote {args.out}; logs in {work}")
    if failures:
        print(f"WARNING: {failures} requests failed", file=sys.stderr)
    if not args.targets:
        append_run_log(report, text)


def ab_main(args):
    """Two Ferry builds in one run: one explicit hop and a mesh pair each, in front of the same nginx, through the
    same control plane; latency runs interleaved (rotated order), closed-loop efficiency alternating, then callgrind
    and strace per request, alternating builds. Ratios are new/old per run, with their spread."""
    old, new = args.ab or (args.ferry, args.ferry)
    routes = args.routes
    if routes:
        EXTRA_HEADERS.append(ROUTE_HEADER)
    rates = [int(r) for r in args.rates.split()]
    two_cpus = (os.cpu_count() or 1) >= 2 and os.environ.get("BENCH_PIN", "1") != "0"
    proxy_cpu, load_cpu = (1, 0) if two_cpus else (None, None)
    work = tempfile.mkdtemp(prefix="ferry-ab-")
    backend = free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(dir=work, port=backend, listen="127.0.0.1"))
    with open(f"{work}/ferry.yaml", "w") as f:
        f.write(FERRY_CONF.format(backend=backend))
    with open(f"{work}/ferry-routes.yaml", "w") as f:
        f.write(FERRY_CONF.format(backend=backend) + "---\n" + bench_routes("backend"))
    procs = []
    try:
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(Proc("nginx", [nginx_bin, "-c", f"{work}/nginx.conf", "-p", work], f"{work}/nginx.log",
                          cpu=load_cpu))
        wait_http(f"http://127.0.0.1:{backend}/")
        control = start_control(args, work, load_cpu, procs)
        b_config = "ferry-routes.yaml" if routes else "ferry.yaml"
        paths = {"a": ferry_hop(old, backend, work, proxy_cpu, "a"),
                 "b": ferry_hop(new, backend, work, proxy_cpu, "b", b_config),
                 "a-mesh": ferry_pair(old, control, "backend-a", backend, work, proxy_cpu),
                 "b-mesh": ferry_pair(new, control, "backend-b", backend, work, proxy_cpu, routes)}
        if routes:
            paths = {name: (url.rstrip("/") + ROUTE_PATH, host, start) for name, (url, host, start) in paths.items()}
        direct = f"http://127.0.0.1:{backend}" + (ROUTE_PATH if routes else "/")
        targets = {"direct": (direct, "backend", [])}
        for name, (url, host, start) in paths.items():
            started = start([])
            procs += started
            targets[name] = (url, host, started)
        for url, host, _ in targets.values():
            wait_http(url, {"Host": host})
        for url, host, _ in targets.values():
            run_oha(url, host, args, 3, 1000, args.conns, load_cpu)
        if args.flame:
            labels = ({n: n for n in paths} if args.ab
                      else {"a": "hop", "a-mesh": "mesh"})  # without --ab, a and b are the same build
            for name, label in labels.items():
                url, host, ps = targets[name]
                flame(args, work, label, url, host, ps, max(rates), load_cpu)
            return
        latency = {rate: {t: [] for t in targets} for rate in rates}
        order = list(targets)
        for run in range(args.runs):
            for rate in rates:
                for name in order[run % len(order):] + order[:run % len(order)]:
                    url, host, _ = targets[name]
                    r = run_oha(url, host, args, args.seconds, rate, args.conns, load_cpu)
                    latency[rate][name].append(r)
                    print(f"run {run + 1}/{args.runs} {rate:>5} req/s {name:<7} p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  ok {r['ok']} failed {r['failed']}", flush=True)
        efficiency = {t: [] for t in paths}
        for run in range(args.runs):
            for name in (list(paths) if run % 2 == 0 else list(paths)[::-1]):
                url, host, ps = targets[name]
                before = sum(cpu_seconds(p.pid) for p in ps)
                r = run_oha(url, host, args, args.cpu_seconds, None, args.conns, load_cpu)
                used = sum(cpu_seconds(p.pid) for p in ps) - before
                efficiency[name].append(r["ok"] / used if used > 0 else 0.0)
                print(f"closed loop {name:<7} {efficiency[name][-1]:.0f} req per CPU-s", flush=True)
        for p in [p for t in paths for p in targets[t][2]]:
            p.stop()
        grind = {t: [] for t in paths}
        for rep in range(args.ab_reps):
            for name in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
                url, host, start = paths[name]
                grind[name].append(per_request(args, work, f"{name}-{rep}", start, url, host, args.requests,
                                               load_cpu, proxy_cpu))
                print(f"per request {name}: {grind[name][-1]}", flush=True)
    finally:
        for p in reversed(procs):
            p.stop()
    what = (f"routes A/B: a = {old} without routes, b = {new} with {ROUTE_RULES} HTTPRoute rules on its Service, "
            f"each request matching only the last (`{ROUTE_HEADER}`, regex path {ROUTE_PATH})" if routes
            else f"A/B: a = {old}, b = {new}")
    lines = [f"{what}; ratio b/a (median [min..max] over runs)"]
    fmt = lambda v: f"{statistics.median(v):.3f} [{min(v):.3f}..{max(v):.3f}]"
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
              "command": command_line(), "runs": args.runs, "seconds": args.seconds, "conns": args.conns,
              "latency": {}, "efficiency": efficiency, "per_request": grind}
    for path, (a, b) in {"hop": ("a", "b"), "mesh": ("a-mesh", "b-mesh")}.items():
        for rate in rates:
            for q in ["p50_ms", "p99_ms"]:
                d = [r[q] for r in latency[rate]["direct"]]
                ra = [x[q] - y for x, y in zip(latency[rate][a], d)]
                rb = [x[q] - y for x, y in zip(latency[rate][b], d)]
                ratio = [y / x if x > 0 else float("inf") for x, y in zip(ra, rb)]
                report["latency"][f"{path} {rate} {q}"] = {"a_added": ra, "b_added": rb, "ratio": ratio}
                lines.append(f"{path:<5} added {q[:-3]} @{rate}/s: a {fmt(ra)} ms, b {fmt(rb)} ms, ratio {fmt(ratio)}")
        ea, eb = efficiency[a], efficiency[b]
        lines.append(f"{path:<5} requests per CPU-second: a {statistics.median(ea):.0f}, b {statistics.median(eb):.0f}, "
                     f"ratio {fmt([y / x for x, y in zip(ea, eb)])}")
        for key in ["instructions", "allocations", "syscalls"]:
            va, vb = [m[key] for m in grind[a]], [m[key] for m in grind[b]]
            lines.append(f"{path:<5} {key} per request: a {fmt(va)}, b {fmt(vb)}, ratio of medians "
                         f"{statistics.median(vb) / statistics.median(va):.4f}, per rep {fmt([y / x for x, y in zip(va, vb)])}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out.replace(".json", "-routes.json" if routes else "-ab.json"), "w") as f:
        json.dump(report, f, indent=2)
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    with open(readme, "a") as f:
        kind = "routes A/B" if routes else "A/B"
        f.write(f"\n### {report['date']}, commit {report['commit']} ({kind})\n\n`{report['command']}` "
                f"({args.runs} runs x {args.seconds} s, {args.ab_reps} callgrind reps of {args.requests} requests)"
                f"\n\n```\n{text}\n```\n")
    print(f"logs in {work}")


def flame(args, work, label, url, host, procs, rate, load_cpu):
    """A flame graph of `procs` (a path's proxies) serving `rate` req/s: `perf record` (the cpu-clock software event,
    which works where the VM has no hardware counters; DWARF unwinding, as release builds keep no frame pointers) for
    BENCH_SECONDS, folded by inferno-collapse-perf and drawn by inferno-flamegraph into `<DIR>/<label>.svg`; the
    folded stacks beside it (`.folded`), and the heaviest functions by self time printed."""
    os.makedirs(args.flame, exist_ok=True)
    folded = []
    seconds = min(args.seconds, 10)
    recorders = []
    for p in procs:
        data = f"{work}/perf-{label}-{p.pid}.data"
        recorders.append((data, subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "--call-graph", "dwarf,16384", "-p",
             str(p.pid), "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(0.5)
    r = run_oha(url, host, args, seconds, rate, args.conns, load_cpu)
    for _, rec in recorders:
        rec.send_signal(2)
        rec.wait(timeout=120)
    for data, _ in recorders:
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True, timeout=1200)
        out = subprocess.run(["inferno-collapse-perf"], input=script.stdout, capture_output=True, text=True,
                             check=True, timeout=600)
        folded += out.stdout.splitlines()
    base = os.path.join(args.flame, label)
    with open(base + ".folded", "w") as f:
        f.write("\n".join(folded) + "\n")
    title = f"ferry {label}: {rate} req/s, {r['ok']} requests in {seconds} s (cpu-clock samples at 1999 Hz)"
    with open(base + ".svg", "w") as f:
        subprocess.run(["inferno-flamegraph", "--title", title, "--width", "1600", "--minwidth", "0.5",
                        "--countname", "ns", base + ".folded"], stdout=f,
                       check=True, timeout=600)
    selfs, total = {}, 0
    for line in folded:
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        selfs[leaf] = selfs.get(leaf, 0) + int(count)
        total += int(count)
    print(f"flame {label}: {base}.svg, {total / 1e9:.2f} CPU-s sampled; heaviest by self time:")
    for leaf, n in sorted(selfs.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {100 * n / max(total, 1):5.1f} %  {leaf[:150]}")


def wait_target(url, host, ns):
    if ns is None:
        return wait_http(url, {"Host": host})
    deadline = time.time() + 30
    while time.time() < deadline:
        out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", "-o", "/dev/null", "-m", "1", "-H",
                              f"Host: {host}", url], capture_output=True)
        if out.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering from {ns}")


def git_commit():
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def envoy_release(version):
    """`1.40.0` out of `envoy --version`'s line (`<path>  version: <commit>/1.40.0/Clean/RELEASE/BoringSSL`; the path
    may hold other versions, such as a Python's)."""
    import re
    found = re.search(r"version: [0-9a-f]+/(\d+\.\d+\.\d+)/", version)
    return found.group(1) if found else version


def command_line():
    """How the benchmark was started, with the knobs set in the environment."""
    knobs = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_"))
    return (knobs + " " if knobs else "") + " ".join(sys.argv)


def append_run_log(report, text):
    """Every full run goes into benches/README.md's run log: date, commit, command and the table."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    with open(readme, "a") as f:
        f.write(f"\n### {report['date']}, commit {report['commit']}\n\n`{report['command']}` "
                f"({report['runs']} runs x {report['seconds']} s, {report['conns']} connections; "
                f"Envoy {envoy_release(report['envoy_version'])})"
                f"\n\n```\n{text.strip()}\n```\n")


def rss_of(procs):
    """Summed VmRSS / RssAnon of a target's proxy processes."""
    total = {"rss_kib": 0, "anon_kib": 0}
    for p in procs:
        for k, v in rss_kib(p.pid).items():
            total[k] += v
    return total


def start_control(args, work, load_cpu, procs):
    """ferry-control on loopback: (ctl(*args, stdin=None) -> stdout, the proxies' base environment)."""
    cp_dir = f"{work}/control"
    api, xds = free_port(), free_port()
    control = Proc("ferry-control", [args.control, "serve", "--state-dir", cp_dir, "--api-addr", f"127.0.0.1:{api}",
                                     "--xds-addr", f"127.0.0.1:{xds}", "--metrics-addr", f"127.0.0.1:{free_port()}"],
                   f"{work}/control.log", cpu=load_cpu)
    procs.append(control)
    deadline = time.time() + 20
    while not os.path.exists(f"{cp_dir}/admin.token") or not port_open(api):
        if time.time() > deadline:
            raise RuntimeError("ferry-control did not start")
        time.sleep(0.05)
    ctl_env = dict(os.environ, FERRY_CONTROL_API=f"http://127.0.0.1:{api}",
                   FERRY_TOKEN=open(f"{cp_dir}/admin.token").read().strip())
    ctl = lambda *a, stdin=None: subprocess.run([args.ctl, *a], env=ctl_env, input=stdin, capture_output=True,
                                                text=True, check=True).stdout.strip()
    base = {"FERRY_CONTROL_ADDR": f"127.0.0.1:{xds}", "FERRY_CA_ROOT": f"{cp_dir}/ca.crt", "FERRY_WORKERS": "1",
            "FERRY_ACCESS_LOG": "off", "FERRY_LOG_LEVEL": "warn"}
    return ctl, base


def ferry_pair(ferry, control, service, backend, work, proxy_cpu, routes=False):
    """A mesh path of its own for build `ferry`: Service `service` (identity `service`, the sidecar policy) served by a
    server-side proxy in front of nginx, called through a client-side proxy. Returns (url, host, start) where
    start(wrapper) launches both proxies (each command prefixed with `wrapper`, e.g. valgrind) with fresh join tokens
    and returns them, client first."""
    ctl, base = control
    ctl("apply", "-f", "-", stdin=f"""apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {{name: {service}, namespace: default}}
spec: {{ports: [{{port: 80, protocol: http}}], addresses: [{service}.mesh], identities: [{service}]}}
---
""" + FERRY_POLICY.format(name=service))
    if routes:
        ctl("apply", "-f", "-", stdin=bench_routes(service))
    client_out = free_port()
    ports = {side: {k: f"127.0.0.1:{free_port()}" for k in ["FERRY_INBOUND_ADDR", "FERRY_OUTBOUND_ADDR",
                                                           "FERRY_HEALTH_ADDR", "FERRY_ADMIN_ADDR"]}
             for side in ["client", "server"]}
    ports["client"]["FERRY_OUTBOUND_ADDR"] = f"127.0.0.1:{client_out}"

    def start(wrapper):
        token = lambda account: ctl("token", "create", "-n", "default", "--service-account", account)
        server = dict(os.environ, **base, **ports["server"], FERRY_JOIN_TOKEN=token(service), FERRY_SERVICE=service,
                      FERRY_APP_ADDR=f"127.0.0.1:{backend}", FERRY_NODE_ID=f"{service}-server")
        client = dict(os.environ, **base, **ports["client"], FERRY_JOIN_TOKEN=token(f"{service}-client"),
                      FERRY_NODE_ID=f"{service}-client")
        tag = f"{service}-{len(wrapper) and 'grind' or 'native'}"
        return [Proc(f"{tag}-client", wrapper + [ferry], f"{work}/{tag}-client.log", env=client, cpu=proxy_cpu),
                Proc(f"{tag}-server", wrapper + [ferry], f"{work}/{tag}-server.log", env=server, cpu=proxy_cpu)]
    return f"http://127.0.0.1:{client_out}/", f"{service}.mesh", start


def ferry_hop(ferry, backend, work, proxy_cpu, tag, config="ferry.yaml"):
    """One explicit hop of build `ferry` to nginx (the file source `config`, the sidecar policy): (url, host, start)."""
    port = free_port()
    env = dict(os.environ, FERRY_OUTBOUND_ADDR=f"127.0.0.1:{port}", FERRY_INBOUND_ADDR=f"127.0.0.1:{free_port()}",
               FERRY_ADMIN_ADDR=f"127.0.0.1:{free_port()}", FERRY_HEALTH_ADDR=f"127.0.0.1:{free_port()}",
               FERRY_CONFIG_FILE=f"{work}/{config}", FERRY_WORKERS="1", FERRY_ACCESS_LOG="off", FERRY_LOG_LEVEL="warn")

    def start(wrapper):
        name = f"{tag}-{len(wrapper) and 'grind' or 'native'}"
        return [Proc(name, wrapper + [ferry], f"{work}/{name}.log", env=env, cpu=proxy_cpu)]
    return f"http://127.0.0.1:{port}/", "backend", start


def start_mesh(args, work, backend, proxy_cpu, load_cpu, procs, envoy=True):
    """The mesh path's two pairs. Ferry: ferry-control (identities, the Service) and two proxies, each with a
    certificate from the CSR service; the server-side proxy registers as the endpoint of Service backend (a third, of
    Service guarded, applies MESH_POLICIES). Envoy (not with `envoy=False`): two Envoys with static certificates.
    Returns {name: (url, [proxy processes])}."""
    ctl, base = start_control(args, work, load_cpu, procs)
    ctl("apply", "-f", "-", stdin=MESH_SERVICE + "---\n" + FERRY_POLICY.format(name="backend") + "---\n" + MESH_POLICIES)
    server_in, client_out = free_port(), free_port()
    server_env = dict(os.environ, **base, FERRY_JOIN_TOKEN=ctl("token", "create", "-n", "default",
                                                               "--service-account", "backend"),
                      FERRY_SERVICE="backend", FERRY_APP_ADDR=f"127.0.0.1:{backend}",
                      FERRY_INBOUND_ADDR=f"127.0.0.1:{server_in}", FERRY_OUTBOUND_ADDR=f"127.0.0.1:{free_port()}",
                      FERRY_HEALTH_ADDR=f"127.0.0.1:{free_port()}", FERRY_ADMIN_ADDR=f"127.0.0.1:{free_port()}",
                      FERRY_NODE_ID="bench-server")
    client_env = dict(os.environ, **base, FERRY_JOIN_TOKEN=ctl("token", "create", "-n", "default",
                                                               "--service-account", "client"),
                      FERRY_OUTBOUND_ADDR=f"127.0.0.1:{client_out}", FERRY_INBOUND_ADDR=f"127.0.0.1:{free_port()}",
                      FERRY_HEALTH_ADDR=f"127.0.0.1:{free_port()}", FERRY_ADMIN_ADDR=f"127.0.0.1:{free_port()}",
                      FERRY_NODE_ID="bench-client")
    guarded_env = dict(server_env, FERRY_JOIN_TOKEN=ctl("token", "create", "-n", "default", "--service-account",
                                                        "guarded"),
                       FERRY_SERVICE="guarded", FERRY_INBOUND_ADDR=f"127.0.0.1:{free_port()}",
                       FERRY_OUTBOUND_ADDR=f"127.0.0.1:{free_port()}", FERRY_HEALTH_ADDR=f"127.0.0.1:{free_port()}",
                       FERRY_ADMIN_ADDR=f"127.0.0.1:{free_port()}", FERRY_NODE_ID="bench-guarded")
    fs = Proc("ferry-server", [args.ferry], f"{work}/ferry-server.log", env=server_env, cpu=proxy_cpu)
    fc = Proc("ferry-client", [args.ferry], f"{work}/ferry-client.log", env=client_env, cpu=proxy_cpu)
    fg = Proc("ferry-guarded", [args.ferry], f"{work}/ferry-guarded.log", env=guarded_env, cpu=proxy_cpu)
    procs += [fs, fc, fg]
    ferry = {"control": (ctl, base), "ferry": (f"http://127.0.0.1:{client_out}/", [fc, fs]),
             "policies": (f"http://127.0.0.1:{client_out}/", [fc, fg])}
    if not envoy:
        return ferry
    envoy_mesh_certs(work)
    envoy_in, envoy_out = free_port(), free_port()
    with open(f"{work}/envoy-server.yaml", "w") as f:
        f.write(envoy_mesh_server(free_port(), envoy_in, backend, work))
    envoy_sc_out = free_port()
    with open(f"{work}/envoy-client.yaml", "w") as f:
        f.write(envoy_mesh_client(free_port(), envoy_out, envoy_in, work, None))
    with open(f"{work}/envoy-sc-client.yaml", "w") as f:
        f.write(envoy_mesh_client(free_port(), envoy_sc_out, envoy_in, work, SIDECAR_ROUTE))
    envoys = [Proc(f"envoy-{side}", [args.envoy, "-c", f"{work}/envoy-{side}.yaml", "--concurrency", "1",
                                     "--log-level", "warn", "--disable-hot-restart", "--base-id", str(i + 10)],
                   f"{work}/envoy-{side}.log", cpu=proxy_cpu) for i, side in enumerate(["server", "client", "sc-client"])]
    procs += envoys
    return {**ferry, "envoy": (f"http://127.0.0.1:{envoy_out}/", envoys[:2]),
            "envoy-sc": (f"http://127.0.0.1:{envoy_sc_out}/", [envoys[2], envoys[0]])}


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def p50_goal(label, rate):
    """The data-path issue's goal for a path's added p50 against Envoy's at a rate: at most 0.5x at 4,000/s; at
    1,000/s, 0.6x for the mesh and none for one hop."""
    if rate >= 4000:
        return "goal <= 0.5"
    return "goal <= 0.6" if "mesh" in label else "no goal"


def print_table(report, rates, pairs):
    """The report as text: per pair the added latency and ratio; then efficiency, memory, and the goals read against
    the better Envoy of each path."""
    out = []
    fmt = lambda s: f"{s['median']:.3f} [{s['min']:.3f}..{s['max']:.3f}]"
    for path, a, b in pairs:
        out.append(f"\n== {path}: added latency (proxied - {baseline(a)}), ms: median [min..max] over runs; "
                   f"ratio = {a}/{b} per run ==")
        out.append(f"{'rate':>6} {'pct':>6} | {'direct':>18} | {a + ' added':>24} | {b + ' added':>24} | {'ratio':>20}")
        for rate in rates:
            e = report["rates"][str(rate)][f"{a}/{b}"]
            for q in ["p50_ms", "p99_ms"]:
                row = e[q]
                out.append(f"{rate:>6} {q[:-3]:>6} | {fmt(row['direct']):>18} | {fmt(row['a_added']):>24} | "
                           f"{fmt(row['b_added']):>24} | {fmt(row['ratio_added']):>20}")
    c = report["requests_per_cpu_second"]
    out.append("\nrequests per proxy CPU-second (closed loop; a pair counts both proxies):")
    for _, a, b in pairs:
        out.append(f"  {a} {c[a]['median']:.0f} [{c[a]['min']:.0f}..{c[a]['max']:.0f}], "
                   f"{b} {c[b]['median']:.0f} [{c[b]['min']:.0f}..{c[b]['max']:.0f}], ratio {c[f'ratio {a}/{b}']:.2f}")
    r = report["rss"]
    mib = lambda k: f"{k / 1024:.1f} MiB"
    for when in ["idle", "after_latency_runs"]:
        row = ", ".join(f"{t} {mib(v['rss_kib'])} (anon {mib(v['anon_kib'])})" for t, v in r[when].items())
        out.append(f"RSS {when}: {row}")
    # The goals, against the better of the two Envoy configurations of each path.
    out.append("\ngoals, against the better Envoy (lower added p50 / more requests per CPU-second) of each path:")
    by_label = {}
    for label, a, b in pairs:
        if b.startswith(("envoy", "t-envoy")):
            by_label.setdefault((label, a), []).append(b)
    for (label, a), envoys in by_label.items():
        for rate in rates:
            added = {b: report["rates"][str(rate)][f"{a}/{b}"]["p50_ms"]["b_added"]["median"] for b in envoys}
            best = min(added, key=added.get)
            ratio = report["rates"][str(rate)][f"{a}/{best}"]["p50_ms"]["ratio_added"]["median"]
            out.append(f"  {label:<7} p50 added @{rate}/s: {a} / {best} = {ratio:.2f} ({p50_goal(label, rate)})")
        best = max(envoys, key=lambda b: c[b]["median"])
        goal = "2" if "hop" in label else "1.5"
        out.append(f"  {label:<7} requests per CPU-second: {a} / {best} = {c[f'ratio {a}/{best}']:.2f} (goal >= {goal})")
    # Memory, against the better Envoy of each path: every Ferry target after the latency runs; idle, a proxy with an
    # identity (the mesh pair's, halved).
    for (label, a), envoys in by_label.items():
        best = min(envoys, key=lambda e: r["after_latency_runs"][e]["rss_kib"])
        ratio = r["after_latency_runs"][a]["rss_kib"] / r["after_latency_runs"][best]["rss_kib"]
        out.append(f"  {label:<7} RSS after the latency runs: {a} / {best} = {ratio:.2f} (goal <= 0.3)")
        if "mesh" in label:
            out.append(f"  {label:<7} idle RSS per proxy (with an identity): {mib(r['idle'][a]['rss_kib'] / 2)} "
                       "(goal <= 8 MiB)")
    for label, m in report.get("per_request", {}).items():
        out.append(f"per request, Ferry {label} (callgrind / strace, {m['requests']} requests): "
                   f"{m['instructions']:,.0f} instructions, {m['allocations']:.1f} allocations, "
                   f"{m['syscalls']:.2f} syscalls")
    out.append(f"failed requests: {report['failed_requests']} {report['error_kinds']}")
    return "\n".join(out)


if __name__ == "__main__":
    # SIGTERM (a timeout, a wrapper stopped) unwinds like an exception: processes stopped, namespaces deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
