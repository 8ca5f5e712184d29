# Sourced by the benchmark scripts that run a gateway against compare.sh's contract
# (benches/instructions.sh, benches/cpu-per-request.sh): the one copy of what they share.
#   bench_setup NAME   checks that 127.0.0.1:17480 and :17490 are free, makes $RUN
#                      (/tmp/aisle-NAME.XXXXXX) and sets the EXIT trap that stops what was started
#   bench_origin [CPU] starts the origin on 127.0.0.1:17490 (nginx; compare.sh's fixed bodies:
#                      /bench/1k/ and /bench/64k/ cacheable for an hour, /pass/ no-store), pinned
#                      to CPU when given
# The caller sets GW to the process group of the gateway it starts (setsid), so the trap stops
# it: TERM, then KILL what is left after 10 s (under valgrind, pingora's graceful shutdown, whose
# default grace period is minutes, outlived a script and kept its port).

bench_cleanup() {
  if [[ -n ${GW:-} ]] && kill -TERM -- "-$GW" 2>/dev/null; then
    for _ in $(seq 1 100); do
      kill -0 -- "-$GW" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$GW" 2>/dev/null || true
  fi
  [[ -f $RUN/nginx.pid ]] && kill "$(cat "$RUN/nginx.pid")" 2>/dev/null || true
}

bench_setup() {
  for p in 17480 17490; do
    if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "port $p is already in use" >&2; exit 2; fi
  done
  RUN=$(mktemp -d "/tmp/aisle-$1.XXXXXX"); chmod 755 "$RUN"
  GW=""
  trap bench_cleanup EXIT
}

bench_origin() {
  mkdir -p "$RUN/www" "$RUN/tmp"
  head -c 1024 /dev/zero | tr '\0' 'a' > "$RUN/www/body1k"
  head -c 65536 /dev/zero | tr '\0' 'b' > "$RUN/www/body64k"
  cat > "$RUN/nginx.conf" <<EOC
user root; worker_processes 1; pid $RUN/nginx.pid; error_log $RUN/error.log;
events { worker_connections 1024; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $RUN/tmp; proxy_temp_path $RUN/tmp; fastcgi_temp_path $RUN/tmp;
  uwsgi_temp_path $RUN/tmp; scgi_temp_path $RUN/tmp;
  server {
    listen 127.0.0.1:17490; root $RUN/www; default_type application/json;
    location /bench/1k/  { add_header Cache-Control "public, max-age=3600"; try_files /body1k =404; }
    location /bench/64k/ { add_header Cache-Control "public, max-age=3600"; try_files /body64k =404; }
    location /pass/      { add_header Cache-Control "no-store"; try_files /body1k =404; }
  }
}
EOC
  if [[ -n ${1:-} ]]; then
    taskset -c "$1" nginx -c "$RUN/nginx.conf" -e "$RUN/error.log"
  else
    nginx -c "$RUN/nginx.conf" -e "$RUN/error.log"
  fi
}
