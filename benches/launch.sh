#!/usr/bin/env bash
# Launch latency, `imago run` against plain runc and crun, interleaved rounds (issue 15).
#
#   benches/launch.sh [IMAGO] [ROUNDS] [-- launch.py options, e.g. --base OLD_IMAGO --env KEY=VALUE]
#
# Defaults: target/release/imago, 25 rounds (0.3 s apart, medians). Run as root, on a quiet
# host, and say whether the host is tuned: the script prints the cgroup2 mount options
# (`favordynmods` = tuned by scripts/tune-launch) and the load average before and after.
# Makes a throw-away home holding `busybox:bench` (only a static /bin/busybox) and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
imago=$(realpath "${1:-target/release/imago}")
rounds=${2:-25}
shift $(( $# > 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
for tool in runc python3 busybox; do
  command -v "$tool" >/dev/null || { echo "benches/launch.sh: $tool is missing (scripts/setup)" >&2; exit 1; }
done
command -v crun >/dev/null || echo "benches/launch.sh: no crun, its rows are left out" >&2
work=$(mktemp -d /tmp/imago-launch-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ctx"
cat >"$work/ctx/imago.toml" <<'TOML'
[image.busybox]

[[image.busybox.layer]]
name = "busybox"
copy = [{ src = "/bin/busybox", dest = "/bin/busybox", mode = "0755", outside_context = true }]
TOML
(cd "$work/ctx" && "$imago" --home "$work/home" build -q -t bench busybox >/dev/null)
echo "imago: $imago ($(stat -c %s "$imago") bytes); kernel $(uname -r)"
grep cgroup2 /proc/mounts | sed 's/^/cgroup2 mount: /'
flock /tmp/imago-bench.lock python3 benches/launch.py "$imago" "$work/home" "$rounds" "$@"
