#!/usr/bin/env python3
"""Checks deploy/haproxy.cfg's routing without the services: fake TLS backends stand in for
ingest and query and answer with what they received.

Asserts: only POST /messages reaches ingest (any other POST, and every other method, goes
to query); GET /openapi.json reaches query as /openapi/edge.json (the whole API's
document); a 405 on /messages says `Allow: GET,HEAD,POST`; the edge's own answers (the
/metrics 404, the 503 with no replica in rotation) are JSON with the headers of every answer.

With MSGHASH_EDGE_METRICS_BIND set, HAProxy's own exporter answers GET /metrics on that
port with every haproxy_* metric that EXPORTER_METRICS (deploy/metrics-exporters.txt:
what the dashboard and the alert rules use) lists, of the listed type, while the public
port still answers /metrics 404.

Usage: check-edge-routes.py HAPROXY_CFG [EXPORTER_METRICS]
       (needs haproxy and openssl; exit 0 on success)
"""

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from free_port import free_port  # noqa: E402

COMMON = ["x-request-id", "strict-transport-security", "x-content-type-options", "cache-control"]


def backend(name, cert, key):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            # Like query: /messages is GET only there.
            status = 405 if name == "query" and self.path == "/messages" and self.command != "GET" else 200
            body = json.dumps({"backend": name, "method": self.command, "path": self.path}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            if status == 405:
                self.send_header("allow", "GET,HEAD")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return port


def edge(cfg, work, cert, ingest, query, metrics_port=None):
    port = free_port()
    extra = {"MSGHASH_EDGE_METRICS_BIND": f"127.0.0.1:{metrics_port}"} if metrics_port else {}
    env = dict(
        os.environ,
        **extra,
        MSGHASH_EDGE_BIND=f"127.0.0.1:{port}",
        MSGHASH_EDGE_PEM=os.path.join(work, "edge.pem"),
        MSGHASH_BACKEND_CA=cert,
        MSGHASH_INGEST_ADDR=f"127.0.0.1:{ingest}",
        MSGHASH_QUERY_ADDR=f"127.0.0.1:{query}",
    )
    proc = subprocess.Popen(["haproxy", "-db", "-f", cfg], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=cert)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(2.5)  # the health checks put the backends in rotation (inter 1s, rise 1)

    def call(method, path):
        c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
        c.request(method, path, body=b"{}" if method != "GET" else None,
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())

    return proc, call


def haproxy_types(port):
    """{name: type} of the `# TYPE` lines HAProxy's exporter serves."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    r = c.getresponse()
    text = r.read().decode()
    return {p[2]: p[3] for p in (line.split() for line in text.splitlines())
            if len(p) == 4 and p[:2] == ["#", "TYPE"]} if r.status == 200 else {}


def listed_haproxy(path):
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split("#", 1)[0].split()
            if parts and parts[0].startswith("haproxy_"):
                out[parts[0]] = parts[1] if len(parts) > 1 else "untyped"
    return out


def main():
    cfg = os.path.abspath(sys.argv[1])
    failures = []

    def check(what, ok):
        print(f"check-edge-routes: {'ok  ' if ok else 'FAIL'} {what}", file=sys.stderr)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as work:
        cert, key = os.path.join(work, "c.pem"), os.path.join(work, "k.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        with open(os.path.join(work, "edge.pem"), "w") as pem:
            pem.write(open(cert).read() + open(key).read())
        ingest, query = backend("ingest", cert, key), backend("query", cert, key)

        metrics_port = free_port()
        proc, call = edge(cfg, work, cert, ingest, query, metrics_port)
        try:
            for method, path, want_backend, want_path in [
                ("POST", "/messages", "ingest", "/messages"),
                ("POST", "/messages?x=1", "ingest", "/messages?x=1"),
                ("POST", "/messages/ab", "query", "/messages/ab"),
                ("POST", "/health/live", "query", "/health/live"),
                ("GET", "/messages/ab", "query", "/messages/ab"),
                ("GET", "/openapi.json", "query", "/openapi/edge.json"),
            ]:
                _, _, body = call(method, path)
                check(f"{method} {path} -> {want_backend} {want_path}",
                      (body.get("backend"), body.get("path")) == (want_backend, want_path))
            for method in ["DELETE", "PUT"]:
                status, headers, _ = call(method, "/messages")
                check(f"{method} /messages: 405 Allow GET,HEAD,POST",
                      (status, headers.get("allow")) == (405, "GET,HEAD,POST"))
            status, headers, body = call("GET", "/metrics")
            check("GET /metrics: the edge's JSON 404 with the common headers",
                  status == 404 and "err_msg" in body and all(h in headers for h in COMMON))
            if len(sys.argv) > 2:
                exported = haproxy_types(metrics_port)
                listed = listed_haproxy(sys.argv[2])
                wrong = {n: (t, exported.get(n)) for n, t in listed.items() if exported.get(n) != t}
                check(f"the exporter port serves the {len(listed)} haproxy_* metrics of "
                      f"{sys.argv[2]} with their types" + (f": not so {wrong}" if wrong else ""),
                      bool(listed) and not wrong)
        finally:
            proc.terminate()
            proc.wait()

        proc, call = edge(cfg, work, cert, ingest, 1)  # query unreachable
        try:
            status, headers, body = call("GET", "/messages")
            check("no query in rotation: JSON 503 with Retry-After and the common headers",
                  status == 503 and "err_msg" in body
                  and all(h in headers for h in COMMON + ["retry-after"]))
        finally:
            proc.terminate()
            proc.wait()

    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
