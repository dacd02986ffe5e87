#!/usr/bin/env python3
"""Checks a Grafana dashboard against the metrics the msghash services export.

usage: check-dashboard.py DASHBOARD.json METRICS.txt [METRICS.txt ...] [--datasources DIR]
                          [--rules-out FILE]

  * the dashboard is valid JSON with panels, unique panel ids and a query in every graph;
  * every metric name in every PromQL expression (panel targets and template variables) is
    listed in one of the METRICS.txt files (the services' own, the exporters'): lines `name [type]`, `#` comments; a histogram's name stands for
    its `_bucket`, `_sum` and `_count` series, and only those (the bare name is no series);
  * every listed metric is shown somewhere (the dashboard covers the whole list);
  * with --datasources, every datasource uid the dashboard names is provisioned there;
  * with --rules-out, writes every expression as a Prometheus recording rule (Grafana's
    $__rate_interval and friends replaced by durations) so `promtool check rules FILE`
    can parse them with Prometheus' own parser.

Standard library only. Exit status 0 when everything holds, 1 otherwise.
"""

import argparse
import json
import os
import re
import sys

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
TOKENS = re.compile(r"(?P<num>\.?\d[\w.]*)|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)")
GRAFANA_VARS = {
    "$__rate_interval": "1m", "${__rate_interval}": "1m",
    "$__interval": "1m", "${__interval}": "1m",
    "$__range": "1h", "${__range}": "1h",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def strip_nested(text, open_c, close_c):
    """Removes every (possibly nested) open_c ... close_c span."""
    out, depth = [], 0
    for c in text:
        if c == open_c:
            depth += 1
        elif c == close_c and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def metric_names(expr):
    """The metric names an expression selects, or raises ValueError if it cannot tell."""
    e = STRINGS.sub('""', expr)
    if "__name__" in e:
        raise ValueError("selects series by __name__, which cannot be checked")
    e = strip_nested(e, "{", "}")   # label matchers
    e = strip_nested(e, "[", "]")   # ranges and subqueries
    prev = None
    while prev != e:                # grouping labels: by (le, route), on (service), ...
        prev, e = e, GROUPING.sub(" ", e)
    names = []
    for m in TOKENS.finditer(e):
        ident = m.group("id")
        if not ident or ident.lower() in KEYWORDS:
            continue
        rest = e[m.end():].lstrip()
        if rest.startswith("("):    # a function or an aggregation
            continue
        names.append(ident)
    return names


def load_allowed(path):
    """METRICS.txt -> {series name: listed metric}."""
    allowed = {}
    listed = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2 or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", parts[0]):
                raise SystemExit(f"{path}:{n}: expected `name [type]`, got {line!r}")
            name, kind = parts[0], (parts[1] if len(parts) == 2 else "untyped")
            if kind not in ("counter", "gauge", "histogram", "summary", "untyped"):
                raise SystemExit(f"{path}:{n}: unknown type {kind!r}")
            listed.append(name)
            if kind == "histogram":
                for s in HISTOGRAM_SUFFIXES:
                    allowed[name + s] = name
            elif kind == "summary":
                allowed[name] = name
                for s in ("_sum", "_count"):
                    allowed[name + s] = name
            else:
                allowed[name] = name
    return allowed, listed


def walk_panels(panels, path="panels"):
    for i, p in enumerate(panels or []):
        where = f"{path}[{i}] {p.get('title', '')!r}"
        yield p, where
        yield from walk_panels(p.get("panels"), f"{where}.panels")


def collect_queries(dash):
    """(where, expr) for every PromQL expression in panels and template variables."""
    out = []
    for p, where in walk_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            if isinstance(t.get("expr"), str):
                out.append((f"{where} target {t.get('refId', '?')}", t["expr"]))
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if not isinstance(q, str):
            continue
        where = f"templating {v.get('name')!r}"
        m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*\w+\s*\)\s*", q)
        if m:
            out.append((where, m.group(1)))
        elif re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
            continue
        elif re.fullmatch(r"\s*query_result\((.*)\)\s*", q):
            out.append((where, re.fullmatch(r"\s*query_result\((.*)\)\s*", q).group(1)))
        else:
            out.append((where, q))
    return out


def datasource_uids(dash):
    uids = set()

    def visit(x):
        if isinstance(x, dict):
            ds = x.get("datasource")
            if isinstance(ds, dict) and isinstance(ds.get("uid"), str):
                uids.add(ds["uid"])
            for v in x.values():
                visit(v)
        elif isinstance(x, list):
            for v in x:
                visit(v)
    visit(dash)
    return uids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("dashboard")
    ap.add_argument("metrics", nargs="+")
    ap.add_argument("--datasources", help="Grafana datasource provisioning directory")
    ap.add_argument("--rules-out", help="write the expressions as a Prometheus rules file")
    args = ap.parse_args()

    errors = []
    try:
        with open(args.dashboard) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print(f"check-dashboard: {args.dashboard}: not valid JSON: {e}")
        return 1
    allowed, listed = {}, []
    for path in args.metrics:
        a, l = load_allowed(path)
        allowed.update(a)
        listed += l
    args.metrics = " or ".join(args.metrics)

    panels = list(walk_panels(dash.get("panels")))
    if not panels:
        errors.append("the dashboard has no panels")
    ids = [p.get("id") for p, _ in panels]
    if len(ids) != len(set(ids)) or None in ids:
        errors.append(f"panel ids must be present and unique, got {ids}")
    for p, where in panels:
        if p.get("type") != "row" and not p.get("targets"):
            errors.append(f"{where}: a {p.get('type')} panel without queries")
        if "gridPos" not in p:
            errors.append(f"{where}: no gridPos")

    queries = collect_queries(dash)
    used = set()
    for where, expr in queries:
        try:
            names = metric_names(expr)
        except ValueError as e:
            errors.append(f"{where}: {e}: {expr}")
            continue
        if not names:
            errors.append(f"{where}: no metric found in {expr!r}")
        for n in names:
            if n in allowed:
                used.add(allowed[n])
            else:
                errors.append(f"{where}: metric {n!r} is not exported (not in {args.metrics}): {expr}")
    for name in listed:
        if name not in used:
            errors.append(f"{name} (in {args.metrics}) is on no dashboard panel")

    if args.datasources:
        provisioned = set()
        for fn in sorted(os.listdir(args.datasources)):
            if fn.endswith((".yml", ".yaml")):
                with open(os.path.join(args.datasources, fn)) as f:
                    provisioned |= set(re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", f.read(), re.M))
        for uid in sorted(datasource_uids(dash) - provisioned):
            errors.append(f"datasource uid {uid!r} is not provisioned in {args.datasources}")

    if args.rules_out:
        with open(args.rules_out, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (where, expr) in enumerate(queries):
                for k, v in GRAFANA_VARS.items():
                    expr = expr.replace(k, v)
                f.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(expr)}\n")

    for e in errors:
        print(f"check-dashboard: {e}")
    print(f"check-dashboard: {len(queries)} expressions, {len(used)}/{len(listed)} listed metrics "
          f"used, {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
