"""Schemathesis hook for tests/it/openapi: keeps warm jobs' CDN fronts on loopback.

A warm job the gateway accepts also requests each URL through every `warm_via` front. The
fuzzer writes fronts with any host (`http://a.example`), which the gateway would resolve and
call: every front of a generated `POST /admin/warm` body that has a host is pointed at the
test's loopback origin instead (AISLE_FUZZ_FRONT), keeping its scheme and whatever follows the
host. A front without a host, or not `http(s)://`, is left as generated, so what the spec calls
invalid stays invalid and what it calls valid stays valid.
"""

import os
import re

import schemathesis

FRONT = os.environ.get("AISLE_FUZZ_FRONT", "")
# Scheme, host (everything up to the path, query or fragment), the rest.
URL = re.compile(r"^([Hh][Tt][Tt][Pp][Ss]?)://([^/?#]+)(.*)$", re.S)


def loopback(front):
    if not isinstance(front, str):
        return front
    m = URL.match(front)
    if m is None:
        return front
    return FRONT.replace("http", m.group(1), 1) + m.group(3)


@schemathesis.hook("before_call")
def loopback_fronts(context, case, kwargs):
    if not FRONT or case.path != "/admin/warm" or not isinstance(case.body, dict):
        return
    fronts = case.body.get("warm_via")
    if isinstance(fronts, list):
        case.body["warm_via"] = [loopback(f) for f in fronts]
