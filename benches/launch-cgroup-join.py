#!/usr/bin/env python3
"""How long a new container init takes to join its v1 cgroups (issue 15), by the way it joins
and with or without the cgroup warm-up writing beside it.

    benches/launch-cgroup-join.py [ROUNDS]

What the embedded engine's init does on a hybrid host, without the rest of a launch: a freshly
forked, single-threaded process makes its cgroup in the freezer, devices and memory hierarchies
(`mkdir`) and moves itself into each, either by writing its pid into `cgroup.procs` (libcgroups
0.7.0, and imago before this change) or by writing `0` into `tasks` (moves the calling thread
only; imago's vendored libcgroups now). "warm-up" runs, beside it, a process that writes `0`
into its own cgroup2 `cgroup.procs` every 3 ms, as `imago run`'s cgroup warm-up does. Each
round runs the four cases once in a rotated order, 0.3 s apart (so the kernel's `rcu_sync` is
idle at the start of each, as after a quiet moment), and times the child from its first
`mkdir` to its last move. Prints medians and p25/p75 per case, and the load average.
Root, a host with v1 hierarchies and a cgroup2 mount (hybrid).
"""
import os
import statistics
import sys
import time

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
V1 = ["freezer", "devices", "memory"]
cg2 = None
for line in open("/proc/self/mountinfo"):
    left, right = line.split(" - ", 1)
    if right.split()[0] == "cgroup2" and left.split()[3] == "/":
        cg2 = left.split()[4]
if cg2 is None or not all(os.path.isdir(f"/sys/fs/cgroup/{h}") for h in V1):
    sys.exit("launch-cgroup-join.py: needs v1 freezer, devices and memory hierarchies and a cgroup2 mount")
own2 = [l.split("::", 1)[1].strip() for l in open("/proc/self/cgroup") if l.startswith("0::")][0]
warm_procs = os.path.join(cg2, own2.lstrip("/"), "cgroup.procs")


def warmup():
    pid = os.fork()
    if pid == 0:
        fd = os.open(warm_procs, os.O_WRONLY)
        while True:
            os.pwrite(fd, b"0", 0)
            time.sleep(0.003)
    return pid


def join(name, how):
    """Forks a child that makes and joins its cgroups; returns the child's own timing (ms)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        start = time.perf_counter()
        for h in V1:
            path = f"/sys/fs/cgroup/{h}/imago-join-bench/{name}"
            os.makedirs(path)
            with open(os.path.join(path, how), "w") as f:
                f.write("0" if how == "tasks" else str(os.getpid()))
        os.write(w, str((time.perf_counter() - start) * 1000).encode())
        os._exit(0)
    os.close(w)
    took = float(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    for h in V1:
        os.rmdir(f"/sys/fs/cgroup/{h}/imago-join-bench/{name}")
    return took


cases = [("cgroup.procs", False), ("cgroup.procs", True), ("tasks", False), ("tasks", True)]
times = {c: [] for c in cases}
for h in V1:
    os.makedirs(f"/sys/fs/cgroup/{h}/imago-join-bench", exist_ok=True)
print(f"load before: {open('/proc/loadavg').read().strip()}")
try:
    for i in range(rounds):
        for k in range(len(cases)):
            how, warm = cases[(i + k) % len(cases)]
            time.sleep(0.3)
            w = warmup() if warm else None
            if w:
                time.sleep(0.001)  # as in a launch: the warm-up starts first
            times[(how, warm)].append(join(f"r{i}k{k}", how))
            if w:
                os.kill(w, 9)
                os.waitpid(w, 0)
finally:
    for h in V1:
        os.rmdir(f"/sys/fs/cgroup/{h}/imago-join-bench")
print(f"load after: {open('/proc/loadavg').read().strip()}")
for (how, warm), v in times.items():
    q = statistics.quantiles(v, n=4)
    label = f"join by {how}{', warm-up beside it' if warm else ''}"
    print(f"{label:42} median {statistics.median(v):6.2f} ms  (p25 {q[0]:.2f}, p75 {q[2]:.2f}, n={len(v)})")
