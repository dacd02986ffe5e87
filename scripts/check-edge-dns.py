#!/usr/bin/env python3
"""Checks, without Docker, that deploy/haproxy.cfg balances across scaled Compose replicas.

`docker compose up --scale query=3` gives the service name `query` one A record per
replica on Docker's DNS (127.0.0.11, the nameserver of every container's resolv.conf).
This script recreates exactly that on one machine, inside its own network and mount
namespaces (so nothing outside them is touched or reached):

  * a tiny DNS server on 127.0.0.1:53, bind-mounted /etc/resolv.conf pointing at it,
  * TLS backends on 127.0.0.2.. standing in for the replicas (each answers with its IP),
  * HAProxy on the real deploy/haproxy.cfg with the edge environment of docker-compose.yml
    (passed as KEY=VALUE arguments; file paths and the bind address are local ones),

then asserts: every replica gets requests; a replica removed from DNS (scale down)
leaves the rotation; a replica added to DNS (scale up) joins it.

Usage (as root): check-edge-dns.py HAPROXY_CFG WORKDIR [KEY=VALUE]...
Exit 0 on success, 1 on a failed assertion, 77 when namespaces are not available.
"""

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EDGE = "127.0.0.1:5000"


def say(msg):
    print(f"check-edge-dns: {msg}", file=sys.stderr, flush=True)


# ---- DNS ------------------------------------------------------------------------------

class Dns:
    """Answers A queries from a mutable table; NODATA for other types, NXDOMAIN for others."""

    def __init__(self, table):
        self.table = table
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        threading.Thread(target=self.serve, daemon=True).start()

    def set(self, name, addrs):
        with self.lock:
            self.table[name] = list(addrs)

    def serve(self):
        while True:
            data, peer = self.sock.recvfrom(4096)
            try:
                self.sock.sendto(self.answer(data), peer)
            except Exception as e:  # a malformed query: ignore it, like a real server
                say(f"dns: ignoring a query ({e})")

    def answer(self, q):
        qid, _flags, qdcount = struct.unpack("!HHH", q[:6])
        if qdcount != 1:
            raise ValueError("one question expected")
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode("ascii").lower())
            i += 1 + q[i]
        qtype, _qclass = struct.unpack("!HH", q[i + 1:i + 5])
        question = q[12:i + 5]
        name = ".".join(labels)
        with self.lock:
            addrs = self.table.get(name)
        if addrs is None:
            return struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question
        answers = [] if qtype != 1 else addrs
        out = struct.pack("!HHHHHH", qid, 0x8580, 1, len(answers), 0, 0) + question
        for a in answers:
            out += struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a)
        return out


# ---- backends -------------------------------------------------------------------------

def backend(ip, port, ctx):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            body = json.dumps({"backend": ip}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = reply

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # HAProxy's health checks hang up without reading the body

    srv = Server((ip, port), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# ---- the check ------------------------------------------------------------------------

def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    cfg, work = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    compose_env = dict(a.split("=", 1) for a in sys.argv[3:])

    if os.environ.get("MSGHASH_EDGE_DNS_NS") != "1":
        # Re-run ourselves in fresh network + mount namespaces.
        if os.geteuid() != 0 or not shutil.which("unshare"):
            say("needs root and unshare(1) for network/mount namespaces")
            return 77
        probe = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True)
        if probe.returncode != 0:
            say(f"cannot create namespaces here: {probe.stderr.decode().strip()}")
            return 77
        env = dict(os.environ, MSGHASH_EDGE_DNS_NS="1")
        return subprocess.run(["unshare", "--mount", "--net", sys.executable, *sys.argv],
                              env=env).returncode

    os.makedirs(work, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = os.path.join(work, "resolv.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)

    crt, key, pem = (os.path.join(work, n) for n in ("localhost.crt", "localhost.key", "edge.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    with open(pem, "w") as f:
        f.write(open(crt).read() + open(key).read())

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(crt, key)
    ingest_addr = compose_env.get("MSGHASH_INGEST_ADDR", "ingest:8081")
    query_addr = compose_env.get("MSGHASH_QUERY_ADDR", "query:8082")
    ingest_name, ingest_port = ingest_addr.rsplit(":", 1)
    query_name, query_port = query_addr.rsplit(":", 1)

    query_ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    ingest_ips = ["127.0.0.5", "127.0.0.6"]
    dns = Dns({query_name: list(query_ips), ingest_name: list(ingest_ips)})
    for ip in query_ips + ["127.0.0.7"]:
        backend(ip, int(query_port), sctx)
    for ip in ingest_ips:
        backend(ip, int(ingest_port), sctx)

    env = dict(os.environ)
    env.update(compose_env)
    env.update(MSGHASH_EDGE_BIND=EDGE, MSGHASH_EDGE_PEM=pem, MSGHASH_BACKEND_CA=crt)
    say("edge environment: " + " ".join(
        f"{k}={env[k]}" for k in sorted(env) if k.startswith("MSGHASH_")))
    log = open(os.path.join(work, "haproxy.log"), "w")
    proxy = subprocess.Popen(["haproxy", "-db", "-f", cfg], env=env, stdout=log, stderr=log)

    cctx = ssl.create_default_context(cafile=crt)

    def hit(method):
        req = urllib.request.Request(f"https://localhost:{EDGE.split(':')[1]}/messages",
                                     method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=cctx, timeout=3) as r:
                return json.load(r)["backend"]
        except Exception as e:
            return f"error: {e}"

    def until(what, method, want, secs=30, stable=20):
        """Polls until `stable` consecutive requests land exactly on the set `want`."""
        deadline = time.time() + secs
        seen, streak = set(), 0
        while time.time() < deadline:
            b = hit(method)
            if b in want:
                seen.add(b)
                streak += 1
            else:
                seen, streak = set(), 0
            if streak >= stable and seen == set(want):
                say(f"ok: {what}: {method} spread over {sorted(seen)}")
                return True
            time.sleep(0.05)
        say(f"FAILED: {what}: wanted {sorted(want)}, last answer {b!r}, seen {sorted(seen)}")
        return False

    ok = False
    try:
        ok = (until("3 query replicas", "GET", set(query_ips))
              and until("2 ingest replicas", "POST", set(ingest_ips)))
        if ok:
            dns.set(query_name, query_ips[:1])
            ok = until("scaled down to 1 query replica", "GET", set(query_ips[:1]))
        if ok:
            dns.set(query_name, query_ips[:1] + ["127.0.0.7"])
            ok = until("scaled up to 2 query replicas", "GET", {query_ips[0], "127.0.0.7"})
    finally:
        proxy.terminate()
        try:
            proxy.wait(5)
        except subprocess.TimeoutExpired:
            proxy.kill()
        log.close()
    if not ok:
        say("haproxy log tail:")
        print("".join(open(os.path.join(work, "haproxy.log")).readlines()[-30:]), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
