#!/usr/bin/env python3
"""Checks the Prometheus alert rules beyond what promtool can know.

usage: check-alerts.py RULES.yml TESTS.yml METRICS.txt [METRICS.txt ...]
       (from the repository root; needs ruamel.yaml: the deploy venv's python)

  * every metric an expression selects is exported: listed in one of the METRICS.txt
    files (the services' deploy/metrics.txt, the exporters' deploy/metrics-exporters.txt),
    recorded by a rule of the file, or Prometheus' own `up`;
  * every alert has a `for`, a severity (warning or critical) and a summary;
  * the alerts the deployment promises exist (REQUIRED below: consumer lag growing,
    projector not ready, 5xx ratio, read-your-writes 503 ratio, under-replicated
    partitions, disk);
  * every alert has a unit test in TESTS.yml in which it fires (exp_alerts not empty), so
    `promtool test rules` (run next by scripts/check-deploy) covers each expression.
Exit status 0 when everything holds, 1 otherwise.
"""

import importlib.util
import os
import sys

from ruamel.yaml import YAML

REQUIRED = {
    "consumer lag growing": "MsghashProjectorLagGrowing",
    "projector not ready": "MsghashProjectorNotReady",
    "5xx ratio": "MsghashHigh5xxRatio",
    "read-your-writes 503 ratio": "MsghashReadYourWrites503Ratio",
    "broker under-replicated partitions": "KafkaUnderReplicatedPartitions",
    "disk": "DiskSpaceLow",
}
BUILTIN = {"up"}


def dashboard_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check-dashboard.py")
    spec = importlib.util.spec_from_file_location("check_dashboard", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(path):
    with open(path) as f:
        return YAML(typ="safe", pure=True).load(f)


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    rules_path, tests_path, metric_files = sys.argv[1], sys.argv[2], sys.argv[3:]
    dash = dashboard_module()
    allowed = set(BUILTIN)
    for path in metric_files:
        allowed |= set(dash.load_allowed(path)[0])
    rules = [r for g in load(rules_path)["groups"] for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = [r for r in rules if "alert" in r]
    errors = []
    err = errors.append

    for r in rules:
        name = r.get("alert") or r.get("record")
        try:
            used = dash.metric_names(r["expr"])
        except ValueError as e:
            err(f"{name}: {e}")
            continue
        for m in used:
            if m not in allowed and m not in recorded:
                err(f"{name}: metric {m!r} is exported by nothing listed in {', '.join(metric_files)}")
    for a in alerts:
        if not a.get("for"):
            err(f"{a['alert']}: no `for`: one bad scrape would page")
        if (a.get("labels") or {}).get("severity") not in ("warning", "critical"):
            err(f"{a['alert']}: severity must be warning or critical")
        if not (a.get("annotations") or {}).get("summary"):
            err(f"{a['alert']}: no summary annotation")
    names = {a["alert"] for a in alerts}
    for what, alert in REQUIRED.items():
        if alert not in names:
            err(f"no alert for {what} ({alert})")

    fired = {t["alertname"] for test in load(tests_path).get("tests") or []
             for t in test.get("alert_rule_test") or [] if t.get("exp_alerts")}
    for a in sorted(names - fired):
        err(f"{a}: no unit test in {tests_path} in which it fires")

    for e in errors:
        print(f"check-alerts: {e}")
    print(f"check-alerts: {len(alerts)} alerts, {len(recorded)} recording rules, "
          f"{len(names & fired)} alerts with a firing test, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
