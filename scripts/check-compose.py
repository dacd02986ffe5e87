#!/usr/bin/env python3
"""Cross-file checks of the container deployment that no schema can make.

usage: check-compose.py [--edge-env]      (from the repository root; needs ruamel.yaml)

Checks docker-compose.yml against deploy/stack.env, deploy/haproxy.cfg,
deploy/prometheus.yml, the Dockerfile and Cargo.toml:
  * every service logs with json-file and rotation (max-size, max-file); long-running
    services restart unless-stopped, one-shots (depended on with
    service_completed_successfully) do not restart; every image has a pinned tag;
  * ingest, query and projector can be scaled: no container_name, no host ports; they
    read deploy/stack.env and set none of its variables again (one source of truth);
    their healthcheck GETs https://localhost:<their MSGHASH_LISTEN port>/health/ready;
  * depends_on names existing services, and service_healthy only ones with a healthcheck;
  * the edge mounts deploy/haproxy.cfg and sets every variable it needs (no default in
    the file), its backend addresses name those services on their listen ports;
  * Prometheus scrapes every one of them on its listen port through DNS discovery;
  * the Dockerfile builds the binaries the services run, with a toolchain no older than
    the workspace rust-version.
With --edge-env, prints the edge's environment as KEY=VALUE lines instead.
"""

import re
import sys

from ruamel.yaml import YAML

SCALABLE = {"ingest": "ingest", "query": "query", "projector": "projector"}  # service: binary
STACK_ENV = "deploy/stack.env"


def load(path):
    with open(path) as f:
        return YAML(typ="safe", pure=True).load(f)


def env_map(env):
    if isinstance(env, list):
        return dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in (env or {}).items()}


def version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))


def main():
    compose = load("docker-compose.yml")
    services = compose["services"]
    edge_env = env_map(services.get("edge", {}).get("environment"))
    if sys.argv[1:] == ["--edge-env"]:
        for k, v in sorted(edge_env.items()):
            print(f"{k}={v}")
        return 0

    errors = []
    err = errors.append

    # Logging, restart policy, image tags.
    one_shots = {dep for s in services.values()
                 for dep, c in (s.get("depends_on") or {}).items()
                 if isinstance(c, dict) and c.get("condition") == "service_completed_successfully"}
    for name, s in services.items():
        log = s.get("logging") or {}
        opts = log.get("options") or {}
        if log.get("driver") != "json-file" or "max-size" not in opts or "max-file" not in opts:
            err(f"{name}: logging must be json-file with max-size and max-file, got {log}")
        want = "no" if name in one_shots else "unless-stopped"
        if str(s.get("restart")) != want:
            err(f"{name}: restart should be {want!r}, got {s.get('restart')!r}")
        image = s.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            err(f"{name}: image {image!r} has no pinned tag")
        for dep, cond in (s.get("depends_on") or {}).items() if isinstance(s.get("depends_on"), dict) else []:
            if dep not in services:
                err(f"{name}: depends on unknown service {dep!r}")
            elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                err(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

    # The shared settings file.
    stack = {}
    with open(STACK_ENV) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.fullmatch(r"(MSGHASH_[A-Z0-9_]+)=(.*)", line)
            if not m:
                err(f"{STACK_ENV}:{n}: not a MSGHASH_NAME=value line: {line!r}")
            elif "$" in m.group(2) or m.group(2)[:1] in "\"'":
                err(f"{STACK_ENV}:{n}: '$' or a leading quote is read differently by Compose and dev-stack")
            else:
                stack[m.group(1)] = m.group(2)

    # The scalable msghash services.
    ports = {}
    for name, binary in SCALABLE.items():
        s = services.get(name)
        if s is None:
            err(f"service {name} is missing")
            continue
        for key in ("container_name", "ports"):
            if key in s:
                err(f"{name}: {key} prevents `--scale {name}=N`")
        env_files = s.get("env_file")
        env_files = [env_files] if isinstance(env_files, str) else (env_files or [])
        if STACK_ENV not in [e if isinstance(e, str) else e.get("path") for e in env_files]:
            err(f"{name}: env_file must include {STACK_ENV}")
        env = env_map(s.get("environment"))
        again = sorted(set(env) & set(stack))
        if again:
            err(f"{name}: sets {', '.join(again)} again; they belong in {STACK_ENV}")
        cmd = s.get("command")
        cmd = cmd if isinstance(cmd, list) else str(cmd or "").split()
        if cmd[:1] != [binary]:
            err(f"{name}: command should run {binary}, got {cmd}")
        listen = env.get("MSGHASH_LISTEN", "")
        m = re.fullmatch(r".*:(\d+)", listen)
        if not m:
            err(f"{name}: MSGHASH_LISTEN must be set to an address:port, got {listen!r}")
            continue
        ports[name] = int(m.group(1))
        test = (s.get("healthcheck") or {}).get("test") or []
        test = " ".join(test) if isinstance(test, list) else test
        if f"https://localhost:{ports[name]}/health/ready" not in test:
            err(f"{name}: healthcheck must GET https://localhost:{ports[name]}/health/ready, got {test!r}")
        for v in ("MSGHASH_TLS_CERT", "MSGHASH_TLS_KEY"):
            if not env.get(v):
                err(f"{name}: {v} is not set")

    # The edge.
    edge = services.get("edge")
    if edge is None:
        err("service edge is missing")
    else:
        with open("deploy/haproxy.cfg") as f:
            cfg = f.read()
        # What `.if defined(X)` ... `.endif` encloses is optional (a cluster's extra
        # replicas); everything else must be set.
        required = re.sub(r"(?ms)^\.if defined\(.*?^\.endif\s*$", "", cfg)
        needed = set(re.findall(r"\$\{(MSGHASH_[A-Z0-9_]+)\}", required))
        for v in sorted(needed - set(edge_env)):
            err(f"edge: deploy/haproxy.cfg needs {v}, which the edge does not set")
        mounts = [str(v) for v in edge.get("volumes") or []]
        if not any(v.startswith("./deploy/haproxy.cfg:") for v in mounts):
            err("edge: must mount ./deploy/haproxy.cfg (the file scripts/dev-stack uses)")
        for var, svc in (("MSGHASH_INGEST_ADDR", "ingest"), ("MSGHASH_QUERY_ADDR", "query")):
            want = f"{svc}:{ports.get(svc)}"
            if edge_env.get(var) != want:
                err(f"edge: {var} should be {want}, got {edge_env.get(var)!r}")
            slots = edge_env.get(var.replace("_ADDR", "_SLOTS"), "1")
            if not slots.isdigit() or int(slots) < 2:
                err(f"edge: {var.replace('_ADDR', '_SLOTS')} must allow several replicas, got {slots!r}")

    # Prometheus.
    prom = load("deploy/prometheus.yml")
    scraped = {}
    for job in prom.get("scrape_configs") or []:
        for sd in job.get("dns_sd_configs") or []:
            for n in sd.get("names") or []:
                scraped[n] = sd.get("port")
        if job.get("scheme") != "https":
            err(f"prometheus: job {job.get('job_name')} must scrape over https")
    for name, port in ports.items():
        if scraped.get(name) != port:
            err(f"prometheus: {name} must be discovered by DNS on port {port}, got {scraped.get(name)!r}")
    if "observability" not in (services.get("prometheus", {}).get("profiles") or []):
        err("prometheus: must be in the observability profile")
    if "observability" not in (services.get("grafana", {}).get("profiles") or []):
        err("grafana: must be in the observability profile")

    # Dockerfile and toolchain.
    with open("Dockerfile") as f:
        dockerfile = f.read()
    with open("Cargo.toml") as f:
        msrv = re.search(r'^rust-version\s*=\s*"([^"]+)"', f.read(), re.M)
    rv = re.search(r"^ARG RUST_VERSION=(\S+)", dockerfile, re.M)
    if not rv:
        err("Dockerfile: no ARG RUST_VERSION=")
    elif msrv and version_tuple(rv.group(1)) < version_tuple(msrv.group(1)):
        err(f"Dockerfile: RUST_VERSION {rv.group(1)} is older than the workspace rust-version {msrv.group(1)}")
    build = re.search(r"cargo build --release --locked((?: -p [\w-]+)+)", dockerfile)
    built = set(re.findall(r"-p ([\w-]+)", build.group(1))) if build else set()
    for binary in list(SCALABLE.values()) + ["msghash"]:
        if binary not in built:
            err(f"Dockerfile: does not build -p {binary}")

    for e in errors:
        print(f"check-compose: {e}")
    print(f"check-compose: {len(services)} services, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
