#!/usr/bin/env python3
"""Launch latency of two imago builds, host and private network, in interleaved rounds.

    benches/launch-pairs.py NEW_IMAGO BASE_IMAGO HOME [ROUNDS]

HOME must hold `busybox:bench` (`IMAGO_BENCH_HOME=HOME cargo bench -p imago-cli --bench
instances -- make-bench-home`). Each round launches `imago run` with each build and each network
once (command start to exit, i.e. the program exec'd), then stops and removes the instance; the
medians of the rounds are printed with the load average before and after. Run as root, under
`flock /tmp/imago-bench.lock`. Fewer contenders than the cargo bench (no runc), so the private
and host columns of one build are measured side by side.
"""
import statistics
import subprocess
import sys
import time

new, base, home = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 40
variants = [
    ("new, host network", new, ["--network", "host"]),
    ("new, private network", new, []),
    ("base, host network", base, ["--network", "host"]),
    ("base, private network", base, []),
]
times = {name: [] for name, _, _ in variants}
print("load before:", open("/proc/loadavg").read().strip())
for _ in range(rounds):
    for name, imago, extra in variants:
        cmd = [imago, "--home", home, "run", "-q", *extra, "busybox:bench", "--",
               "/bin/busybox", "sleep", "1000"]
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
    print(f"{name:24} median {statistics.median(samples):6.2f} ms"
          f"  (p25 {q[0]:.2f}, p75 {q[2]:.2f}, n={len(samples)})")
print("load after:", open("/proc/loadavg").read().strip())
