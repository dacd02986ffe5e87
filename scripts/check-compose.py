#!/usr/bin/env python3
"""Cross-file checks of the container deployment that no schema can make.

usage: check-compose.py [--edge-env | --cluster]   (from the repository root; needs ruamel.yaml)

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
  * Prometheus scrapes every one of them on its listen port through DNS discovery, over
    HTTPS; every service Prometheus scrapes by name exists in the file;
  * the Dockerfile builds the binaries the services run, with a toolchain no older than
    the workspace rust-version; msghash in a cargo call of its own (no feature
    unification with the services), stripped, with BuildKit cache mounts for the registry
    and target/, a HEALTHCHECK and a non-root user.
  * every container has CPU and memory limits (deploy.resources.limits).
With --edge-env, prints the edge's environment as KEY=VALUE lines instead.
With --cluster, checks docker-compose.yml merged with deploy/compose.cluster.yml as
Compose merges them (mappings merged, command/entrypoint replaced, env_file and volumes
added): 3 Kafka KRaft nodes that are each other's voters, the topic at replication 3 with
min.insync.replicas 2 in every service's effective environment, 3 ScyllaDB nodes outside
developer mode on volumes of their own, the keyspace NetworkTopologyStrategy with
replication 3, every service pointed at all nodes, several replicas of ingest, query and
projector, the host check sized for every shard, and limits on every container.
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


REPLACED = {"command", "entrypoint", "test"}
CLUSTER = "deploy/compose.cluster.yml"


def merge(base, over, key=None):
    """Compose's merge of two files' values (the subset these files use)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in REPLACED:
        if key == "volumes":   # by target path
            target = lambda v: str(v).split(":")[1] if ":" in str(v) else str(v)
            kept = [v for v in base if target(v) not in {target(o) for o in over}]
            return kept + over
        return base + [v for v in over if v not in base] if key != "env_file" else \
            [v for v in base if v not in over] + over
    return over


def read_env_file(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


def effective_env(service):
    files = service.get("env_file") or []
    files = [files] if isinstance(files, str) else files
    env = {}
    for f in files:
        env.update(read_env_file(f if isinstance(f, str) else f["path"]))
    env.update({k: v for k, v in env_map(service.get("environment")).items() if v is not None})
    return env


def flag(cmd, name):
    cmd = [str(c) for c in cmd or []]
    for i, c in enumerate(cmd):
        if c == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if c.startswith(name + "="):
            return c.split("=", 1)[1]
    return None


def check_limits(services, err):
    for name, svc in services.items():
        limits = ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        if not limits.get("cpus") or not limits.get("memory"):
            err(f"{name}: no CPU and memory limits (deploy.resources.limits), got {limits}")


def check_cluster():
    base, over = load("docker-compose.yml"), load(CLUSTER)
    merged = merge(base, over)
    services = merged["services"]
    errors = []
    err = errors.append

    for name, s in over["services"].items():
        if name not in base["services"] and "image" not in s:
            err(f"{name}: new in {CLUSTER} but has no image")
    declared = set((merged.get("volumes") or {}).keys())
    for name, s in services.items():
        for v in s.get("volumes") or []:
            src = str(v).split(":")[0]
            if not src.startswith((".", "/")) and src not in declared:
                err(f"{name}: volume {src!r} is not declared")
    check_limits(services, err)

    # Kafka: three KRaft nodes, each broker and controller, voters of each other.
    kafka = {n: effective_env(s) for n, s in services.items()
             if str(s.get("image", "")).startswith("apache/kafka")
             and "controller" in effective_env(s).get("KAFKA_PROCESS_ROLES", "")}
    if len(kafka) != 3:
        err(f"kafka: want 3 KRaft nodes, got {sorted(kafka)}")
    voters = {}
    for n, e in kafka.items():
        v = e.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "")
        voters[n] = v
        if "broker" not in e.get("KAFKA_PROCESS_ROLES", ""):
            err(f"{n}: not a broker")
        if f"{e.get('KAFKA_NODE_ID')}@{n}:9093" not in v.split(","):
            err(f"{n}: node id {e.get('KAFKA_NODE_ID')} at {n}:9093 is not among the voters {v!r}")
        if e.get("KAFKA_ADVERTISED_LISTENERS") != f"PLAINTEXT://{n}:9092":
            err(f"{n}: advertises {e.get('KAFKA_ADVERTISED_LISTENERS')!r}, not its own name")
        for k, want in (("KAFKA_DEFAULT_REPLICATION_FACTOR", "3"), ("KAFKA_MIN_INSYNC_REPLICAS", "2"),
                        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "3"),
                        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "2"),
                        ("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false")):
            if str(e.get(k)) != want:
                err(f"{n}: {k} should be {want}, got {e.get(k)!r}")
    if len(set(voters.values())) > 1:
        err(f"kafka: the nodes disagree on the voters: {voters}")
    if len({e.get("CLUSTER_ID") for e in kafka.values()}) != 1:
        err("kafka: the nodes have different CLUSTER_IDs")
    if len({e.get("KAFKA_NODE_ID") for e in kafka.values()}) != len(kafka):
        err("kafka: node ids are not distinct")

    # ScyllaDB: three nodes in production mode, on volumes of their own.
    scylla = {n: s for n, s in services.items()
              if str(s.get("image", "")).startswith("scylladb/scylla") and not s.get("entrypoint")}
    if len(scylla) != 3:
        err(f"scylla: want 3 nodes, got {sorted(scylla)}")
    data = {}
    shards = 0
    for n, s in scylla.items():
        cmd = s.get("command") or []
        if flag(cmd, "--developer-mode") != "0":
            err(f"{n}: must run with --developer-mode 0, got {cmd}")
        seeds = (flag(cmd, "--seeds") or "").split(",")
        if not all(x in scylla for x in seeds):
            err(f"{n}: seeds {seeds} are not nodes of the cluster")
        shards += int(flag(cmd, "--smp") or 0)
        mem = flag(cmd, "--memory") or ""
        m = re.fullmatch(r"(\d+)([MG])", mem)
        if not m or int(m.group(1)) * (1024 if m.group(2) == "G" else 1) < 1536:
            err(f"{n}: --memory {mem!r} is below ScyllaDB's 1.5 GB per container")
        vols = [str(v).split(":")[0] for v in s.get("volumes") or [] if ":/var/lib/scylla" in str(v)]
        data[n] = vols[0] if vols else None
    if None in data.values() or len(set(data.values())) != len(data):
        err(f"scylla: every node needs a data volume of its own, got {data}")
    host = effective_env(services.get("scylla-host-check", {}))
    if str(host.get("MSGHASH_SCYLLA_SHARDS")) != str(shards):
        err(f"scylla-host-check: MSGHASH_SCYLLA_SHARDS should be {shards} (every node's --smp), got {host.get('MSGHASH_SCYLLA_SHARDS')!r}")
    if str(host.get("MSGHASH_SCYLLA_REQUIRE_XFS")) != "1":
        err("scylla-host-check: production mode needs XFS: MSGHASH_SCYLLA_REQUIRE_XFS=1")

    # The services: replication in their effective environment, every node, replicas.
    for name in ["init-topic"] + list(SCALABLE):
        e = effective_env(services.get(name, {}))
        if e.get("MSGHASH_TOPIC_REPLICATION") != "3" or e.get("MSGHASH_TOPIC_MIN_ISR") != "2":
            err(f"{name}: topic replication {e.get('MSGHASH_TOPIC_REPLICATION')!r}, "
                f"min ISR {e.get('MSGHASH_TOPIC_MIN_ISR')!r}; want 3 and 2")
        if name == "init-topic":
            continue
        rep = e.get("MSGHASH_KEYSPACE_REPLICATION", "")
        factors = re.findall(r"'(\w+)'\s*:\s*'?(\d+)'?", rep)
        if "NetworkTopologyStrategy" not in rep or not factors or any(f != "3" for _, f in factors):
            err(f"{name}: keyspace replication should be NetworkTopologyStrategy with 3 per data centre, got {rep!r}")
        brokers = {b.split(":")[0] for b in e.get("MSGHASH_KAFKA_BROKERS", "").split(",")}
        if brokers != set(kafka):
            err(f"{name}: MSGHASH_KAFKA_BROKERS should name {sorted(kafka)}, got {sorted(brokers)}")
        if name != "ingest":
            nodes = {b.split(":")[0] for b in e.get("MSGHASH_SCYLLA_NODES", "").split(",")}
            if nodes != set(scylla):
                err(f"{name}: MSGHASH_SCYLLA_NODES should name {sorted(scylla)}, got {sorted(nodes)}")
        replicas = (services[name].get("deploy") or {}).get("replicas") or 1
        if int(replicas) < 2:
            err(f"{name}: want several replicas, got {replicas}")

    for e in errors:
        print(f"check-compose --cluster: {e}")
    print(f"check-compose --cluster: {len(services)} services ({len(kafka)} Kafka, {len(scylla)} ScyllaDB nodes), "
          f"{len(errors)} problem(s)")
    return 1 if errors else 0


def main():
    if sys.argv[1:] == ["--cluster"]:
        return check_cluster()
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
        if job.get("job_name") in SCALABLE and job.get("scheme") != "https":
            err(f"prometheus: job {job.get('job_name')} must scrape over https")
    for name, port in ports.items():
        if scraped.get(name) != port:
            err(f"prometheus: {name} must be discovered by DNS on port {port}, got {scraped.get(name)!r}")
    for job in prom.get("scrape_configs") or []:
        names = [n for sd in job.get("dns_sd_configs") or [] for n in sd.get("names") or []]
        names += [t.split(":")[0] for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
        names += [r["replacement"].split(":")[0] for r in job.get("relabel_configs") or []
                  if r.get("target_label") == "__address__"]
        aliases = {a for s in services.values() for n in ((s.get("networks") or {}).values()
                   if isinstance(s.get("networks"), dict) else []) for a in (n or {}).get("aliases") or []}
        for n in names:
            if n not in services and n not in aliases:
                err(f"prometheus: job {job.get('job_name')} scrapes {n!r}, which is no service or alias")
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
    calls = [set(re.findall(r"-p ([\w-]+)", c))
             for c in re.findall(r"cargo build --release --locked((?: -p [\w-]+)+)", dockerfile)]
    built = set().union(*calls) if calls else set()
    for binary in list(SCALABLE.values()) + ["msghash"]:
        if binary not in built:
            err(f"Dockerfile: does not build -p {binary}")
    for c in calls:
        if "msghash" in c and c & set(SCALABLE.values()):
            err("Dockerfile: msghash is built in the same cargo call as the services "
                "(feature unification links the Kafka and ScyllaDB adapters into it)")
    for what, pattern in (
            ("a HEALTHCHECK", r"^HEALTHCHECK\s+.*/health/ready"),
            ("stripped binaries (CARGO_PROFILE_RELEASE_STRIP)", r"CARGO_PROFILE_RELEASE_STRIP=(symbols|true)"),
            ("a BuildKit cache mount for the cargo registry", r"--mount=type=cache,target=/usr/local/cargo/registry"),
            ("a BuildKit cache mount for target/", r"--mount=type=cache,target=/src/target"),
            ("a non-root USER", r"^USER\s+[1-9]")):
        if not re.search(pattern, dockerfile, re.M | re.S):
            err(f"Dockerfile: no {what}")

    check_limits(services, err)

    for e in errors:
        print(f"check-compose: {e}")
    print(f"check-compose: {len(services)} services, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
