#!/usr/bin/env python3
"""Checks the Kubernetes manifests beyond their schemas.

usage: check-k8s.py RENDERED.yaml     (the output of `kubectl kustomize deploy`; from the
                                       repository root; needs ruamel.yaml)

In the rendered base:
  * Deployments for ingest, query, projector and edge and no StatefulSet (Kafka and
    ScyllaDB come from their operators); every container has CPU and memory requests and
    limits, runs as non-root with a read-only root file system, no privilege escalation
    and no capabilities; no service-account token is mounted;
  * ingest, query and projector probe /health/ready (readiness) and /health/live
    (liveness) over HTTPS on their port, take their settings from the generated
    ConfigMaps (envFrom) and their certificate and key from the Secret msghash-tls;
  * every Deployment has a PodDisruptionBudget selecting its pods; ingest and query an
    HPA on their Deployment; a default-deny NetworkPolicy exists;
  * the ConfigMaps carry deploy/stack.env and deploy/cluster.env, and the edge's
    deploy/haproxy.cfg, unchanged; every variable the edge's haproxy.cfg needs is set.
In deploy/k8s/operators/: the Strimzi topic has MSGHASH_PARTITIONS partitions,
replication and min.insync.replicas as in cluster.env and compaction; the bootstrap and
client services the base points at are those the operators create for these clusters;
the ScyllaCluster's data centre is the one the keyspace replication names.
"""

import re
import sys

from ruamel.yaml import YAML

SERVICES = {"ingest": 8081, "query": 8082, "projector": 8083}


def load_all(path):
    with open(path) as f:
        return [d for d in YAML(typ="safe", pure=True).load_all(f) if d]


def env_file(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k] = v
    return out


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def main():
    docs = load_all(sys.argv[1])
    errors = []
    err = errors.append
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind.get("Deployment", {})
    configmaps = by_kind.get("ConfigMap", {})

    if by_kind.get("StatefulSet"):
        err(f"StatefulSets {sorted(by_kind['StatefulSet'])}: Kafka and ScyllaDB come from their operators")
    for name in list(SERVICES) + ["edge"]:
        if name not in deployments:
            err(f"no Deployment {name}")

    stack, cluster = env_file("deploy/stack.env"), env_file("deploy/cluster.env")
    cm_by_prefix = {re.sub(r"-[a-z0-9]{10}$", "", n): cm for n, cm in configmaps.items()}
    for prefix, want in (("msghash-config", stack), ("msghash-cluster", cluster)):
        data = (cm_by_prefix.get(prefix) or {}).get("data") or {}
        wrong = {k: (v, data.get(k)) for k, v in want.items() if data.get(k) != v}
        if wrong:
            err(f"ConfigMap {prefix}: differs from its env file: {wrong}")
    edge_cfg = ((cm_by_prefix.get("msghash-edge") or {}).get("data") or {}).get("haproxy.cfg")
    with open("deploy/haproxy.cfg") as f:
        cfg = f.read()
    if edge_cfg != cfg:
        err("ConfigMap msghash-edge: haproxy.cfg is not deploy/haproxy.cfg")

    for name, dep in deployments.items():
        spec = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        psc = spec.get("securityContext") or {}
        if not psc.get("runAsNonRoot") or not psc.get("runAsUser"):
            err(f"{name}: pod must run as a non-root uid (runAsNonRoot, runAsUser)")
        # Secret files are owned by root: a non-root uid reads them only through the
        # volume's mode (others' read bit) or, with a group-only mode, as the pod's fsGroup.
        for vol in spec.get("volumes") or []:
            secret = vol.get("secret")
            if secret is None:
                continue
            mode = secret.get("defaultMode", 0o644)
            if not mode & 0o004 and not (mode & 0o040 and psc.get("fsGroup")):
                err(f"{name}: secret volume {vol['name']} (mode {mode:o}) is unreadable by uid "
                    f"{psc.get('runAsUser')}: set the pod's fsGroup or a world-readable mode")
        if spec.get("automountServiceAccountToken") is not False:
            err(f"{name}: mounts a service-account token it does not need")
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not all((res.get(part) or {}).get(k) for k in ("cpu", "memory")):
                    err(f"{where}: no CPU and memory {part}")
            sc = c.get("securityContext") or {}
            if not sc.get("readOnlyRootFilesystem"):
                err(f"{where}: root file system is not read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                err(f"{where}: allowPrivilegeEscalation must be false")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                err(f"{where}: must drop ALL capabilities")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    err(f"{where}: no {probe}")
            if name in SERVICES:
                port = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
                if port.get("https") != SERVICES[name]:
                    err(f"{where}: port https should be {SERVICES[name]}")
                for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
                    get = (c.get(probe) or {}).get("httpGet") or {}
                    if (get.get("path"), get.get("scheme"), get.get("port")) != (path, "HTTPS", "https"):
                        err(f"{where}: {probe} should GET {path} over HTTPS on its port, got {get}")
                refs = [(e.get("configMapRef") or {}).get("name", "") for e in c.get("envFrom") or []]
                if [re.sub(r"-[a-z0-9]{10}$", "", r) for r in refs] != ["msghash-config", "msghash-cluster"]:
                    err(f"{where}: envFrom should be msghash-config then msghash-cluster, got {refs}")
                env = {e["name"]: e.get("value") for e in c.get("env") or []}
                if env.get("MSGHASH_LISTEN", "").rsplit(":", 1)[-1] != str(SERVICES[name]):
                    err(f"{where}: MSGHASH_LISTEN should be on {SERVICES[name]}")
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes") or [] if "secret" in v}
        if "msghash-tls" not in secrets.values():
            err(f"{name}: does not mount the Secret msghash-tls (certificate and key)")
        if not any(selects(p["spec"]["selector"], labels) for p in by_kind.get("PodDisruptionBudget", {}).values()):
            err(f"{name}: no PodDisruptionBudget selects its pods")

    edge = deployments.get("edge")
    if edge:
        env = {e["name"]: e.get("value") for e in edge["spec"]["template"]["spec"]["containers"][0].get("env") or []}
        required = re.sub(r"(?ms)^\.if defined\(.*?^\.endif\s*$", "", cfg)
        for v in sorted(set(re.findall(r"\$\{(MSGHASH_[A-Z0-9_]+)\}", required)) - set(env)):
            err(f"edge: deploy/haproxy.cfg needs {v}, which the edge does not set")
        for var, svc in (("MSGHASH_INGEST_ADDR", "ingest"), ("MSGHASH_QUERY_ADDR", "query")):
            want = f"{svc}.msghash.svc.cluster.local:{SERVICES[svc]}"
            if env.get(var) != want:
                err(f"edge: {var} should be {want} (fully qualified), got {env.get(var)!r}")
            svc_obj = by_kind.get("Service", {}).get(svc) or {}
            if (svc_obj.get("spec") or {}).get("clusterIP") != "None":
                err(f"Service {svc}: must be headless, so the edge resolves every pod")

    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", {}).values()
            if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"}
    for name in ("ingest", "query"):
        if name not in hpas:
            err(f"{name}: no HorizontalPodAutoscaler")
    if not any(p["spec"].get("podSelector") == {} and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress")
               for p in by_kind.get("NetworkPolicy", {}).values()):
        err("no default-deny NetworkPolicy (every pod, Ingress and Egress, nothing allowed)")

    # The operators' examples against the settings.
    ops = {}
    for f in ("deploy/k8s/operators/kafka.yaml", "deploy/k8s/operators/scylla.yaml"):
        for d in load_all(f):
            ops[(d["kind"], d["metadata"]["name"])] = d
    config = {**(cm_by_prefix.get("msghash-config") or {}).get("data", {}), **cluster}
    topic = ops.get(("KafkaTopic", config.get("MSGHASH_TOPIC")))
    if not topic:
        err(f"operators: no KafkaTopic {config.get('MSGHASH_TOPIC')!r}")
    else:
        t = topic["spec"]
        if str(t.get("partitions")) != config.get("MSGHASH_PARTITIONS"):
            err(f"KafkaTopic: {t.get('partitions')} partitions, MSGHASH_PARTITIONS is {config.get('MSGHASH_PARTITIONS')}")
        if str(t.get("replicas")) != config.get("MSGHASH_TOPIC_REPLICATION"):
            err("KafkaTopic: replicas differ from MSGHASH_TOPIC_REPLICATION")
        tc = t.get("config") or {}
        if str(tc.get("min.insync.replicas")) != config.get("MSGHASH_TOPIC_MIN_ISR"):
            err("KafkaTopic: min.insync.replicas differs from MSGHASH_TOPIC_MIN_ISR")
        if tc.get("cleanup.policy") != "compact":
            err("KafkaTopic: cleanup.policy must be compact")
        if int(tc.get("max.message.bytes", 0)) < int(config.get("MSGHASH_BODY_LIMIT", 0)) + 65536:
            err("KafkaTopic: max.message.bytes is below MSGHASH_BODY_LIMIT + 64 KiB")
    kafka = [n for (k, n) in ops if k == "Kafka"]
    brokers = config.get("MSGHASH_KAFKA_BROKERS", "")
    if not kafka or not brokers.startswith(f"{kafka[0]}-kafka-bootstrap.kafka.svc:"):
        err(f"MSGHASH_KAFKA_BROKERS {brokers!r} is not the bootstrap service of the Strimzi cluster {kafka}")
    pools = [d for (k, _), d in ops.items() if k == "KafkaNodePool"]
    if sum(p["spec"]["replicas"] for p in pools) < int(config.get("MSGHASH_TOPIC_REPLICATION", 1)):
        err("operators: fewer Kafka nodes than the topic's replication")
    scylla = [d for (k, _), d in ops.items() if k == "ScyllaCluster"]
    nodes = config.get("MSGHASH_SCYLLA_NODES", "")
    if not scylla or not nodes.startswith(f"{scylla[0]['metadata']['name']}-client.scylla.svc:"):
        err(f"MSGHASH_SCYLLA_NODES {nodes!r} is not the client service of the ScyllaCluster")
    else:
        dc = scylla[0]["spec"]["datacenter"]
        members = sum(r["members"] for r in dc["racks"])
        factors = dict(re.findall(r"'(\w+)'\s*:\s*'?(\d+)'?", config.get("MSGHASH_KEYSPACE_REPLICATION", "")))
        if factors.get(dc["name"]) is None or int(factors[dc["name"]]) > members:
            err(f"keyspace replication {config.get('MSGHASH_KEYSPACE_REPLICATION')!r} does not fit the "
                f"ScyllaCluster's data centre {dc['name']} of {members} members")
        if scylla[0]["spec"].get("developerMode"):
            err("ScyllaCluster: developerMode must be off")

    for e in errors:
        print(f"check-k8s: {e}")
    print(f"check-k8s: {len(docs)} resources ({len(deployments)} Deployments), "
          f"{len(ops)} operator resources, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
