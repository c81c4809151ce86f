#!/usr/bin/env python3
"""CPU time (/proc/PID/schedstat) the container's init and the supervisor had spent by the time
`imago run` returned: much less sensitive to the host's load than wall times. Interleaved
rounds, medians, host network.

    benches/launch-init-cpu.py NEW_IMAGO BASE_IMAGO HOME ROUNDS

HOME must hold `busybox:bench` (benches/launch.sh makes one the same way). Run as root.
"""
import json, os, statistics, subprocess, sys, time
new, base, home, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def cpu_ms(pid):
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e6
def launch(binary, extra):
    cmd = [binary, "--home", home, "run", "-q", "--network", "host", *extra, "busybox:bench", "--", "/bin/busybox", "sleep", "1000"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = (time.perf_counter() - t) * 1000
    i = out.stdout.strip()
    st = json.load(open(os.path.join(home, "instances", i, "state.json")))
    init, sup = cpu_ms(st["pid"]), cpu_ms(st["supervisor_pid"])
    subprocess.run([binary, "--home", home, "stop", "--time", "0", i], capture_output=True)
    subprocess.run([binary, "--home", home, "rm", i], capture_output=True)
    return init, sup, wall
cs = [("new, default filter (precompiled)", new, []), ("base, default filter (libcontainer compiles)", base, []),
      ("new, --seccomp unconfined", new, ["--seccomp", "unconfined"])]
launch(new, [])
res = {n: [] for n, _, _ in cs}
print("load before:", open("/proc/loadavg").read().strip())
for r in range(rounds):
    s = r % len(cs)
    for n, b, e in cs[s:] + cs[:s]:
        res[n].append(launch(b, e)); time.sleep(0.2)
for n, v in res.items():
    med = lambda k: statistics.median(x[k] for x in v)
    print(f"{n:46} init CPU {med(0):6.2f} ms  supervisor CPU {med(1):6.2f} ms  wall {med(2):7.2f} ms (n={len(v)})")
print("load after:", open("/proc/loadavg").read().strip())
