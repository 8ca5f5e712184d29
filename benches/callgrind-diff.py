#!/usr/bin/env python3
"""Where two callgrind profiles differ, function by function (self cost per request).

benches/instructions.sh prints each run's profile. Set Aisle's beside the floor's (or one
build's beside another's) and this lists the functions whose own instructions differ most,
per request. That is how stop 35 found mimalloc's over-allocation path (README "Performance"):
functions the floor never calls stand out at the top.

    benches/callgrind-diff.py PROFILE_A PROFILE_B [--requests 2000] [--top 40]

Columns: A - B, A, B (instructions per request), then the function. Names are shortened
(file prefixes and Rust hash suffixes dropped), so one function built into both binaries
compares by name. Needs callgrind_annotate (valgrind).
"""

import argparse
import collections
import re
import subprocess
import sys


def self_costs(profile):
    """Instructions by function, summed over objects, from callgrind_annotate's flat list."""
    try:
        out = subprocess.run(
            ["callgrind_annotate", "--threshold=100", "--auto=no", profile],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except FileNotFoundError:
        sys.exit("callgrind_annotate not found: apt-get install -y valgrind")
    except subprocess.CalledProcessError as e:
        sys.exit(f"callgrind_annotate could not read {profile}: {e.stderr.strip()}")
    costs = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in m.group(2):
            continue
        name = m.group(2)
        name = re.sub(r"\s*\[[^\]]*\]$", "", name)  # the object file
        name = re.sub(r"^[^:]*:(?!:)", "", name, count=1)  # the source file, or ???
        name = re.sub(r"::h[0-9a-f]{16}", "", name)
        costs[name] += int(m.group(1).replace(",", ""))
    return costs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--requests", type=int, default=2000, help="requests each profile counted")
    p.add_argument("--top", type=int, default=40, help="rows each way")
    args = p.parse_args()
    a, b, n = self_costs(args.a), self_costs(args.b), args.requests
    rows = sorted(set(a) | set(b), key=lambda k: b[k] - a[k])
    total = (sum(a.values()) - sum(b.values())) / n
    print(f"A - B: {total:+.0f} instructions a request (A {sum(a.values()) / n:.0f}, "
          f"B {sum(b.values()) / n:.0f})")
    print("\nmore in A:")
    for k in rows[: args.top]:
        if a[k] > b[k]:
            print(f"{(a[k] - b[k]) / n:+9.0f} {a[k] / n:9.0f} {b[k] / n:9.0f}  {k[:140]}")
    print("\nmore in B:")
    for k in reversed(rows[-args.top:]):
        if b[k] > a[k]:
            print(f"{(a[k] - b[k]) / n:+9.0f} {a[k] / n:9.0f} {b[k] / n:9.0f}  {k[:140]}")


if __name__ == "__main__":
    main()
