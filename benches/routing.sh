#!/usr/bin/env bash
# Host routing and TLS termination of service endpoints (issue 15), printed as a markdown table.
# One busybox httpd on 127.0.0.1 is the instance; six sides take turns in every round (the
# first side rotating), each asked by `wrk -t2 -cCONNS -dDURATION`, medians of ROUNDS:
#   direct (the instance), imago's plain proxy (the `endpoint` example), imago's host router
#   without and with TLS (the `router` example: the data plane's own `Front`, one thread per
#   core), and HAProxy (mode http, `use_backend` by Host, nbthread 2 as imago's two threads)
#   without and with TLS on the same certificate (P-256, self-signed, made here).
# wrk connects to 127.0.0.1 with `Host: shop.example` (no SNI: an IP address is not sent as a
# server name, so both TLS sides serve their default certificate, the same one).
# Two rows: keep-alive as wrk asks it (busybox closes every connection after its answer; the
# host router and HAProxy keep the client's connection open and reconnect only to the backend,
# the plain proxy, a TCP relay, closes the client's with it), and
# `Connection: close` (every side pays a new connection, and the TLS sides a handshake, per
# request).
# ROUTER_BEFORE=PATH adds two sides: that `router` binary (another build of the example, e.g. from
# before a change) without and with TLS, in the same rounds.
# Run: [ROUNDS=N] [CONNS=N] [DURATION=5s] [BENCH_PORT=18401] [ROUTER_BEFORE=PATH] [PROFILE=release]
# benches/routing.sh (a debug build unless PROFILE=release)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-3}"; conns="${CONNS:-8}"; duration="${DURATION:-5s}"
port="${BENCH_PORT:-18401}"
for tool in wrk haproxy openssl busybox bc; do
  command -v "$tool" >/dev/null || { echo "benches/routing.sh: $tool is missing" >&2; exit 1; }
done
if [ "${PROFILE:-debug}" = release ]; then
  cargo build -q --release -p imago-deploy --example router --example endpoint
  bin="$PWD/target/release/examples"
else
  cargo build -q --workspace --example router --example endpoint
  bin="$PWD/target/debug/examples"
fi
work="$(mktemp -d /tmp/imago-bench-routing.XXXXXX)"
pids=""
cleanup() {
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/www"
echo "<h1>shop</h1>" > "$work/www/index.html"
busybox httpd -f -p "127.0.0.1:$port" -h "$work/www" & pids="$pids $!"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$work/shop.key" -out "$work/shop.pem" -subj /CN=shop.example \
  -addext subjectAltName=DNS:shop.example 2>/dev/null
cat "$work/shop.pem" "$work/shop.key" > "$work/haproxy.pem"
backend="127.0.0.1:$port"
"$bin/endpoint" "127.0.0.1:$((port + 1))" "$backend" & pids="$pids $!"
"$bin/router" "127.0.0.1:$((port + 2))" "$backend" shop.example & pids="$pids $!"
"$bin/router" "127.0.0.1:$((port + 3))" "$backend" shop.example "$work/shop.pem" "$work/shop.key" & pids="$pids $!"
cat > "$work/haproxy.cfg" <<CFG
global
  nbthread 2
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend plain
  bind 127.0.0.1:$((port + 4))
  use_backend web if { hdr(host) -i shop.example }
frontend tls
  bind 127.0.0.1:$((port + 5)) ssl crt $work/haproxy.pem alpn http/1.1
  use_backend web if { hdr(host) -i shop.example }
backend web
  server s1 $backend
CFG
haproxy -q -f "$work/haproxy.cfg" -db & pids="$pids $!"
sides=(direct proxy router router_tls haproxy haproxy_tls)
header="| workload | direct | imago proxy (plain) | imago host router | imago host router + TLS | HAProxy http, by host | HAProxy http + TLS"
if [ -n "${ROUTER_BEFORE:-}" ]; then
  "$ROUTER_BEFORE" "127.0.0.1:$((port + 6))" "$backend" shop.example & pids="$pids $!"
  "$ROUTER_BEFORE" "127.0.0.1:$((port + 7))" "$backend" shop.example "$work/shop.pem" "$work/shop.key" & pids="$pids $!"
  sides+=(before before_tls)
  header="$header | ROUTER_BEFORE | ROUTER_BEFORE + TLS"
fi
sleep 1
url() {
  case $1 in
    direct) echo "http://$backend/" ;;
    proxy) echo "http://127.0.0.1:$((port + 1))/" ;;
    router) echo "http://127.0.0.1:$((port + 2))/" ;;
    router_tls) echo "https://127.0.0.1:$((port + 3))/" ;;
    haproxy) echo "http://127.0.0.1:$((port + 4))/" ;;
    haproxy_tls) echo "https://127.0.0.1:$((port + 5))/" ;;
    before) echo "http://127.0.0.1:$((port + 6))/" ;;
    before_tls) echo "https://127.0.0.1:$((port + 7))/" ;;
  esac
}
for side in "${sides[@]}"; do
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H 'Host: shop.example' "$(url "$side")")
  [ "$code" = 200 ] || { echo "benches/routing.sh: $side answered $code" >&2; exit 1; }
done
med() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
# run SIDE EXTRA-HEADER...: "REQ/S P50_MS"; fails loudly on errors or non-2xx answers.
run() {
  local side=$1; shift
  local out; out=$(wrk -t2 -c"$conns" -d"$duration" --latency -H 'Host: shop.example' "$@" "$(url "$side")")
  if grep -qE 'Non-2xx|Socket errors: connect [1-9]|read [1-9][0-9]* ?,|timeout [1-9]' <<<"$out"; then
    echo "benches/routing.sh: $side had errors:" >&2; echo "$out" >&2
  fi
  local rate p50
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
  echo "$rate $p50"
}
echo "Load at start: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ); ${PROFILE:-debug} build; wrk -t2 -c$conns -d$duration; $rounds rounds"
echo
echo "$header | router+TLS / HAProxy+TLS |"
echo "|$(printf -- '---|%.0s' $(seq $(( ${#sides[@]} + 2 ))))"
for row in keepalive close; do
  declare -A results=()
  extra=()
  [ "$row" = close ] && extra=(-H 'Connection: close')
  for round in $(seq "$rounds"); do
    k=$(( (round - 1) % ${#sides[@]} ))
    for side in "${sides[@]:k}" "${sides[@]:0:k}"; do
      results[$side]+="$(run "$side" "${extra[@]}")"$'\n'
    done
  done
  line="| $([ "$row" = close ] && echo 'small page, `Connection: close`' || echo 'small page, keep-alive asked (busybox closes)')"
  for side in "${sides[@]}"; do
    rate=$(grep -v '^$' <<<"${results[$side]}" | awk '{print $1}' | med)
    p50=$(grep -v '^$' <<<"${results[$side]}" | awk '{print $2}' | med)
    eval "rate_$side=$rate"
    line="$line | $(printf '%.0f' "$rate") req/s, p50 ${p50} ms"
  done
  ratio=$(echo "scale=2; $rate_router_tls / $rate_haproxy_tls" | bc)
  echo "$line | $ratio |"
  unset results
done
