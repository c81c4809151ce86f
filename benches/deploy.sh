#!/usr/bin/env bash
# Deployment benchmarks, printed as markdown tables:
#  - rolling update of a 10-replica service (min_ready 1 s, max_surge 25%) against its lower
#    bound waves x (launch + first healthy check + min_ready), and a Docker Swarm service update
#    of the same image with the same settings in the same run (when dockerd can start);
#  - rollback to a retained release, from the command to every instance serving it;
#  - the service endpoint against direct connections to the same single instance, for a
#    small page (busybox httpd: one connection per request), a 1 MiB file, and long connections
#    to an echo backend (the pingpong example as client; it counts round trips from the moment
#    all its connections are up, because busybox nc's listen queue drops some of 16 simultaneous
#    SYNs and a 1 s SYN retransmit is no cost of the path). Four sides take turns, medians of
#    ROUNDS (default 5):
#    direct; imago's endpoint as its clients use it (the controller's default: kernel
#    connect-time balancing straight to the instance); imago's endpoint proxy alone, the
#    fallback when the kernel does not balance (the `endpoint` example: the same proxy code the
#    controller runs, in front of the same instance); and HAProxy (the peer user-space TCP
#    proxy, mode tcp, one thread per core like imago's proxy);
#  - the same four sides for a remote client (`remote`): the client runs in a network namespace
#    this script creates (a veth pair, 10.230.0.1 here and 10.230.0.2 there), the services have
#    `bind = "0.0.0.0:PORT"`, and imago's endpoint is what a remote client gets by default, the
#    kernel's forwarding (nftables DNAT); direct is the instance's own address, routed by this
#    host, asked from a second remote host (10.230.0.6, its own namespace and veth pair: see
#    remote_setup for why); the proxy alone and HAProxy listen on 0.0.0.0 too;
#  - one reconcile pass over 10,000 instances with the fake provider.
# Run as root: [ROUNDS=N] [PROXY_ROWS=small|echo|all] [PROFILE=release|debug] [BENCH_PORT=18301]
#   [BIN_DIR=DIR] [DIRECT_FROM_CLIENT=1] [SWARM=0] benches/deploy.sh [all|rolling|proxy|remote]
# (default all, which is rolling and proxy; PROXY_ROWS picks the endpoint workloads: the HTTP
# ones, the echo ones, or all; PROFILE=debug measures the debug build, when a release build would
# cost too much; BIN_DIR=DIR takes imago and the examples built already in DIR, e.g. another
# checkout's target/release, and builds nothing; DIRECT_FROM_CLIENT=1 asks the remote run's
# direct side from the remote client's own address, as this script did before: it reproduces the
# stalls that the kernel path's side then had; SWARM=0 leaves out the Docker Swarm side, for
# before/after runs of imago alone)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
rounds="${ROUNDS:-5}"
proxy_rows="${PROXY_ROWS:-all}"
scripts/setup >/dev/null
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
command -v haproxy >/dev/null || { apt-get install -y -qq haproxy >/dev/null; }
profile="${PROFILE:-release}"
case "${BIN_DIR:+prebuilt}$profile" in
  # The binaries are given; the reconcile pass bench is still built with the profile asked
  # for (it used to fall back to a debug build here, which is what the deploy script's 10,000-
  # instance pass of 31-33 ms against 14.5 ms standalone was).
  prebuilt*) if [ "$profile" = release ]; then cargo_profile=(--release); else cargo_profile=(); fi ;;
  release)
    cargo_profile=(--release)
    cargo build --release -q -p imago-cli
    cargo build --release -q -p imago-deploy --example pingpong --example endpoint
    ;;
  debug)
    cargo_profile=()
    # With the workspace's features, as the tests build it (no rebuild after `cargo test`).
    cargo build -q --workspace --bin imago --example pingpong --example endpoint
    ;;
  *) echo "benches/deploy.sh: PROFILE is release or debug, not $profile" >&2; exit 2 ;;
esac
bin_dir="${BIN_DIR:-$PWD/target/$profile}"
imago="$bin_dir/imago"
pingpong="$bin_dir/examples/pingpong"
endpoint="$bin_dir/examples/endpoint"
# The remote client's network namespace (remote mode only).
remote_ns="bench-remote-imago"
remote_host_addr=10.230.0.1
remote_veth=ibr0
direct_ns="bench-remote-direct"
direct_veth=ibr1
client=()
direct_client=()
export IMAGO_HOME="$(mktemp -d /tmp/imago-bench-deploy.XXXXXX)"
work="$(mktemp -d /tmp/imago-bench-src.XXXXXX)"
docker_dir=""
cp -r examples/web "$work/"
def="$work/web/imago.toml"
port="${BENCH_PORT:-18301}"
stop_docker() {
  [ -n "$docker_dir" ] || return 0
  DOCKER_HOST="unix://$docker_dir/docker.sock" docker swarm leave --force >/dev/null 2>&1 || true
  if [ -f "$docker_dir/dockerd.pid" ]; then
    local pid; pid=$(cat "$docker_dir/dockerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # Swarm made this bridge; nothing else on this machine uses it.
  if [ "$gwbridge_before" = no ]; then ip link delete docker_gwbridge 2>/dev/null || true; fi
  rm -rf "$docker_dir"; docker_dir=""
}
haproxy_pid=""; endpoint_pids=""
cleanup() {
  stop_docker
  if [ -n "$haproxy_pid" ]; then kill "$haproxy_pid" 2>/dev/null || true; fi
  for pid in $endpoint_pids; do kill "$pid" 2>/dev/null || true; done
  "$imago" destroy web >/dev/null 2>&1 || true
  "$imago" destroy echo >/dev/null 2>&1 || true
  "$imago" serve --stop >/dev/null 2>&1 || true
  if [ "$what" = remote ]; then
    ip netns del "$remote_ns" 2>/dev/null || true
    ip netns del "$direct_ns" 2>/dev/null || true
  fi
  rm -rf "$work" "$IMAGO_HOME"
}
gwbridge_before=$(ip link show docker_gwbridge >/dev/null 2>&1 && echo yes || echo no)
trap cleanup EXIT
now() { date +%s.%N; }
# rotate N A B C...: the words A B C... starting at the Nth (cyclically), one per line.
rotate() { local n=$1; shift; local k=$(( (n - 1) % $# )); printf '%s\n' "${@:k+1}" "${@:1:k}"; }
med() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }
# paired A B: the median over rounds of A's rate / B's rate in the same round (arrays named A and
# B, first word of each entry): robust to load that changes between rounds.
paired() {
  local -n a_=$1 b_=$2; local i
  for i in "${!a_[@]}"; do
    echo "scale=3; ${a_[$i]%% *} / ${b_[$i]%% *}" | bc 2>/dev/null || echo 0
  done | med
}

sed -i -e 's/^replicas = 3/replicas = 10/' -e 's/min_ready = "500ms"/min_ready = "1s"/' \
       -e "s/^port = 8088/port = $port/" -e 's/^max_surge = 1/max_surge = "25%"/' "$def"
"$imago" -q apply -f "$def" >/dev/null

rolling_bench() {
  # Launch latency of the embedded engine with the image's rootfs cached, on a private network
  # as the service's instances: median of 5 `imago run` (command to started, including the CLI's
  # own start-up of a few ms, so the bound errs slightly high).
  local l=() id t0 t1
  for _ in 1 2 3 4 5; do
    t0=$(now); id=$("$imago" -q run --entrypoint /bin/busybox web -- sleep 30); t1=$(now)
    l+=("$(echo "$t1 - $t0" | bc)")
    "$imago" -q rm -f "$id" >/dev/null 2>&1 || true
  done
  launch=$(printf '%s\n' "${l[@]}" | med)

  # Rolling update v1 -> v2, three times (v2, v3, v4), median. Each version is also exported
  # for Docker Swarm below.
  mkdir -p "$work/images"
  "$imago" -q export --format docker -o "$work/images/v1.tar" web >/dev/null
  local times=() v
  v1_title=$(sed -n 's/.*<h1>\(.*\)<\/h1>.*/\1/p' "$work/web/www/index.html")
  for v in 2 3 4; do
    sed -i "s/<h1>.*<\/h1>/<h1>version $v<\/h1>/" "$work/web/www/index.html"
    t0=$(now); "$imago" -q apply -f "$def" >/dev/null; t1=$(now)
    times+=("$(echo "$t1 - $t0" | bc)")
    "$imago" -q export --format docker -o "$work/images/v$v.tar" web >/dev/null
  done
  rolling=$(printf '%s\n' "${times[@]}" | med)
  waves=4   # ceil(10 / 3): max_surge 25% of 10 rounds up to 3
  interval=0.2; min_ready=1.0; grace=1.0
  bound=$(echo "$waves * ($launch + $interval + $min_ready)" | bc)
  bound_stop=$(echo "$waves * ($launch + $interval + $min_ready + $grace)" | bc)
  rolling_load=$(cut -d' ' -f1-3 /proc/loadavg)

  # Called in an || list, swarm_bench runs without errexit: each step checks itself.
  if [ "${SWARM:-1}" = 0 ]; then
    swarm="not measured: SWARM=0"
  else
    swarm_bench || { swarm="not measured: $swarm_why"; unset DOCKER_HOST; stop_docker; }
  fi

  # Rollback to release 1, three times alternating, median: from the command to the first
  # answer of the restored release, to the moment from which every new connection gets it
  # (a client on this host opens one every 5 ms throughout), and to the command's return.
  local rb=() first=() every=() to want poller
  for to in 1 2 1; do
    case $to in 1) want="$v1_title" ;; *) want="version $to" ;; esac
    answers_log "$port" "$work/answers" & poller=$!
    sleep 0.3
    t0=$(now); "$imago" -q rollback web --to "$to" >/dev/null; t1=$(now)
    sleep 0.3
    kill "$poller"; wait "$poller" 2>/dev/null || true
    rb+=("$(echo "$t1 - $t0" | bc)")
    read -r f e < <(awk -v t0="$t0" -v want="$want" '
      { t = $1; $1 = ""; v = substr($0, 2) }
      t < t0 { next }
      v == want && !f { f = t }
      v != want { last_other = t; every = "" }
      v == want && every == "" { every = t }
      END { printf "%.3f %.3f\n", f - t0, every - t0 }' "$work/answers")
    first+=("$f"); every+=("$e")
  done
  rollback=$(printf '%s\n' "${rb[@]}" | med)
  rollback_first=$(printf '%s\n' "${first[@]}" | med)
  rollback_every=$(printf '%s\n' "${every[@]}" | med)
  rollback_runs="first answer ${first[*]} s; every new connection ${every[*]} s; command ${rb[*]} s"
}

# answers_log PORT FILE: one line per new connection to 127.0.0.1:PORT every 5 ms, "TIME TITLE"
# (the page's <h1>, or "error"), until killed. Run in the background only: it execs python, so
# that `kill $!` ends the poller itself (a python child of the background subshell outlived the
# kill, kept asking, and kept writing into the next rollback's answers file).
answers_log() {
  exec python3 - "$1" "$2" <<'PY'
import socket, sys, time
port, out = int(sys.argv[1]), open(sys.argv[2], "w")
while True:
    t = time.time()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        i, j = data.find(b"<h1>"), data.find(b"</h1>")
        title = data[i + 4:j].decode() if 0 <= i < j else "?"
    except OSError:
        title = "error"
    out.write(f"{t:.4f} {title}\n")
    out.flush()
    time.sleep(0.005)
PY
}

# The same rolling update under Docker Swarm: the same image versions (imago export | docker
# load), 10 replicas, a HEALTHCHECK doing what imago's http check does (busybox wget, same
# interval, timeout and retries), update-parallelism 3 (= max_surge 25% of 10), start-first,
# no delay, 1 s monitor (= min_ready), 1 s stop grace. Its own dockerd, data and sockets under
# a scratch dir, so a dockerd the tests start is not touched. No published port: the routing
# mesh needs IPVS, which this kernel lacks.
swarm_bench() {
  swarm_why="dockerd or docker not installed"
  command -v dockerd >/dev/null && command -v docker >/dev/null || return 1
  docker_dir="$(mktemp -d /tmp/imago-bench-docker.XXXXXX)"
  export DOCKER_HOST="unix://$docker_dir/docker.sock"
  dockerd --data-root "$docker_dir/root" --exec-root "$docker_dir/exec" --pidfile "$docker_dir/dockerd.pid" \
    -H "$DOCKER_HOST" --bridge=none --iptables=false >"$docker_dir/dockerd.log" 2>&1 &
  local ok=no _
  for _ in $(seq 100); do docker version >/dev/null 2>&1 && { ok=yes; break; }; sleep 0.2; done
  swarm_why="dockerd did not start (see its log)"
  [ $ok = yes ] || return 1
  swarm_why="docker swarm init failed"
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null 2>&1 || return 1
  swarm_why="docker load of an imago export failed"
  local v
  for v in 1 2 3 4; do
    docker load -q -i "$work/images/v$v.tar" >/dev/null || return 1
    docker tag web:latest "web:v$v" || return 1
  done
  swarm_why="docker service create failed"
  docker service create -q --detach=false --no-resolve-image --name web --replicas 10 \
    --health-cmd 'wget -q -O /dev/null http://127.0.0.1:8080/ || exit 1' \
    --health-interval 200ms --health-timeout 1s --health-retries 3 \
    --update-parallelism 3 --update-order start-first --update-delay 0s --update-monitor 1s \
    --update-failure-action pause --stop-grace-period 1s web:v1 >/dev/null || return 1
  # Same three updates; `docker service update` blocks until the service converged (it then
  # watches the new tasks for the 1 s monitor time), as `imago apply` blocks until done.
  local st=() sw=() t0 t1 started completed
  swarm_why="docker service update failed"
  for v in 2 3 4; do
    t0=$(now); docker service update -q --no-resolve-image --image "web:v$v" web >/dev/null || return 1; t1=$(now)
    [ "$(docker service inspect web --format '{{.UpdateStatus.State}}')" = completed ] || return 1
    st+=("$(echo "$t1 - $t0" | bc)")
    started=$(date -d "$(docker service inspect web --format '{{json .UpdateStatus.StartedAt}}' | tr -d '"')" +%s.%N)
    completed=$(date -d "$(docker service inspect web --format '{{json .UpdateStatus.CompletedAt}}' | tr -d '"')" +%s.%N)
    sw+=("$(echo "$completed - $started" | bc)")
  done
  swarm=$(printf '%s\n' "${st[@]}" | med)
  swarm_internal=$(printf '%s\n' "${sw[@]}" | med)
  swarm_runs="${st[*]}"
  docker service rm web >/dev/null
  unset DOCKER_HOST
  stop_docker
}

# The remote host of `remote`: a network namespace with a veth pair to this one.
remote_setup() {
  ip netns del "$remote_ns" 2>/dev/null || true
  ip netns add "$remote_ns"
  ip link add "$remote_veth" type veth peer name eth0 netns "$remote_ns"
  ip addr add "$remote_host_addr/30" dev "$remote_veth"
  ip link set "$remote_veth" up
  ip -n "$remote_ns" addr add 10.230.0.2/30 dev eth0
  ip -n "$remote_ns" link set eth0 up
  ip -n "$remote_ns" link set lo up
  ip -n "$remote_ns" route add default via "$remote_host_addr"
  client=(ip netns exec "$remote_ns")
  # The direct side asks from a host of its own. From the same address, its closed flows (held
  # by conntrack for 2 minutes) share their reply tuple, instance:8080 -> client:port, with the
  # forwarded flows of a reused client port; NAT then gives such a forwarded flow a random
  # source port, which meets the instance's TIME_WAIT of another flow, and the SYN is refused
  # (PAWS) and sent again after 1 s: about one request in 25 of the forwarded side waited a
  # second (BENCHMARKS.md, issue 15). A real remote client never reaches an instance directly.
  ip netns del "$direct_ns" 2>/dev/null || true
  ip netns add "$direct_ns"
  ip link add "$direct_veth" type veth peer name eth0 netns "$direct_ns"
  ip addr add 10.230.0.5/30 dev "$direct_veth"
  ip link set "$direct_veth" up
  ip -n "$direct_ns" addr add 10.230.0.6/30 dev eth0
  ip -n "$direct_ns" link set eth0 up
  ip -n "$direct_ns" link set lo up
  ip -n "$direct_ns" route add default via 10.230.0.5
  direct_client=(ip netns exec "$direct_ns")
  if [ "${DIRECT_FROM_CLIENT:-}" = 1 ]; then direct_client=("${client[@]}"); fi
}

# Proxy vs direct, one instance per service: the web page, a 1 MiB file of the same httpd, and
# an echo service (busybox nc, one cat per connection) for one long connection. With `remote`,
# the endpoints are public and the clients run on the remote host.
proxy_bench() {
  local listen=127.0.0.1 reach=127.0.0.1 echo_endpoint="port = $((port + 1))"
  if [ "$what" = remote ]; then
    remote_setup
    listen=0.0.0.0; reach=$remote_host_addr; echo_endpoint="bind = \"0.0.0.0:$((port + 1))\""
    sed -i -e "s/^port = $port/bind = \"0.0.0.0:$port\"/" "$def"
    # An instance replaced mid-run would leave direct, HAProxy and the proxy alone pointing at a
    # gone address: a check slow to give up, for a loaded host.
    sed -i -e 's/^timeout = "1s"/timeout = "5s"/' -e 's/^unhealthy_threshold = 3/unhealthy_threshold = 10/' "$def"
  fi
  head -c 1048576 /dev/zero > "$work/web/www/big.bin"
  sed -i -e 's/^replicas = 10/replicas = 1/' "$def"
  cat >> "$def" <<TOML

[service.echo]
image = "web"
$echo_endpoint
target_port = 8080
command = ["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/busybox", "cat"]
stop_grace_period = "1s"

[service.echo.health]
type = "tcp"
interval = "200ms"
TOML
  "$imago" -q apply -f "$def" >/dev/null
  local addrs web_addr echo_addr
  addrs=$("$imago" ps --json | python3 -c '
import json, sys
running = [i for i in json.load(sys.stdin) if i["status"] == "running"]
for s in ("web", "echo"):
    i = [i for i in running if i["labels"].get("imago.service") == s][0]
    print(i["address"], i["id"])')
  read -r web_addr web_id <<<"$(echo "$addrs" | sed -n 1p)"
  read -r echo_addr _ <<<"$(echo "$addrs" | sed -n 2p)"
  # The peer: HAProxy in TCP mode in front of the same two instances, one thread per core.
  cat > "$work/haproxy.cfg" <<CFG
global
  nbthread $(nproc)
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend web
  bind $listen:$((port + 10))
  default_backend web
backend web
  server web $web_addr:8080
frontend echo
  bind $listen:$((port + 11))
  default_backend echo
backend echo
  server echo $echo_addr:8080
CFG
  haproxy -q -f "$work/haproxy.cfg" -db & haproxy_pid=$!
  sleep 0.5
  kill -0 "$haproxy_pid" 2>/dev/null || { echo "benches/deploy.sh: haproxy did not start" >&2; exit 1; }
  # imago's proxy alone, in front of the same two instances.
  "$endpoint" "$listen:$((port + 20))" "$web_addr:8080" & endpoint_pids="$endpoint_pids $!"
  "$endpoint" "$listen:$((port + 21))" "$echo_addr:8080" & endpoint_pids="$endpoint_pids $!"
  sleep 0.3
  proxy_load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  # One row per workload: label, then the client command with @ for host:port.
  # A run that could not connect at all reads as 0 (and says so).
  wrk_run() {
    local out
    out=$("${client[@]}" wrk $1 --latency "http://$2$3" 2>&1) || { echo "0 failed"; return 0; }
    echo "$out" | awk '/Requests\/sec/ {r=$2} /^ +50%/ {p=$2} /^ +99%/ {q=$2} /Transfer\/sec/ {t=$2} END {print r, p "/" q, t}'
  }
  rows=()
  # The instance's listen-queue overflows (0 if it was replaced meanwhile: an overloaded host
  # can fail its health checks).
  overflows() {
    ip netns exec "imago-$web_id" nstat -az TcpExtListenOverflows 2>/dev/null \
      | awk '/ListenOverflows/ {print $2}' | grep . || echo 0
  }
  local name args path d p i
  # busybox httpd listens with a backlog of 9: 16 concurrent connects overflow it (dropped SYNs,
  # retried after 1 s, for wrk's direct connects and the proxy's alike); 8 stay below it.
  for spec in "small page, connection per request, wrk -t2 -c16 -d5s|-t2 -c16 -d5s|/" \
              "small page, connection per request, wrk -t2 -c8 -d5s|-t2 -c8 -d5s|/" \
              "small page, one client at a time, wrk -t1 -c1 -d3s|-t1 -c1 -d3s|/" \
              "1 MiB file, connection per request, wrk -t2 -c8 -d5s|-t2 -c8 -d5s|/big.bin"; do
    [ "$proxy_rows" = echo ] && continue
    IFS='|' read -r name args path <<<"$spec"
    local overflows_before
    overflows_before=$(overflows)
    d=(); p=(); x=(); h=()
    for i in $(seq "$rounds"); do
      # Rotate which goes first, so a load change during the run hits every side alike.
      for side in $(rotate "$i" d p x h); do
        case $side in
          d) d+=("$(client=("${direct_client[@]}"); wrk_run "$args" "$web_addr:8080" "$path")") ;;
          p) p+=("$(wrk_run "$args" "$reach:$port" "$path")") ;;
          x) x+=("$(wrk_run "$args" "$reach:$((port + 20))" "$path")") ;;
          h) h+=("$(wrk_run "$args" "$reach:$((port + 10))" "$path")") ;;
        esac
      done
    done
    name="$name; the instance's listen queue overflowed $(( $(overflows) - overflows_before )) times"
    rows+=("$name|$(printf '%s\n' "${d[@]}" | med)|$(printf '%s\n' "${p[@]}" | med)|$(printf '%s\n' "${x[@]}" | med)|$(printf '%s\n' "${h[@]}" | med)|$(paired p d) / $(paired x d) / $(paired h d)")
  done
  local c
  # A connection cut by the side under test (a proxy giving up on a busy backend) reads as 0.
  pp() {
    local out
    out=$("${client[@]}" "$pingpong" "$1" 3 64 "$2" 2>/dev/null) || { echo "0 cut"; return 0; }
    echo "$out" | awk '{print $1, $5 "us"}'
  }
  for c in 1 16; do
    [ "$proxy_rows" = small ] && continue
    d=(); p=(); x=(); h=()
    for i in $(seq "$rounds"); do
      for side in $(rotate "$i" d p x h); do
        case $side in
          d) d+=("$(client=("${direct_client[@]}"); pp "$echo_addr:8080" "$c")") ;;
          p) p+=("$(pp "$reach:$((port + 1))" "$c")") ;;
          x) x+=("$(pp "$reach:$((port + 21))" "$c")") ;;
          h) h+=("$(pp "$reach:$((port + 11))" "$c")") ;;
        esac
      done
    done
    rows+=("$c long connection(s), 64-byte echo round trips (pingpong, 3 s)|$(printf '%s\n' "${d[@]}" | med)|$(printf '%s\n' "${p[@]}" | med)|$(printf '%s\n' "${x[@]}" | med)|$(printf '%s\n' "${h[@]}" | med)|$(paired p d) / $(paired x d) / $(paired h d)")
  done
  proxy_load_after=$(cut -d' ' -f1-3 /proc/loadavg)
  if [ "$what" = remote ]; then
    # The fast path must have been taken: flows from the remote host translated to an instance.
    forwarded=$(grep -cE "src=10.230.0.2 dst=$remote_host_addr .* dport=($port|$((port + 1))) .*src=10.88." /proc/net/nf_conntrack || true)
  fi
}

rolling=""; proxy_done=""
if [ "$what" = all ] || [ "$what" = rolling ]; then rolling_bench; fi
if [ "$what" = all ] || [ "$what" = proxy ] || [ "$what" = remote ]; then proxy_bench; proxy_done=yes; fi
reconcile="not measured (remote run)"
if [ "$what" != remote ]; then
  reconcile=$(cargo run "${cargo_profile[@]}" -q -p imago-deploy --example reconcile_bench | tail -1 | awk -F'|' '{print $4}')
fi

echo "| measurement | imago | reference in the same run | ratio |"
echo "|---|---|---|---|"
if [ -n "$rolling" ]; then
  echo "| rolling update, 10 replicas, min_ready 1 s, max_surge 25% (median of 3; load $rolling_load) | ${rolling} s | lower bound ${bound} s (4 waves x (launch ${launch} s + first check + min_ready)); ${bound_stop} s with the 1 s stop grace of retired instances | $(echo "scale=2; $rolling / $bound" | bc)x / $(echo "scale=2; $rolling / $bound_stop" | bc)x |"
  case "$swarm" in
    not*) echo "| Docker Swarm service update, same image and settings | | $swarm | |" ;;
    *) echo "| same update under Docker Swarm 20.10 (\`docker service update\` to converged, median of 3: ${swarm_runs}) | ${rolling} s | ${swarm} s (swarm's own UpdateStatus start to completed: ${swarm_internal} s) | $(echo "scale=2; $rolling / $swarm" | bc)x of Swarm |" ;;
  esac
  echo "| rollback to a retained release (median of 3: ${rollback_runs}): command to the restored release's first answer / to every new connection answered by it / to the command's return (all instances replaced) | ${rollback_first} s / ${rollback_every} s / ${rollback} s | target < 1 s to every new connection | |"
fi
echo "| one controller pass over 10,000 instances, fake provider | ${reconcile} | target < 50 ms | |"
if [ -n "$proxy_done" ]; then
  echo
  if [ "$what" = remote ]; then
    echo "Endpoint for a remote client (network namespace on a veth pair), $profile build, load $proxy_load_before -> $proxy_load_after, medians of $rounds; translated flows still in conntrack at the end: $forwarded:"
    side="imago endpoint (kernel forwarding, the default for remote clients)"
  else
    echo "Endpoint, $profile build, load $proxy_load_before -> $proxy_load_after, medians of $rounds:"
    side="imago endpoint (kernel balancing, the default)"
  fi
  echo
  echo "| workload | direct | $side | imago endpoint proxy alone (the fallback) | HAProxy | ratios of the medians to direct: endpoint / proxy / HAProxy | median of the per-round ratios to direct |"
  echo "|---|---|---|---|---|---|---|"
  # The HTTP rows carry p50/p99 (a tail of 1 s SYN retransmits shows in the p99), echo rows p50.
  latency() { if [[ $1 == */* ]]; then echo "p50/p99 $1"; else echo "p50 $1"; fi; }
  for row in "${rows[@]}"; do
    IFS='|' read -r name d p x h paired_ratios <<<"$row"
    read -r d_rps d_lat d_tr <<<"$d"; read -r p_rps p_lat p_tr <<<"$p"; read -r x_rps x_lat x_tr <<<"$x"; read -r h_rps h_lat h_tr <<<"$h"
    echo "| $name | ${d_rps}/s, $(latency "$d_lat")${d_tr:+, $d_tr/s} | ${p_rps}/s, $(latency "$p_lat")${p_tr:+, $p_tr/s} | ${x_rps}/s, $(latency "$x_lat")${x_tr:+, $x_tr/s} | ${h_rps}/s, $(latency "$h_lat")${h_tr:+, $h_tr/s} | $(echo "scale=2; $p_rps / $d_rps" | bc) / $(echo "scale=2; $x_rps / $d_rps" | bc) / $(echo "scale=2; $h_rps / $d_rps" | bc) | $paired_ratios |"
  done
fi
