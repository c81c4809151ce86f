#!/usr/bin/env python3
"""Time one launch's cgroup.procs writes: strace (seccomp-bpf filtered to openat and write, so
the rest of the launch runs untraced) of `imago run`, summing the durations of every write into
a file named cgroup.procs by the engine (not by the warm-up child).

    benches/launch-cgroup-writes.py IMAGO[,OTHER_IMAGO...] HOME ROUNDS

Each binary runs with its warm-up on and with IMAGO_NO_CGROUP_WARMUP=1, in interleaved rounds;
HOME holds busybox:bench (benches/launch.sh makes one). Root, strace.
"""
import os, re, signal, statistics, subprocess, sys, tempfile, time
imagos, home, rounds = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
def one(imago, env_extra):
    env = dict(os.environ, **env_extra)
    out = tempfile.mktemp(prefix="procs-strace-")
    p = subprocess.Popen(["strace", "-f", "-T", "--seccomp-bpf", "-e", "trace=openat,write,exit_group",
                          "-o", out, imago, "--home", home, "run", "-q", "--network", "host",
                          "busybox:bench", "--", "/bin/busybox", "sleep", "1000"],
                         stdout=subprocess.PIPE, text=True, env=env)
    instance = p.stdout.readline().strip()
    time.sleep(1.0)
    # strace -o FILE PROG blocks SIGINT and SIGTERM: only SIGKILL ends it. Its tracees may die
    # with it, leaving "lost" records; the sweep at the end removes every record of HOME.
    p.kill(); p.wait()
    subprocess.run([imago, "--home", home, "stop", "--time", "0", instance], capture_output=True)
    subprocess.run([imago, "--home", home, "rm", instance], capture_output=True)
    fds = {}
    total, first, n = 0.0, None, 0
    warm = set()
    for line in open(out):
        m = re.match(r"(\d+)\s+openat\(.*\"([^\"]+)\".*= (\d+) <", line)
        if m:
            fds[(m[1], m[3])] = m[2]
            continue
        m = re.match(r"(\d+)\s+write\((\d+), \"([^\"]*)\".*= \d+ <([0-9.]+)>", line)
        if m and fds.get((m[1], m[2]), "").endswith("cgroup.procs"):
            if m[3] == "0":  # the warm-up child writes "0"; the engine writes a pid
                continue
            d = float(m[4]) * 1000
            total += d; n += 1
            first = d if first is None else first
    os.unlink(out)
    return total, first, n
variants = []
for imago in imagos:
    variants += [(f"{os.path.basename(imago)} warm-up on", imago, {}),
                 (f"{os.path.basename(imago)} warm-up off", imago, {"IMAGO_NO_CGROUP_WARMUP": "1"})]
res = {name: [] for name, _, _ in variants}
print("load before:", open("/proc/loadavg").read().strip(), flush=True)
for _ in range(rounds):
    for name, imago, env in variants:
        res[name].append(one(imago, env))
        time.sleep(0.3)
for name, rs in res.items():
    print(f"{name:32} engine's cgroup.procs writes per launch: n={rs[0][2]}, total median "
          f"{statistics.median(r[0] for r in rs):.2f} ms, first write median "
          f"{statistics.median(r[1] for r in rs):.2f} ms (rounds={len(rs)})")
print("load after:", open("/proc/loadavg").read().strip())
for imago in imagos[:1]:
    listing = subprocess.run([imago, "--home", home, "ps", "-a"], capture_output=True, text=True)
    for line in listing.stdout.splitlines()[1:]:
        instance = line.split()[0]
        subprocess.run([imago, "--home", home, "stop", "--time", "0", instance], capture_output=True)
        subprocess.run([imago, "--home", home, "rm", instance], capture_output=True)
