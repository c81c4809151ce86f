#!/usr/bin/env bash
# Store benchmarks (issue 2): import/export of an image with one big layer, peak memory, and
# `imago images` with 1,000 images. Prints a markdown table; every figure is measured in this run,
# side by side with its peer, as the median of RUNS runs.
#
#   benches/store.sh                 # 1 GiB and 100 MB layers, 3 runs each
#   RUNS=5 SIZE_MB=1024 benches/store.sh
#
# Needs: skopeo, sha256sum, /usr/bin/time (scripts/setup installs them), python3.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-1024}
SMALL_MB=${SMALL_MB:-100}
IMAGES=${IMAGES:-1000}
WORK=${WORK:-$(mktemp -d /var/tmp/imago-bench.XXXXXX)}
trap 'rm -rf "$WORK"' EXIT

cargo build --release -q -p imago-cli
IMAGO=$PWD/target/release/imago

# median of the numbers on stdin
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
# seconds taken by "$@"
calc() { awk "BEGIN { print $* }"; }
seconds() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); calc "$e - $s"; }
# CPU seconds (user + system) used by "$@": unlike wall time, not inflated by other load on the
# machine, so rates per CPU second compare implementations even on a busy host.
cpu_seconds() { /usr/bin/time -f '%U %S' "$@" 2>&1 >/dev/null | tail -1 | awk '{print $1 + $2}'; }
# peak RSS in MB of "$@"
peak_rss_mb() {
    /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2/1024}'
}

# An OCI archive whose one layer is an uncompressed tar of SIZE MiB of random bytes.
make_archive() { # size_mb out.tar
    local size=$1 out=$2 dir
    dir=$(mktemp -d "$WORK/layout.XXXXXX")
    head -c "$((size << 20))" /dev/urandom >"$dir/big.bin"
    tar -C "$dir" -cf "$dir/layer.tar" big.bin
    rm "$dir/big.bin"
    python3 - "$dir" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
os.makedirs(f"{d}/oci/blobs/sha256")
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{d}/oci/blobs/sha256/{h}", "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
h = hashlib.sha256()
with open(f"{d}/layer.tar", "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + h.hexdigest(),
         "size": os.path.getsize(f"{d}/layer.tar")}
os.rename(f"{d}/layer.tar", f"{d}/oci/blobs/sha256/{h.hexdigest()}")
config = put(json.dumps({"architecture": "amd64", "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
config["mediaType"] = "application/vnd.oci.image.config.v1+json"
manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": config, "layers": [layer]}).encode())
manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
manifest["annotations"] = {"org.opencontainers.image.ref.name": "big:1"}
json.dump({"schemaVersion": 2, "manifests": [manifest]}, open(f"{d}/oci/index.json", "w"))
open(f"{d}/oci/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
    tar -C "$dir/oci" -cf "$out" .
    rm -rf "$dir"
}

make_archive "$SIZE_MB" "$WORK/big.tar"
make_archive "$SMALL_MB" "$WORK/small.tar"
cat "$WORK/big.tar" "$WORK/small.tar" >/dev/null # warm the page cache for both tools alike
BIG_BYTES=$(stat -c %s "$WORK/big.tar")

imago_import=() skopeo_copy=() imago_verify=() sha=() verify_cpu=() sha_cpu=()
for _ in $(seq "$RUNS"); do
    rm -rf "$WORK/h" "$WORK/y"
    imago_import+=("$(seconds "$IMAGO" --home "$WORK/h" -q import "$WORK/big.tar")")
    skopeo_copy+=("$(seconds skopeo copy "oci-archive:$WORK/big.tar" "oci:$WORK/y:big")")
    layer=$(ls -S "$WORK/h/store/blobs/sha256" | head -1)
    # Import lets the layer's pages go once written; hash from the page cache for both tools.
    cat "$WORK/h/store/blobs/sha256/$layer" >/dev/null
    imago_verify+=("$(seconds "$IMAGO" --home "$WORK/h" -q verify big:1)")
    sha+=("$(seconds sha256sum "$WORK/h/store/blobs/sha256/$layer")")
    verify_cpu+=("$(cpu_seconds "$IMAGO" --home "$WORK/h" -q verify big:1)")
    sha_cpu+=("$(cpu_seconds sha256sum "$WORK/h/store/blobs/sha256/$layer")")
done
med() { printf '%s\n' "$@" | median; }
t_import=$(med "${imago_import[@]}")
t_skopeo=$(med "${skopeo_copy[@]}")
t_verify=$(med "${imago_verify[@]}")
t_sha=$(med "${sha[@]}")
c_verify=$(med "${verify_cpu[@]}")
c_sha=$(med "${sha_cpu[@]}")
gbps() { printf %.2f "$(calc "$BIG_BYTES / $1 / 1000000000")"; }

# Peak memory of import and export, small vs big layer.
rss() { # archive
    rm -rf "$WORK/m"
    local imp exp_oci exp_docker
    imp=$(peak_rss_mb "$IMAGO" --home "$WORK/m" -q import "$1")
    exp_oci=$(peak_rss_mb "$IMAGO" --home "$WORK/m" -q export big:1 -o "$WORK/out.tar")
    exp_docker=$(peak_rss_mb "$IMAGO" --home "$WORK/m" -q export big:1 -o "$WORK/out.tar" --format docker)
    rm -f "$WORK/out.tar"
    echo "$imp $exp_oci $exp_docker"
}
read -r small_imp small_oci small_docker <<<"$(rss "$WORK/small.tar")"
read -r big_imp big_oci big_docker <<<"$(rss "$WORK/big.tar")"
rm -rf "$WORK/h" "$WORK/y" "$WORK/m"

# `imago images` with IMAGES images: distinct manifests and configs sharing one small layer.
python3 - "$WORK/many" "$IMAGES" <<'PY'
import hashlib, json, os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{root}/store/blobs/sha256")
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{root}/store/blobs/sha256/{h}", "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
layer = put(b"\0" * 1024)
layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
entries = []
for i in range(n):
    config = put(json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "Labels": {"i": str(i)}},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
        "history": [{"created_by": "bench"}]}, sort_keys=True, separators=(",", ":")).encode())
    config["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": [layer]}, sort_keys=True, separators=(",", ":")).encode())
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    manifest["annotations"] = {"org.opencontainers.image.ref.name": f"app{i:04}:latest"}
    entries.append(manifest)
entries.sort(key=lambda m: m["annotations"]["org.opencontainers.image.ref.name"])
open(f"{root}/store/index.json", "w").write(json.dumps({"manifests": entries,
    "mediaType": "application/vnd.oci.image.index.v1+json", "schemaVersion": 2}, sort_keys=True, separators=(",", ":")))
open(f"{root}/store/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
count=$("$IMAGO" --home "$WORK/many" --json images | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$count" = "$IMAGES" ] || { echo "imago images listed $count images, not $IMAGES" >&2; exit 1; }
images_ms=()
for _ in $(seq 15); do images_ms+=("$(calc "$(seconds "$IMAGO" --home "$WORK/many" images) * 1000")"); done
t_images=$(med "${images_ms[@]}")

cat <<EOF2
| measurement | value | peer in the same run |
|---|---|---|
| verified hashing: \`imago verify\` of a ${SIZE_MB} MiB layer, wall clock | $(gbps "$t_verify") GB/s | \`sha256sum\`: $(gbps "$t_sha") GB/s |
| verified hashing, per CPU second (user + sys) | $(gbps "$c_verify") GB/s | \`sha256sum\`: $(gbps "$c_sha") GB/s |
| end-to-end \`imago import\` of a ${SIZE_MB} MiB-layer oci-archive | $(printf %.2f "$t_import") s ($(gbps "$t_import") GB/s) | \`skopeo copy oci-archive: oci:\`: $(printf %.2f "$t_skopeo") s; ratio imago/skopeo $(printf %.2f "$(calc "$t_import / $t_skopeo")") |
| peak RSS, import | ${SMALL_MB} MiB layer: ${small_imp} MB | ${SIZE_MB} MiB layer: ${big_imp} MB |
| peak RSS, export --format oci | ${SMALL_MB} MiB layer: ${small_oci} MB | ${SIZE_MB} MiB layer: ${big_oci} MB |
| peak RSS, export --format docker | ${SMALL_MB} MiB layer: ${small_docker} MB | ${SIZE_MB} MiB layer: ${big_docker} MB |
| \`imago images\` with ${IMAGES} images | $(printf %.1f "$t_images") ms | target < 50 ms |

Medians of ${RUNS} runs (15 for \`imago images\`); page cache warm for every tool; $(nproc) cores;
load average at the end: $(cut -d' ' -f1-3 /proc/loadavg).
EOF2
