#!/usr/bin/env bash
# No-op rebuild of an image whose base is a ~100 MB archive (`from = "oci-archive:base.tar"`),
# medians of N runs (default 9). With a second imago binary (an older build, say), both are
# timed alternately in the same run, each with its own home.
# Usage: benches/archive-base.sh [RUNS] [OTHER_IMAGO]   (needs: cargo, GNU time)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-9}
other=${2:-}
work=${BENCH_DIR:-/tmp/imago-bench-archive}
cargo build --release -p imago-cli >/dev/null
imago=$PWD/target/release/imago
mkdir -p "$work/base/tree" "$work/child"
if [ ! -f "$work/child/base.tar" ]; then
  # Random bytes: the compressor cannot shrink them, so the archive is as large as the tree.
  for i in $(seq 20); do head -c 5M /dev/urandom >"$work/base/tree/f$i"; done
  printf '[image.base]\ncompression = "zstd"\n[[image.base.layer]]\ncopy = [{ src = "tree", dest = "/data/" }]\n' >"$work/base/imago.toml"
  "$imago" --home "$work/base-home" -q build -f "$work/base/imago.toml" base --output "oci-archive:$work/child/base.tar" >/dev/null
  printf '[image.child]\nfrom = "oci-archive:base.tar"\n[[image.child.layer]]\nfile = [{ path = "/etc/child", content = "child" }]\n' >"$work/child/imago.toml"
  # The build cache trusts an archive's fingerprint once its last change is 2 s old.
  sleep 3
fi
archive_bytes=$(stat -c %s "$work/child/base.tar")

median() { sort -n | awk '{a[NR]=$1} END {m=int((NR+1)/2); if (NR%2) print a[m]; else printf "%.3f\n", (a[m]+a[m+1])/2}'; }
# time_cmd LABEL CMD...: appends "seconds maxrss_kb" to $work/LABEL (wall time in ms resolution:
# GNU time's %e has only 10 ms).
time_cmd() {
  local label=$1; shift
  local start end
  start=$(date +%s%N)
  /usr/bin/time -f "%M" -o "$work/.t" "$@" >/dev/null 2>"$work/.err" || { cat "$work/.err"; exit 1; }
  end=$(date +%s%N)
  echo "$(awk -v ns=$((end - start)) 'BEGIN {printf "%.3f", ns / 1e9}') $(cat "$work/.t")" >>"$work/$label"
}

rm -f "$work"/r.* && rm -rf "$work/home-this" "$work/home-other"
bins=("this:$imago")
[ -z "$other" ] || bins+=("other:$other")
for b in "${bins[@]}"; do
  # The first build imports the base; every later one is a no-op.
  "${b#*:}" --home "$work/home-${b%%:*}" -q build -f "$work/child/imago.toml" child >/dev/null
done
for _ in $(seq "$runs"); do
  for b in "${bins[@]}"; do
    time_cmd "r.${b%%:*}" "${b#*:}" --home "$work/home-${b%%:*}" -q build -f "$work/child/imago.toml" child
  done
done
echo "archive: $archive_bytes bytes; runs: $runs; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for b in "${bins[@]}"; do
  l=${b%%:*}
  echo "$l ($(basename "${b#*:}")): no-op rebuild median $(cut -d' ' -f1 "$work/r.$l" | median) s," \
    "max RSS $(cut -d' ' -f2 "$work/r.$l" | median) KB (runs: $(cut -d' ' -f1 "$work/r.$l" | tr '\n' ' '))"
done
