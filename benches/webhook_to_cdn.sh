#!/usr/bin/env bash
# Time from a signed webhook delivery to the first CDN purge request it causes.
#   benches/webhook_to_cdn.sh [N]        (needs target/release/aisle, python3, openssl, curl)
# Runs `aisle demo` with the repository's rules plus an event, a GitHub-signed webhook source and
# a generic HTTP purger pointed at a loopback BAN logger, sends N deliveries (default 30), and
# prints the p50 / p99 / max of "delivery sent -> purge received" in milliseconds.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-30}
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
mkdir -p "$dir/rules"
cp rules/*.toml "$dir/rules/"
cat >> "$dir/rules/vendors.toml" <<'TOML'

[[event]]
name = "availability_changed"
invalidates = ["availability_change", "vendor:{vendorId}"]
cdn = true
TOML
cat > "$dir/gateway.toml" <<'TOML'
[server]
listen = "127.0.0.1:18480"
admin_listen = "127.0.0.1:19480"
default_upstream = "api"
[cache]
rules_dir = "rules"
[upstreams.api]
url = "http://127.0.0.1:3000"
[upstreams.ai]
url = "http://127.0.0.1:3000"
[purge]
dir = "queue"
[cdn.http]
hosts = ["http://127.0.0.1:18499"]
[webhooks.bench]
secret = "${BENCH_WEBHOOK_SECRET}"
signature = "github"
[[webhooks.bench.map]]
type = "/event"
when = "availability_changed"
fire = { event = "availability_changed", params = { vendorId = "/data/vendor_id" } }
TOML
export BENCH_WEBHOOK_SECRET=bench-secret
python3 benches/webhook/cdn.py "$dir/arrivals" 18499 & pids+=($!)
target/release/aisle demo --config "$dir/gateway.toml" >"$dir/gateway.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:19480/healthz && break; sleep 0.1; done
for i in $(seq 1 "$N"); do
  body="{\"event\":\"availability_changed\",\"data\":{\"vendor_id\":\"v$i\"},\"id\":\"d$i\"}"
  sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$BENCH_WEBHOOK_SECRET" | awk '{print $2}')
  echo "$(date +%s.%N) v$i" >> "$dir/sent"
  curl -s -o /dev/null -X POST -H "X-Hub-Signature-256: sha256=$sig" -H "X-GitHub-Delivery: d$i" \
    -d "$body" http://127.0.0.1:18480/_aisle/webhooks/bench
done
for _ in $(seq 1 100); do
  [[ -f $dir/arrivals && $(grep -c vendor: "$dir/arrivals") -ge $N ]] && break
  sleep 0.1
done
python3 - "$dir/sent" "$dir/arrivals" <<'PY'
import sys
sent = {l.split()[1]: float(l.split()[0]) for l in open(sys.argv[1])}
lat = []
for l in open(sys.argv[2]):
    t, keys = l.split(" ", 1)
    for k in keys.split():
        if k.startswith("vendor:") and k[7:] in sent:
            lat.append((float(t) - sent[k[7:]]) * 1000)
lat.sort()
n = len(lat)
print(f"webhook -> first CDN purge request: {n} deliveries, p50 {lat[n // 2]:.1f} ms, "
      f"p99 {lat[min(n - 1, int(n * 0.99))]:.1f} ms, max {lat[-1]:.1f} ms")
PY
