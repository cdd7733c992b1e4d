#!/usr/bin/env python3
"""Data-plane benchmark, all on loopback, to a fixed-response nginx: direct; one hop (a Ferry outbound vs an Envoy
listener); and the mesh path (client -> Ferry -> mTLS -> Ferry -> nginx vs client -> Envoy -> mTLS -> Envoy -> nginx,
TLS 1.3 with client certificates and SPIFFE URI SAN checks on both sides, HTTP/2 between the proxies).

Latency: open-loop at constant rates with oha's latency correction, runs interleaved (direct, ferry, envoy rotated),
each run's added latency (proxied - direct) and the Ferry/Envoy ratio per run; medians and spread are reported.
Efficiency: closed-loop load, requests per proxy CPU-second (utime+stime from /proc/PID/stat).
Memory: proxy RSS (and anonymous RSS) idle and after the highest-rate runs.
Pinning: proxies on CPU 1, load generator and backend on CPU 0 (when the machine has 2+ CPUs).
Writes target/bench/dataplane.json and prints a table. Traffic goes to 127.0.0.1 only; every run is bounded in time.
"""

import argparse
import json
import os
import platform
import shutil
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
            req = urllib.request.Request(url, headers=headers or {})
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
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

ENVOY_CONF = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}
"""

# The Envoy pair of the mesh path: the client side originates mTLS (TLS 1.3, client certificate, the server's SPIFFE
# ID checked), HTTP/2 upstream; the server side requires a client certificate from the mesh CA.
ENVOY_CLIENT_CONF = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: mesh}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: mesh
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: 80.backend.default.mesh
        common_tls_context:
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          alpn_protocols: ["h2"]
          tls_certificates: [{{certificate_chain: {{filename: "{dir}/client.crt"}}, private_key: {{filename: "{dir}/client.key"}}}}]
          validation_context:
            trusted_ca: {{filename: "{dir}/ca.crt"}}
            match_typed_subject_alt_names:
            - {{san_type: URI, matcher: {{exact: "spiffe://cluster.local/ns/default/sa/backend"}}}}
    load_assignment:
      cluster_name: mesh
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {peer}}}}}}}
"""

ENVOY_SERVER_CONF = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            alpn_protocols: ["h2"]
            tls_certificates: [{{certificate_chain: {{filename: "{dir}/server.crt"}}, private_key: {{filename: "{dir}/server.key"}}}}]
            validation_context:
              trusted_ca: {{filename: "{dir}/ca.crt"}}
              match_typed_subject_alt_names:
              - {{san_type: URI, matcher: {{prefix: "spiffe://cluster.local/"}}}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{uri: true}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}
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


FERRY_CONF = """apiVersion: ferry.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: default}}
spec:
  ports: [{{port: 80, protocol: http}}]
  endpoints: [{{address: "127.0.0.1:{backend}"}}]
"""


class Proc:
    def __init__(self, name, cmd, log, env=None, cpu=None):
        self.name = name
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


def run_oha(url, host, args, seconds, rate, conns, cpu):
    cmd = ["oha", "--no-tui", *oha_json_flag(), "-z", f"{seconds}s", "-c", str(conns), "-H", f"Host: {host}"]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    cmd.append(url)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--control", required=True, help="ferry-control binary (the mesh path gets identities from it)")
    ap.add_argument("--ctl", required=True, help="ferryctl binary")
    ap.add_argument("--otlp-sink", required=True, help="the otlp_sink example (receives the traced target's spans)")
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 5)))
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 30)))
    ap.add_argument("--rates", default=os.environ.get("BENCH_RATES", "1000 4000"))
    ap.add_argument("--conns", type=int, default=int(os.environ.get("BENCH_CONNS", 32)))
    ap.add_argument("--cpu-seconds", type=int, default=int(os.environ.get("BENCH_CPU_SECONDS", 10)))
    ap.add_argument("--out", default="target/bench/dataplane.json")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split()]
    two_cpus = (os.cpu_count() or 1) >= 2 and os.environ.get("BENCH_PIN", "1") != "0"
    proxy_cpu, load_cpu = (1, 0) if two_cpus else (None, None)

    work = tempfile.mkdtemp(prefix="ferry-bench-")
    backend, ferry_port, envoy_port = free_port(), free_port(), free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(dir=work, port=backend))
    with open(f"{work}/envoy.yaml", "w") as f:
        f.write(ENVOY_CONF.format(admin=free_port(), port=envoy_port, backend=backend))
    with open(f"{work}/ferry.yaml", "w") as f:
        f.write(FERRY_CONF.format(backend=backend))
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    envoy_version = subprocess.run([args.envoy, "--version"], capture_output=True, text=True).stdout.strip()

    procs = []
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
        envoy = Proc("envoy", [args.envoy, "-c", f"{work}/envoy.yaml", "--concurrency", "1", "--log-level", "warn",
                               "--disable-hot-restart"], f"{work}/envoy.log", cpu=proxy_cpu)
        procs += [ferry, envoy]
        mesh = start_mesh(args, work, backend, proxy_cpu, load_cpu, procs)
        targets = {
            "direct": (f"http://127.0.0.1:{backend}/", "backend", None),
            "ferry": (f"http://127.0.0.1:{ferry_port}/", "backend", [ferry]),
            "envoy": (f"http://127.0.0.1:{envoy_port}/", "backend", [envoy]),
            "ferry-mesh": (mesh["ferry"][0], "backend.mesh", mesh["ferry"][1]),
            "envoy-mesh": (mesh["envoy"][0], "backend.mesh", mesh["envoy"][1]),
            "ferry-policies": (mesh["policies"][0], "guarded.mesh", mesh["policies"][1]),
            "ferry-traced": (f"http://127.0.0.1:{traced_port}/", "backend", [traced]),
        }
        # (report label, a, b): latency added by a vs by b, and their CPU per request.
        pairs = [("hop", "ferry", "envoy"), ("mesh", "ferry-mesh", "envoy-mesh"),
                 ("policies", "ferry-policies", "ferry-mesh"), ("tracing", "ferry-traced", "ferry")]
        proxies = list(dict.fromkeys(t for _, a, b in pairs for t in (a, b)))
        for name, (url, host, _) in targets.items():
            wait_http(url, {"Host": host})
        time.sleep(1)
        rss_idle = {t: rss_of(targets[t][2]) for t in proxies}
        print(f"idle RSS: {rss_idle}", flush=True)

        # Warm-up (connection pools, allocator), not recorded.
        for name, (url, host, _) in targets.items():
            run_oha(url, host, args, 3, 1000, args.conns, load_cpu)

        latency = {rate: {t: [] for t in targets} for rate in rates}
        order = list(targets)
        for run in range(args.runs):
            for rate in rates:
                rotated = order[run % len(order):] + order[:run % len(order)]
                for name in rotated:
                    url, host, _ = targets[name]
                    r = run_oha(url, host, args, args.seconds, rate, args.conns, load_cpu)
                    latency[rate][name].append(r)
                    print(f"run {run + 1}/{args.runs} {rate:>5} req/s {name:<6} p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  p99.9 {r['p99.9_ms']:.3f} ms  ok {r['ok']} failed {r['failed']}",
                          flush=True)
        rss_after = {t: rss_of(targets[t][2]) for t in proxies}

        # Closed loop: requests per proxy CPU-second (the mesh path: both proxies' CPU together).
        efficiency = {t: [] for t in proxies}
        for run in range(args.runs):
            for _, *pair in pairs:
                for name in (pair if run % 2 == 0 else pair[::-1]):
                    url, host, procs_of = targets[name]
                    before = sum(cpu_seconds(p.pid) for p in procs_of)
                    r = run_oha(url, host, args, args.cpu_seconds, None, args.conns, load_cpu)
                    used = sum(cpu_seconds(p.pid) for p in procs_of) - before
                    efficiency[name].append(r["ok"] / used if used > 0 else 0.0)
                    print(f"closed loop {name:<10} {r['rps']:.0f} req/s, {used:.2f} CPU-s, "
                          f"{efficiency[name][-1]:.0f} req per CPU-s", flush=True)
        rss_end = {t: rss_of(targets[t][2]) for t in proxies}
    finally:
        for p in reversed(procs):
            p.stop()

    # Per run: added latency (proxied - direct) and the ferry/envoy ratio of added latency.
    report = {"rates": {}, "machine": {
        "cpus": os.cpu_count(), "kernel": platform.release(), "cpu": cpu_model(), "pinning": two_cpus,
    }, "envoy_version": envoy_version, "runs": args.runs, "seconds": args.seconds, "conns": args.conns}
    failures = 0
    for rate in rates:
        entry = {}
        for label, a, b in pairs:
            path = {"a": a, "b": b}
            for q in ["p50_ms", "p90_ms", "p99_ms", "p99.9_ms"]:
                direct = [r[q] for r in latency[rate]["direct"]]
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
            entry[label] = path
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
    report["failed_requests"] = failures
    report["error_kinds"] = sorted({k for rate in rates for t in targets for r in latency[rate][t] for k in r["errors"]})
    report["raw"] = {str(rate): latency[rate] for rate in rates}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report, rates, pairs)
    print(f"\nwrote {args.out}; logs in {work}")
    if failures:
        print(f"WARNING: {failures} requests failed", file=sys.stderr)


def rss_of(procs):
    """Summed VmRSS / RssAnon of a target's proxy processes."""
    total = {"rss_kib": 0, "anon_kib": 0}
    for p in procs:
        for k, v in rss_kib(p.pid).items():
            total[k] += v
    return total


def start_mesh(args, work, backend, proxy_cpu, load_cpu, procs):
    """The mesh path's two pairs. Ferry: ferry-control (identities, the Service) and two proxies, each with a
    certificate from the CSR service; the server-side proxy registers as the endpoint of Service backend. Envoy: two
    Envoys with static certificates. Returns {name: (url, [proxy processes])}."""
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
    ctl("apply", "-f", "-", stdin=MESH_SERVICE + "---\n" + MESH_POLICIES)
    base = {"FERRY_CONTROL_ADDR": f"127.0.0.1:{xds}", "FERRY_CA_ROOT": f"{cp_dir}/ca.crt", "FERRY_WORKERS": "1",
            "FERRY_ACCESS_LOG": "off", "FERRY_LOG_LEVEL": "warn"}
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
    envoy_mesh_certs(work)
    envoy_in, envoy_out = free_port(), free_port()
    with open(f"{work}/envoy-server.yaml", "w") as f:
        f.write(ENVOY_SERVER_CONF.format(admin=free_port(), port=envoy_in, backend=backend, dir=work))
    with open(f"{work}/envoy-client.yaml", "w") as f:
        f.write(ENVOY_CLIENT_CONF.format(admin=free_port(), port=envoy_out, peer=envoy_in, dir=work))
    envoys = [Proc(f"envoy-{side}", [args.envoy, "-c", f"{work}/envoy-{side}.yaml", "--concurrency", "1",
                                     "--log-level", "warn", "--disable-hot-restart", "--base-id", str(i + 10)],
                   f"{work}/envoy-{side}.log", cpu=proxy_cpu) for i, side in enumerate(["server", "client"])]
    procs += envoys
    return {"ferry": (f"http://127.0.0.1:{client_out}/", [fc, fs]),
            "envoy": (f"http://127.0.0.1:{envoy_out}/", envoys),
            "policies": (f"http://127.0.0.1:{client_out}/", [fc, fg])}


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


def print_table(report, rates, pairs):
    fmt = lambda s: f"{s['median']:.3f} [{s['min']:.3f}..{s['max']:.3f}]"
    for path, a, b in pairs:
        print(f"\n== {path}: added latency (proxied - direct), ms: median [min..max] over runs; "
              f"ratio = {a}/{b} per run ==")
        print(f"{'rate':>6} {'pct':>6} | {'direct':>18} | {a + ' added':>22} | {b + ' added':>22} | {'ratio':>20}")
        for rate in rates:
            e = report["rates"][str(rate)][path]
            for q in ["p50_ms", "p90_ms", "p99_ms", "p99.9_ms"]:
                row = e[q]
                print(f"{rate:>6} {q[:-3]:>6} | {fmt(row['direct']):>18} | {fmt(row['a_added']):>22} | "
                      f"{fmt(row['b_added']):>22} | {fmt(row['ratio_added']):>20}")
    c = report["requests_per_cpu_second"]
    print("\nrequests per proxy CPU-second (closed loop; the mesh path counts both proxies):")
    for _, a, b in pairs:
        print(f"  {a} {fmt(c[a])}, {b} {fmt(c[b])}, ratio {c[f'ratio {a}/{b}']:.2f}")
    r = report["rss"]
    mib = lambda k: f"{k / 1024:.1f} MiB"
    for when in ["idle", "after_latency_runs"]:
        row = ", ".join(f"{t} {mib(v['rss_kib'])} (anon {mib(v['anon_kib'])})" for t, v in r[when].items())
        print(f"RSS {when}: {row}")
    print(f"failed requests: {report['failed_requests']} {report['error_kinds']}")


if __name__ == "__main__":
    main()
