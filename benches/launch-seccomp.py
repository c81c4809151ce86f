#!/usr/bin/env python3
"""What the default seccomp filter costs a launch: one imago build, interleaved rounds.

    benches/launch-seccomp.py IMAGO HOME IMAGE [ROUNDS]

Each round launches `IMAGO run IMAGE -- /bin/busybox sleep 1000` once per engine and network,
with `--seccomp default` and with `--seccomp unconfined` (command start to exit, i.e. the
program exec'd), 0.3 s apart, stopping and removing each instance; prints the medians and the
load average before and after. Run as root.
"""
import statistics
import subprocess
import sys
import time

imago, home, image = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 25
variants = []
for engine, network in [("embedded", "host"), ("embedded", "private"), ("runc", "host")]:
    for seccomp in ["default", "unconfined"]:
        variants.append((f"{engine}, {network}, {seccomp}",
                         ["--runtime", engine, "--network", network, "--seccomp", seccomp]))
times = {name: [] for name, _ in variants}
print("load before:", open("/proc/loadavg").read().strip())
for _ in range(rounds):
    for name, extra in variants:
        time.sleep(0.3)
        cmd = [imago, "--home", home, "run", "-q", *extra, image, "--", "/bin/busybox", "sleep",
               "1000"]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        times[name].append((time.perf_counter() - start) * 1000)
        if out.returncode != 0:
            sys.exit(out.stderr)
        instance = out.stdout.strip()
        subprocess.run([imago, "--home", home, "stop", "--time", "0", instance],
                       capture_output=True)
        subprocess.run([imago, "--home", home, "rm", instance], capture_output=True)
for name, samples in times.items():
    q = statistics.quantiles(samples, n=4)
    print(f"{name:32} median {statistics.median(samples):6.2f} ms"
          f"  (p25 {q[0]:.2f}, p75 {q[2]:.2f}, n={len(samples)})")
print("load after:", open("/proc/loadavg").read().strip())
