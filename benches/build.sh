#!/usr/bin/env bash
# Builder benchmarks, side by side in one run, medians of N runs (default 5):
#   - cold build (empty store and cache) of a ~10,000 file / ~500 MB context, gzip and zstd,
#     against `tar --sort=name -c | gzip -1`, `tar --sort=name -c | zstd -1 -T0` and
#     `umoci repack` of the same tree;
#   - no-op rebuild (nothing changed);
#   - peak memory (max RSS) of the cold and no-op builds.
# Usage: benches/build.sh [RUNS]   (needs: cargo, tar, gzip, zstd, umoci, GNU time)
#        ONLY=zst benches/build.sh [RUNS]: only the zstd build and `tar | zstd`, alternating, for
#        a tighter side-by-side comparison (the full run puts a gzip build and umoci between them).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
work=${BENCH_DIR:-/tmp/imago-bench}
cargo build --release -p imago-cli >/dev/null
imago=$PWD/target/release/imago
[ -d "$work/ctx/tree" ] || benches/make-context.sh "$work/ctx"
ctx=$work/ctx
files=$(find "$ctx/tree" -type f | wc -l)
bytes=$(du -sb "$ctx/tree" | cut -f1)
# Warm the page cache so that every contender reads from memory.
tar -cf - -C "$ctx" tree >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {m=int((NR+1)/2); if (NR%2) print a[m]; else printf "%.3f\n", (a[m]+a[m+1])/2}'; }
# time_cmd LABEL CMD...: runs CMD with GNU time, appends "seconds maxrss_kb" to $work/LABEL
time_cmd() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/.t" "$@" >/dev/null 2>"$work/.err" || { cat "$work/.err"; exit 1; }
  cat "$work/.t" >>"$work/$label"
}

rm -f "$work"/r.*
only=${ONLY:-}
for i in $(seq "$runs"); do
  for c in gz zst; do
    [ -z "$only" ] || [ "$c" = "$only" ] || continue
    rm -rf "$work/home"
    time_cmd "r.imago-$c-cold" "$imago" --home "$work/home" -q build -f "$ctx/imago.toml" "$c"
    time_cmd "r.imago-$c-noop" "$imago" --home "$work/home" -q build -f "$ctx/imago.toml" "$c"
  done
  if [ -z "$only" ]; then
    time_cmd r.tar-gzip sh -c "tar --sort=name -cf - -C '$ctx' tree | gzip -1 > '$work/out.tgz'"
  fi
  time_cmd r.tar-zstd sh -c "tar --sort=name -cf - -C '$ctx' tree | zstd -q -1 -T0 > '$work/out.zst'"
  if [ -z "$only" ] && command -v umoci >/dev/null; then
    # umoci repack of the same tree: an empty image, unpacked, the tree added, repacked.
    rm -rf "$work/oci" "$work/bundle"
    umoci init --layout "$work/oci" >/dev/null
    umoci new --image "$work/oci:b" >/dev/null
    umoci unpack --rootless --image "$work/oci:b" "$work/bundle" >/dev/null 2>&1 || umoci unpack --image "$work/oci:b" "$work/bundle" >/dev/null
    cp -a "$ctx/tree" "$work/bundle/rootfs/tree"
    time_cmd r.umoci-repack umoci repack --image "$work/oci:b" "$work/bundle"
  fi
done

echo "context: $files files, $((bytes / 1000000)) MB; $runs runs; medians"
printf "%-26s %10s %12s %10s\n" "what" "seconds" "MB/s" "max RSS MB"
for f in imago-gz-cold tar-gzip imago-zst-cold tar-zstd umoci-repack imago-gz-noop imago-zst-noop; do
  [ -f "$work/r.$f" ] || continue
  s=$(cut -d' ' -f1 "$work/r.$f" | median)
  m=$(cut -d' ' -f2 "$work/r.$f" | median)
  printf "%-26s %10s %12.0f %10.1f\n" "$f" "$s" "$(echo "$bytes / 1000000 / $s" | bc -l)" "$(echo "$m / 1024" | bc -l)"
done
