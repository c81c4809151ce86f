#!/bin/sh
# Makes the benchmark build context: about 10,000 files / 500 MB of real shared libraries and
# Python packages copied from this machine's /usr/lib (Debian 12).
# Usage: benches/make-context.sh DIR
set -eu
dir=${1:?usage: make-context.sh DIR}
rm -rf "$dir"; mkdir -p "$dir/tree"
cp -a /usr/lib/gcc "$dir/tree/gcc"
mkdir -p "$dir/tree/dist-packages"
total=0
for d in $(ls /usr/lib/python3/dist-packages | LC_ALL=C sort); do
  cp -a "/usr/lib/python3/dist-packages/$d" "$dir/tree/dist-packages/"
  total=$(find "$dir/tree" -type f | wc -l)
  [ "$total" -ge 9800 ] && break
done
# top up the size with large shared libraries
for f in $(ls -S /usr/lib/x86_64-linux-gnu/*.so.* 2>/dev/null | head -150); do
  [ "$(du -sm "$dir/tree" | cut -f1)" -ge 500 ] && break
  mkdir -p "$dir/tree/libs"; cp -a "$f" "$dir/tree/libs/"
done
cat > "$dir/imago.toml" <<'TOML'
[image.gz]
platform = "linux/amd64"
[[image.gz.layer]]
copy = [{ src = "tree", dest = "/usr/lib/" }]

[image.zst]
platform = "linux/amd64"
compression = "zstd"
[[image.zst.layer]]
copy = [{ src = "tree", dest = "/usr/lib/" }]
TOML
echo "$(find "$dir/tree" -type f | wc -l) files, $(du -sh "$dir/tree" | cut -f1)"
