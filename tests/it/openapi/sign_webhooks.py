"""Schemathesis hook for tests/it/openapi: signs webhook deliveries the way GitHub does.

A fuzzer that cannot sign only ever sees 401 from the webhook endpoint. With this hook the
deliveries it generates carry a valid `X-Hub-Signature-256` for the `tave` source (secret from
AISLE_FUZZ_WEBHOOK_SECRET), so the gateway's mapping, replay and acceptance answers are fuzzed
too. The signature covers the exact bytes schemathesis sends: its JSON serializer is
`json.dumps(body).encode("utf-8")`, used here the same way.
"""

import hashlib
import hmac
import json
import os

import schemathesis

SECRET = os.environ.get("AISLE_FUZZ_WEBHOOK_SECRET", "").encode()


@schemathesis.hook
def before_call(context, case, kwargs):
    if not SECRET or not case.path.startswith("/_aisle/webhooks/"):
        return
    if case.path_parameters.get("source") != "tave":
        return
    if case.media_type not in (None, "application/json"):
        return
    try:
        raw = json.dumps(case.body).encode("utf-8")
    except (TypeError, ValueError):
        return
    digest = hmac.new(SECRET, raw, hashlib.sha256).hexdigest()
    if case.headers is None:
        case.headers = {}
    case.headers["X-Hub-Signature-256"] = f"sha256={digest}"
