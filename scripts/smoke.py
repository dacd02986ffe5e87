#!/usr/bin/env python3
"""A client's check of a running msghash, with nothing but Python's standard library.

    python3 scripts/smoke.py --domain localhost --port 5000 --cert-path certs/localhost.crt

POSTs "foo", GETs it back, GETs an unknown digest (404). The certificate is verified the
strict way newer Pythons do by default. Exit 0 when every check passes.
"""
import argparse
import hashlib
import json
import ssl
import sys
import urllib.error
import urllib.request


def call(ctx, method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domain", default="localhost")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--cert-path", default="certs/localhost.crt")
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.cert_path)
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    base = f"https://{a.domain}:{a.port}"
    foo = hashlib.sha256(b"foo").hexdigest()
    unknown = hashlib.sha256(b"smoke: never posted").hexdigest()
    checks = [
        (call(ctx, "POST", f"{base}/messages", {"message": "foo"}), (201, {"digest": foo})),
        (call(ctx, "GET", f"{base}/messages/{foo}"), (200, {"message": "foo"})),
        (call(ctx, "GET", f"{base}/messages/{unknown}"), (404, {"err_msg": "Message not found"})),
    ]
    failed = [(got, want) for got, want in checks if got != want]
    for got, want in failed:
        print(f"smoke: got {got}, want {want}", file=sys.stderr)
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
