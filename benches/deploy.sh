#!/usr/bin/env bash
# Deployment benchmarks, printed as a markdown table:
#  - rolling update of a 10-replica service (min_ready 1 s, max_surge 25%) against its lower
#    bound waves x (launch + first healthy check + min_ready);
#  - rollback to a retained release, from the command to every instance serving it;
#  - the service endpoint (proxy) against direct connections to the same single instance (wrk);
#  - one reconcile pass over 10,000 instances with the fake provider.
# Run as root: benches/deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup >/dev/null
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p imago-cli
imago="$PWD/target/release/imago"
export IMAGO_HOME="$(mktemp -d /tmp/imago-bench-deploy.XXXXXX)"
work="$(mktemp -d /tmp/imago-bench-src.XXXXXX)"
cp -r examples/web "$work/"
def="$work/web/imago.toml"
port=18301
cleanup() { "$imago" destroy web >/dev/null 2>&1 || true; "$imago" serve --stop >/dev/null 2>&1 || true; rm -rf "$work" "$IMAGO_HOME"; }
trap cleanup EXIT
now() { date +%s.%N; }

sed -i -e 's/^replicas = 3/replicas = 10/' -e 's/min_ready = "500ms"/min_ready = "1s"/' \
       -e "s/^port = 8088/port = $port/" -e 's/^max_surge = 1/max_surge = "25%"/' "$def"
"$imago" -q apply -f "$def" >/dev/null

# Rolling update v1 -> v2, three times (v2, v3, v4), median.
times=()
for v in 2 3 4; do
  sed -i "s/<h1>.*<\/h1>/<h1>version $v<\/h1>/" "$work/web/www/index.html"
  t0=$(now); "$imago" -q apply -f "$def" >/dev/null; t1=$(now)
  times+=("$(echo "$t1 - $t0" | bc)")
done
rolling=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 2p)
# Launch latency of the embedded engine (cached image), for the lower bound.
launch=0.010
waves=4   # ceil(10 / 3): max_surge 25% of 10 rounds up to 3
interval=0.2; min_ready=1.0; grace=1.0
bound=$(echo "$waves * ($launch + $interval + $min_ready)" | bc)
bound_stop=$(echo "$waves * ($launch + $interval + $min_ready + $grace)" | bc)

# Rollback to release 1, three times alternating, median.
rb=()
for to in 1 2 1; do
  t0=$(now); "$imago" -q rollback web --to "$to" >/dev/null; t1=$(now)
  rb+=("$(echo "$t1 - $t0" | bc)")
done
rollback=$(printf '%s\n' "${rb[@]}" | sort -n | sed -n 2p)

# Proxy vs direct, one instance.
sed -i -e 's/^replicas = 10/replicas = 1/' "$def"
"$imago" -q apply -f "$def" >/dev/null
addr=$("$imago" ps --json | python3 -c 'import json,sys; print([i for i in json.load(sys.stdin) if i["status"]=="running"][0]["address"])')
wrk_rps() { wrk -t2 -c16 -d5s --latency "$1" 2>/dev/null | awk '/Requests\/sec/ {print $2} /^ +50%/ {print $2}' | paste -sd' '; }
direct=(); proxied=()
for _ in 1 2 3; do
  direct+=("$(wrk_rps "http://$addr:8080/")")
  proxied+=("$(wrk_rps "http://127.0.0.1:$port/")")
done
med() { printf '%s\n' "$@" | sort -n -k2 | sed -n 2p; }
d=$(med "${direct[@]}"); p=$(med "${proxied[@]}")
d_rps=${d#* }; d_lat=${d% *}; p_rps=${p#* }; p_lat=${p% *}
ratio=$(echo "scale=2; $p_rps / $d_rps" | bc)

reconcile=$(cargo run --release -q -p imago-deploy --example reconcile_bench | tail -1 | awk -F'|' '{print $4}')

cat <<TABLE
| measurement | imago | reference | ratio |
|---|---|---|---|
| rolling update, 10 replicas, min_ready 1 s, max_surge 25% (median of 3) | ${rolling} s | lower bound ${bound} s (4 waves x (launch + first check + min_ready)); ${bound_stop} s with the 1 s stop grace of retired instances | $(echo "scale=2; $rolling / $bound" | bc)x / $(echo "scale=2; $rolling / $bound_stop" | bc)x |
| rollback to a retained release, command to all instances serving it (median of 3) | ${rollback} s | | |
| endpoint proxy, 1 instance, wrk -t2 -c16 -d5s (median of 3) | ${p_rps} req/s, p50 ${p_lat} | direct ${d_rps} req/s, p50 ${d_lat} | $ratio of direct |
| one controller pass over 10,000 instances, fake provider | ${reconcile} | target < 50 ms | |
TABLE
