"""The engine of scripts/bench (run by it, with the bench virtualenv's python).

HTTP mode (default): seeds messages through POST, then drives only reads (hits, misses, a
90/10 mix) at each concurrency level, then only writes, with wrk and bench/wrk/msghash.lua;
measures a reference (nginx answering a fixed 80-byte JSON body over TLS) with the same wrk
settings in the same run, and reports every result as a ratio to it. Samples RSS and CPU
of the local service processes around each phase. Writes bench/results/<stamp>.json and
.png and copies them to latest.*.

Replay mode (`replay`): seeds a data directory's event log with N events (the standalone
example `seed_log`), starts msghash on it and measures the embedded projector's rate from
its metrics, then runs `msghash replay` and reads events/s from its last line.

Only ratios measured in one run mean anything: the load generator, the reference and the
server share the machine's cores.
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from free_port import free_port  # scripts/lib, this file's directory, is on the path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LUA = os.path.join(ROOT, "bench", "wrk", "msghash.lua")
# The reference's answer: 80 bytes of JSON, the size of a GET hit on a seeded message.
REFERENCE_BODY = '{"message":"' + "r" * 66 + '"}'
assert len(REFERENCE_BODY) == 80
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- process sampling


class Procs:
    """The processes whose RSS and CPU are sampled: name -> pid (children included)."""

    def __init__(self):
        self.pids = {}

    def add(self, name, pid):
        self.pids[name] = int(pid)

    def add_dir(self, directory):
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".pid"):
                try:
                    with open(os.path.join(directory, entry)) as f:
                        self.add(entry[:-4], int(f.read().strip()))
                except (OSError, ValueError):
                    pass

    @staticmethod
    def _tree(pid):
        """pid and its descendants (nginx's workers)."""
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                with open(f"/proc/{p}/task/{p}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return out

    @staticmethod
    def _ticks(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0

    @staticmethod
    def _rss_kib(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def snapshot(self, only=None):
        snap = {"t": time.monotonic()}
        for name, pid in self.pids.items():
            if only is not None and name not in only:
                continue
            tree = self._tree(pid)
            snap[name] = (sum(self._ticks(p) for p in tree), sum(self._rss_kib(p) for p in tree))
        return snap

    @staticmethod
    def delta(before, after):
        wall = max(after["t"] - before["t"], 1e-9)
        out = {}
        for name, value in after.items():
            if name == "t" or name not in before:
                continue
            ticks, rss = value
            cpu = (ticks - before[name][0]) / CLK_TCK / wall * 100
            out[name] = {"rss_mib": round(rss / 1024, 1), "cpu_pct": round(cpu, 1)}
        return out


# ---------------------------------------------------------------- HTTP helpers


class Client:
    """A small keep-alive HTTPS client (stdlib) for seeding and checks."""

    def __init__(self, url, ca):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 443
        self.ctx = ssl.create_default_context(cafile=ca)
        self.local = threading.local()

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            self.local.conn = c
        return c

    def request(self, method, path, body=None):
        for attempt in range(3):
            c = self._conn()
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                c.request(method, path, body=body, headers=headers)
                r = c.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                c.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise RuntimeError("unreachable")


def seed(client, count, nonce, workers=32):
    """POSTs `count` messages of 66 characters; returns their digests (hex)."""
    messages = []
    for i in range(count):
        m = f"seed-{nonce}-{i}-"
        messages.append(m + "s" * (66 - len(m)))
    failures = []

    def post(m):
        for attempt in range(20):
            status, body = client.request("POST", "/messages", json.dumps({"message": m}))
            if status == 201:
                digest = json.loads(body)["digest"]
                if digest != hashlib.sha256(m.encode()).hexdigest():
                    failures.append(f"wrong digest for {m}")
                return digest
            if status in (429, 503):  # shed or busy: back off and retry
                time.sleep(0.05 * (attempt + 1))
                continue
            failures.append(f"POST answered {status}: {body[:200]!r}")
            return None
        failures.append("POST kept answering 503")
        return None

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = [d for d in pool.map(post, messages) if d]
    elapsed = time.monotonic() - start
    if failures:
        raise SystemExit(f"bench: seeding failed: {failures[0]} ({len(failures)} failures)")
    return digests, elapsed


def metrics_text(metrics_url, ca):
    if not metrics_url:
        return None
    u = urllib.parse.urlsplit(metrics_url)
    try:
        c = http.client.HTTPSConnection(u.hostname, u.port or 443,
                                        context=ssl.create_default_context(cafile=ca), timeout=5)
        c.request("GET", u.path or "/metrics")
        r = c.getresponse()
        body = r.read().decode("utf-8", "replace")
        c.close()
        return body if r.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None


def metric_sum(text, name):
    """Sum of a metric's samples over its labels, or None."""
    if text is None:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                pass
    return total if seen else None


def wait_projected(client, digests, metrics_url, ca, timeout=120):
    """Until the projector has applied everything: lag 0 on /metrics, or sample GETs hit."""
    start = time.monotonic()
    sample = digests[-20:] if digests else []
    while time.monotonic() - start < timeout:
        lag = metric_sum(metrics_text(metrics_url, ca), "msghash_projector_lag")
        if lag is not None:
            if lag == 0:
                return time.monotonic() - start
        elif all(client.request("GET", f"/messages/{d}")[0] == 200 for d in sample):
            return time.monotonic() - start
        time.sleep(0.2)
    say(f"the projector did not catch up within {timeout}s")
    return None


# ---------------------------------------------------------------- wrk


def run_wrk(url, conns, duration, env, timeout_s=10):
    threads = max(1, min(conns, os.cpu_count() or 1))
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s",
           "--timeout", f"{timeout_s}s", "--latency", "-s", LUA, url]
    full_env = dict(os.environ, **env)
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True,
                       timeout=duration + timeout_s + 60)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise SystemExit(f"bench: wrk gave no result (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")


# ---------------------------------------------------------------- servers


class Server:
    def __init__(self, name, cmd, env=None, log=None, cwd=None):
        self.name = name
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=cwd, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self):
        if self.log and os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-30:])
        return ""


def wait_ready(url, ca, server, timeout=60):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server is not None and not server.alive():
            raise SystemExit(f"bench: {server.name} exited before it was ready:\n{server.tail()}")
        if os.path.exists(ca):
            try:
                status, _ = Client(url, ca).request("GET", "/health/ready")
                if status == 200:
                    return
            except (OSError, http.client.HTTPException, ssl.SSLError):
                pass
        time.sleep(0.2)
    raise SystemExit(f"bench: {url} not ready within {timeout}s")


def start_msghash(binary, work, data_dir=None, extra_env=None):
    port = free_port()
    data_dir = data_dir or os.path.join(work, "data")
    # msghash's own defaults (every request line logged, to msghash.log here), as a user
    # runs it; MSGHASH_LOG, MSGHASH_LOG_SAMPLE etc. in the caller's environment still apply.
    env = dict(os.environ, **(extra_env or {}))
    cmd = [binary, "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir,
           "--cert-dir", os.path.join(work, "certs")]
    server = Server("msghash", cmd, env=env, log=os.path.join(work, "msghash.log"))
    url = f"https://localhost:{port}"
    ca = os.path.join(work, "certs", "localhost.crt")
    wait_ready(url, ca, server)
    return server, url, ca, data_dir


def start_nginx(work, cert, key):
    port = free_port()
    prefix = os.path.join(work, "nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = f"""{user}worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  client_body_temp_path {prefix}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      default_type application/json;
      return 200 '{REFERENCE_BODY}';
    }}
  }}
}}
"""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    server = Server("nginx", [nginx, "-p", prefix, "-c", path, "-g", "daemon off;"],
                    log=os.path.join(prefix, "logs", "stdout.log"))
    url = f"https://localhost:{port}"
    start = time.monotonic()
    while time.monotonic() - start < 20:
        if not server.alive():
            raise SystemExit(f"bench: nginx exited:\n{server.tail()}")
        try:
            status, body = Client(url, cert).request("GET", "/")
            if status == 200 and body == REFERENCE_BODY.encode():
                return server, url
        except (OSError, http.client.HTTPException, ssl.SSLError):
            pass
        time.sleep(0.1)
    raise SystemExit("bench: nginx did not answer")


def nginx_version():
    try:
        p = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        return (p.stderr or p.stdout).strip().split("/")[-1]
    except OSError:
        return "?"


# ---------------------------------------------------------------- output


def lower_median(rows, key):
    """The row whose `key` is the median (the lower of the two middle ones for an even count)."""
    return sorted(rows, key=key)[(len(rows) - 1) // 2]


def fmt_table(results, procs_order):
    head = ["phase", "conns", "req/s", "ref req/s", "ratio", "p50 ms", "p99 ms", "p99.9 ms",
            "errors"]
    head += [f"{n} RSS MiB/CPU%" for n in procs_order]
    rows = []
    for r in results:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        spread = [x["ratio"] for x in r.get("rounds", []) if x["ratio"] is not None]
        if spread:
            ratio += f" [{min(spread):.2f}-{max(spread):.2f}]"
        row = [r["phase"], str(r["connections"]), f"{r['req_s']:,.0f}",
               "-" if r.get("reference_req_s") is None else f"{r['reference_req_s']:,.0f}",
               ratio,
               f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['p999_ms']:.2f}",
               str(r["errors"])]
        for n in procs_order:
            p = r["processes"].get(n)
            row.append(f"{p['rss_mib']:.0f}/{p['cpu_pct']:.0f}" if p else "-")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_png(path, doc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc["results"] if r["phase"] != "reference"]
    phases = list(dict.fromkeys(r["phase"] for r in results))
    conns = sorted({r["connections"] for r in results})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(phases) * max(1, len(conns)) / 2), 5))
    width = 0.8 / max(1, len(conns))
    for j, c in enumerate(conns):
        xs, ys, labels = [], [], []
        for i, ph in enumerate(phases):
            r = next((r for r in results if r["phase"] == ph and r["connections"] == c), None)
            if r is None:
                continue
            xs.append(i + (j - (len(conns) - 1) / 2) * width)
            ys.append(r["ratio"] if r.get("ratio") is not None else 0)
            labels.append(f"{r['req_s']:,.0f}/s\np99 {r['p99_ms']:.1f}ms")
        bars = ax.bar(xs, ys, width, label=f"{c} conn")
        for b, lab in zip(bars, labels):
            ax.annotate(lab, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(phases)))
    ax.set_xticklabels(phases)
    ax.set_ylabel("req/s ÷ reference (nginx, fixed 80-byte JSON, TLS)")
    ax.set_title(f"msghash bench {doc['started']} — {doc['target']['description']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(doc, out_dir, table):
    os.makedirs(out_dir, exist_ok=True)
    stamp = doc["started"].replace(":", "").replace("-", "")
    base = os.path.join(out_dir, f"{doc['kind']}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(base + ".txt", "w") as f:
        f.write(table + "\n")
    files = [base + ".json", base + ".txt"]
    if doc["kind"] == "http":
        write_png(base + ".png", doc)
        files.append(base + ".png")
    for p in files:
        latest = os.path.join(out_dir, f"latest-{doc['kind']}" + os.path.splitext(p)[1])
        shutil.copyfile(p, latest)
    return files


def check_files(files):
    """The smoke checks: the files exist, the JSON parses, the PNG has its signature."""
    for p in files:
        if not os.path.isfile(p) or os.path.getsize(p) == 0:
            raise SystemExit(f"bench: smoke: {p} was not written")
        if p.endswith(".json"):
            with open(p) as f:
                json.load(f)
        if p.endswith(".png"):
            with open(p, "rb") as f:
                if f.read(8) != b"\x89PNG\r\n\x1a\n":
                    raise SystemExit(f"bench: smoke: {p} is not a PNG")


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg()[0]}


def targets(results, distributed):
    """The issue's targets, reported (never asserted)."""
    def find(phase, c):
        return next((r for r in results if r["phase"] == phase and r["connections"] == c), None)
    out = []

    def add(name, r, key, op, bound):
        if r is None or r.get(key) is None:
            return
        v = r[key]
        out.append({"target": name, "value": round(v, 3), "bound": f"{op} {bound}",
                    "met": v >= bound if op == ">=" else v < bound})
    if distributed:
        add("query GET hit through the edge, ratio @32", find("get-hit", 32), "ratio", ">=", 0.5)
        add("ingest POST/s @64", find("post", 64), "req_s", ">=", 15000)
    else:
        add("GET hit ratio @32", find("get-hit", 32), "ratio", ">=", 0.8)
        add("GET hit p99 ms @32", find("get-hit", 32), "p99_ms", "<", 5)
        add("POST ratio @64", find("post", 64), "ratio", ">=", 0.35)
        add("POST p99 ms @64", find("post", 64), "p99_ms", "<", 10)
    for r in results:
        if r["phase"] == "get-miss":
            add(f"GET miss p99 ms @{r['connections']}", r, "p99_ms", "<", 20)
    last = next((r for r in reversed(results) if r["phase"] != "reference"), None)
    if last:
        for name, p in last["processes"].items():
            if name != "nginx":
                out.append({"target": f"{name} RSS MiB after the load", "value": p["rss_mib"],
                            "bound": "< 64", "met": p["rss_mib"] < 64})
    return out


# ---------------------------------------------------------------- HTTP mode


def http_mode(a):
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    work = tempfile.mkdtemp(prefix="bench.")
    servers = []
    procs = Procs()
    try:
        if a.url:
            url, ca = a.url.rstrip("/"), a.ca
            description = f"{url}"
            metrics_url = a.metrics_url
            msghash_data = None
        else:
            server, url, ca, msghash_data = start_msghash(a.msghash_bin, work)
            servers.append(server)
            procs.add("msghash", server.pid)
            description = "msghash (release), fresh data dir"
            metrics_url = a.metrics_url or url + "/metrics"
            say(f"msghash (pid {server.pid}) ready at {url}")
        for spec in a.pid:
            name, _, pid = spec.partition("=")
            procs.add(name, pid)
        if a.pid_dir:
            procs.add_dir(a.pid_dir)
        service_names = list(procs.pids)

        # The reference, with a certificate of its own (openssl), on a free port.
        cert, key = os.path.join(work, "ref.crt"), os.path.join(work, "ref.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        nginx, ref_url = start_nginx(work, cert, key)
        servers.append(nginx)
        procs.add("nginx", nginx.pid)
        say(f"reference nginx {nginx_version()} (pid {nginx.pid}) ready at {ref_url}")

        client = Client(url, ca)
        nonce = f"{int(time.time())}{os.getpid()}"
        say(f"seeding {a.messages} messages (POST, 32 clients)")
        digests, seed_s = seed(client, a.messages, nonce)
        lag_wait = wait_projected(client, digests, metrics_url, ca)
        say(f"seeded in {seed_s:.1f}s ({len(digests) / seed_s:,.0f}/s); projected "
            f"{'after %.1fs more' % lag_wait if lag_wait is not None else 'NOT in time'}")
        digest_file = os.path.join(work, "digests.txt")
        with open(digest_file, "w") as f:
            f.write("\n".join(digests) + "\n")

        results = []

        def run(name, conns, env, target_url, ok, nonce_tail=""):
            only = ["nginx"] if name == "reference" else service_names
            before = procs.snapshot(only)
            # A nonce per run: each POST run writes messages no other run wrote.
            r = run_wrk(target_url, conns, a.duration,
                        dict(env, BENCH_OK=ok, BENCH_NONCE=f"{nonce}-{conns}{nonce_tail}"),
                        a.timeout)
            after = procs.snapshot(only)
            socket_errors = sum(r["socket_errors"].values())
            row = {"phase": name, "connections": conns, "req_s": r["req_s"],
                   "requests": r["requests"], "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"],
                   "p99_ms": r["p99_ms"], "p999_ms": r["p999_ms"], "max_ms": r["max_ms"],
                   "errors": r["unexpected_status"] + socket_errors,
                   "unexpected_status": r["unexpected_status"], "statuses": r["statuses"],
                   "socket_errors": r["socket_errors"],
                   "processes": Procs.delta(before, after)}
            if row["requests"] == 0:
                raise SystemExit(f"bench: phase {name} at {conns} connections made no request")
            return row

        def reference(conns, tag):
            row = run("reference", conns, {"BENCH_MODE": "fixed", "BENCH_PATH": "/"}, ref_url, "200")
            say(f"{'reference':10} c={conns:<4} {row['req_s']:>10,.0f} req/s  p99 "
                f"{row['p99_ms']:.2f} ms  errors {row['errors']}  (before {tag})")
            return row

        def measured(name, conns, env, ok, refs):
            """`--rounds` pairs: the reference, then the phase right after it, so that each
            ratio compares two runs seconds apart. The row is the round whose ratio is the
            median (lower median for an even count); the JSON keeps every round."""
            rounds = []
            for i in range(a.rounds):
                ref = reference(conns, name)
                refs.append(ref)
                row = run(name, conns, env, url, ok,
                          nonce_tail=f"-{i}" if a.rounds > 1 else "")
                row["reference_req_s"] = ref["req_s"]
                row["ratio"] = round(row["req_s"] / ref["req_s"], 3) if ref["req_s"] else None
                say(f"{name:10} c={conns:<4} {row['req_s']:>10,.0f} req/s  p99 {row['p99_ms']:.2f} ms"
                    f"  errors {row['errors']}  ratio "
                    + ("-" if row["ratio"] is None else f"{row['ratio']:.2f}")
                    + (f"  (round {i + 1}/{a.rounds})" if a.rounds > 1 else ""))
                rounds.append(row)
            chosen = dict(lower_median(rounds, lambda r: -1 if r["ratio"] is None else r["ratio"]))
            chosen["errors"] = sum(r["errors"] for r in rounds)
            if a.rounds > 1:
                chosen["rounds"] = [{k: r[k] for k in ("req_s", "reference_req_s", "ratio",
                                                       "p99_ms", "errors")} for r in rounds]
            return chosen

        def level(conns, phases):
            """The phases at one concurrency, after one `reference` row: the reference run
            with the median req/s at that level, its runs' errors summed."""
            refs = []
            rows = [measured(name, conns, env, ok, refs) for name, env, ok in phases]
            ref_row = dict(lower_median(refs, lambda r: r["req_s"]))
            ref_row["errors"] = sum(r["errors"] for r in refs)
            ref_row["runs"] = len(refs)
            results.extend([ref_row] + rows)

        get = {"BENCH_MODE": "get", "BENCH_DIGESTS": digest_file}
        for c in a.connections:
            level(c, [("get-hit", dict(get, BENCH_MISS_PCT="0"), "200"),
                      ("get-miss", dict(get, BENCH_MISS_PCT="100"), "404"),
                      ("get-mix", dict(get, BENCH_MISS_PCT="10"), "200,404")])
        lag_after_writes = None
        for c in a.write_connections:
            level(c, [("post", {"BENCH_MODE": "post"}, "201")])
            lag = metric_sum(metrics_text(metrics_url, ca), "msghash_projector_lag")
            caught = wait_projected(client, [], metrics_url, ca, timeout=300) if lag else 0.0
            lag_after_writes = {"connections": c, "lag_events": lag, "caught_up_after_s":
                                None if caught is None else round(caught, 2)}
            say(f"projector lag right after the writes: {lag}; caught up after "
                f"{lag_after_writes['caught_up_after_s']}s")
        # Resident memory once the load is over: the rows show it at the end of each phase,
        # while the projector still holds what its last batches allocated (it gives memory
        # back when it goes idle, docs/performance.md item 14).
        rss_settled = None
        if lag_after_writes and service_names:
            time.sleep(2)
            snap = procs.snapshot(service_names)
            rss_settled = {n: round(v[1] / 1024, 1) for n, v in snap.items() if n != "t"}
            say("resident 2 s after the writes were projected: "
                + ", ".join(f"{n} {v} MiB" for n, v in rss_settled.items()))

        replay = None
        if msghash_data and not a.no_replay:
            replay = run_replay(a.msghash_bin, msghash_data)
            say(f"replay: {replay.get('line')}")

        doc = {
            "kind": "http",
            "version": 1,
            "started": started,
            "machine": machine(),
            "target": {"url": url, "description": description, "started_by_bench": not a.url},
            "reference": {"server": f"nginx {nginx_version()}", "body_bytes": len(REFERENCE_BODY),
                          "tls": "TLS 1.3, ECDSA P-256", "worker_processes": "auto"},
            "settings": {"duration_s": a.duration, "rounds": a.rounds,
                         "connections": a.connections,
                         "write_connections": a.write_connections, "messages": a.messages,
                         "wrk_threads": "min(connections, cpus)", "smoke": a.smoke},
            "seed": {"messages": len(digests), "seconds": round(seed_s, 2),
                     "per_s": round(len(digests) / seed_s, 1)},
            "projector_lag_after_writes": lag_after_writes,
            "rss_mib_settled": rss_settled,
            "results": results,
            "replay": replay,
        }
        doc["targets"] = targets(results, a.distributed)
        table = fmt_table(results, service_names + ["nginx"])
        extra = []
        if replay and replay.get("events_per_s"):
            extra.append(f"replay: {replay['events']} events in {replay['seconds']}s "
                         f"({replay['events_per_s']:,.0f} events/s)")
        if lag_after_writes:
            extra.append(f"projector lag after the writes: {lag_after_writes['lag_events']} events, "
                         f"caught up after {lag_after_writes['caught_up_after_s']}s")
        if rss_settled:
            extra.append("resident 2 s after the writes were projected: "
                         + ", ".join(f"{n} {v} MiB" for n, v in rss_settled.items()))
        for t in doc["targets"]:
            extra.append(f"target {t['target']}: {t['value']} ({t['bound']}) "
                         f"{'met' if t['met'] else 'NOT met'}")
        table = table + "\n\n" + "\n".join(extra)
        print(table)
        files = save(doc, a.out, table)
        say("wrote " + ", ".join(os.path.relpath(p) for p in files))
        if a.smoke:
            check_smoke(doc, a, files)
    finally:
        for s in reversed(servers):
            s.stop()
        if a.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check_smoke(doc, a, files):
    want = {("get-hit", c) for c in a.connections} | {("get-miss", c) for c in a.connections} \
        | {("get-mix", c) for c in a.connections} | {("post", c) for c in a.write_connections}
    got = {(r["phase"], r["connections"]) for r in doc["results"] if r["requests"] > 0}
    missing = want - got
    if missing:
        raise SystemExit(f"bench: smoke: phases without results: {sorted(missing)}")
    if not a.url and not a.no_replay and not (doc["replay"] or {}).get("events_per_s"):
        raise SystemExit("bench: smoke: the replay did not report events/s")
    check_files(files)
    say("smoke: every phase ran and the files were written")


# ---------------------------------------------------------------- replay mode

REPLAY_LINE = re.compile(r"applied (\d+) events in ([0-9.]+)s \(([0-9.]+) events/s\)")


def run_replay(binary, data_dir):
    """`msghash replay` beside the msghash serving data_dir; events/s from its last line."""
    start = time.monotonic()
    p = subprocess.run([binary, "--data-dir", data_dir, "replay", "--drop-old"],
                       capture_output=True, text=True, env=dict(os.environ, MSGHASH_LOG="warn"))
    wall = time.monotonic() - start
    lines = (p.stdout + "\n" + p.stderr).strip().splitlines()
    last = next((l for l in reversed(lines) if REPLAY_LINE.search(l)), lines[-1] if lines else "")
    m = REPLAY_LINE.search(last)
    if p.returncode != 0 or not m:
        say(f"msghash replay failed (exit {p.returncode}): {last}")
        return {"line": last, "exit": p.returncode}
    return {"line": last.strip(), "events": int(m.group(1)), "seconds": float(m.group(2)),
            "events_per_s": float(m.group(3)), "wall_s": round(wall, 2)}


def replay_mode(a):
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    work = tempfile.mkdtemp(prefix="bench-replay.")
    data_dir = os.path.abspath(a.data_dir) if a.data_dir else os.path.join(work, "data")
    server = None
    try:
        seeded = None
        if a.events:
            say(f"seeding {a.events} events into {data_dir} (the event log only)")
            p = subprocess.run([a.seed_bin, data_dir, str(a.events)], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"bench: seed_log failed: {p.stderr.strip()}")
            seeded = json.loads(p.stdout.strip().splitlines()[-1])
            say(f"appended {seeded['events']} events in {seeded['seconds']}s "
                f"({seeded['events_per_s']:,.0f}/s)")
        server, url, ca, _ = start_msghash(a.msghash_bin, work, data_dir)
        say(f"msghash (pid {server.pid}) serving {data_dir} at {url}")
        procs = Procs()
        procs.add("msghash", server.pid)
        # The embedded projector's own rate: events applied per second, from the metrics,
        # while it works through what the log holds.
        metrics_url = url + "/metrics"
        projection = None
        before = procs.snapshot()
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            text = metrics_text(metrics_url, ca)
            applied = metric_sum(text, "msghash_projector_events_applied_total") or 0
            lag = metric_sum(text, "msghash_projector_lag")
            samples.append((time.monotonic(), applied))
            # The applied counter moves with every batch; the lag gauge is refreshed only
            # every 2 s, so it ends the wait only when the count is unknown.
            if (applied >= seeded["events"]) if seeded else lag == 0:
                break
            time.sleep(0.1)
        if samples and samples[-1][1] > 0:
            first = next(s for s in samples if s[1] > 0)
            moving = [s for s in samples if s[1] > first[1]]
            if moving:
                span = samples[-1][0] - samples[0][0]
                projection = {"events": int(samples[-1][1]), "seconds": round(span, 2),
                              "events_per_s": round(samples[-1][1] / max(span, 1e-9), 1),
                              "note": "from msghash start (metrics polled every 0.1 s) until "
                                      "it applied every seeded event (or, without a "
                                      "seed, until msghash_projector_lag is 0)"}
        proc_projection = Procs.delta(before, procs.snapshot())
        # Resident memory once idle: a caught-up projector gives back what its large
        # batches freed (its next poll finds little or nothing).
        time.sleep(2)
        rss_idle = {name: round(v[1] / 1024, 1)
                    for name, v in procs.snapshot().items() if name != "t"}
        before = procs.snapshot()
        replay = run_replay(a.msghash_bin, data_dir)
        proc_replay = Procs.delta(before, procs.snapshot())
        doc = {"kind": "replay", "version": 1, "started": started, "machine": machine(),
               "data_dir": data_dir, "seeded": seeded, "projection": projection,
               "projection_processes": proc_projection,
               "rss_mib_idle_after_projection": rss_idle, "replay": replay,
               "replay_processes": proc_replay}
        rows = []
        if seeded:
            rows.append(f"seed (append to the embedded log): {seeded['events']:,} events, "
                        f"{seeded['seconds']}s, {seeded['events_per_s']:,.0f} events/s")
        if projection:
            rows.append(f"embedded projection: {projection['events']:,} events, "
                        f"{projection['seconds']}s, {projection['events_per_s']:,.0f} events/s")
        rows.append(f"msghash replay: {replay.get('line')}")
        for label, p in (("during projection", proc_projection), ("during replay", proc_replay)):
            m = p.get("msghash")
            if m:
                rows.append(f"msghash {label}: RSS {m['rss_mib']} MiB, CPU {m['cpu_pct']}%")
            if label == "during projection" and "msghash" in rss_idle:
                rows.append(f"msghash idle 2 s after the projection: RSS {rss_idle['msghash']} MiB")
        table = "\n".join(rows)
        print(table)
        files = save(doc, a.out, table)
        say("wrote " + ", ".join(os.path.relpath(p) for p in files))
        if a.smoke:
            if not replay.get("events_per_s"):
                raise SystemExit("bench: smoke: the replay did not report events/s")
            check_files(files)
            say("smoke: the replay ran and the files were written")
    finally:
        if server:
            server.stop()
        if a.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- main


def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def main():
    p = argparse.ArgumentParser(prog="scripts/bench")
    p.add_argument("mode", nargs="?", default="http", choices=["http", "replay"])
    p.add_argument("--url")
    p.add_argument("--ca")
    p.add_argument("--pid", action="append", default=[])
    p.add_argument("--pid-dir")
    p.add_argument("--metrics-url")
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--connections", type=int_list, default=[1, 32, 128])
    p.add_argument("--write-connections", type=int_list, default=[1, 64])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=int, default=10)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--data-dir")
    p.add_argument("--events", type=int, default=0)
    p.add_argument("--no-replay", action="store_true")
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--msghash-bin", default=os.environ.get("BENCH_MSGHASH_BIN"))
    p.add_argument("--seed-bin", default=os.environ.get("BENCH_SEED_BIN"))
    a = p.parse_args()
    if a.smoke:
        a.duration, a.messages = 1, min(a.messages, 200)
        a.connections, a.write_connections = [4], [4]
        if a.mode == "replay" and not a.events and not a.data_dir:
            a.events = 2000
    if a.out is None:
        a.out = os.path.join(ROOT, ".run", "bench") if a.smoke else os.path.join(ROOT, "bench", "results")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.url and not a.ca:
        p.error("--url needs --ca <pem>")
    if a.mode == "http":
        http_mode(a)
    else:
        replay_mode(a)


if __name__ == "__main__":
    main()
