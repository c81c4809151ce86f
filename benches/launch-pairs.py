#!/usr/bin/env python3
"""Launch latency of two imago builds, host and private network, in interleaved rounds.

    benches/launch-pairs.py NEW_IMAGO BASE_IMAGO HOME [ROUNDS] [--new-env KEY=VALUE]

HOME must hold `busybox:bench` (`IMAGO_BENCH_HOME=HOME cargo bench -p imago-cli --bench
instances -- make-bench-home`). Each round launches `imago run` with each build and each network
once (command start to exit, i.e. the program exec'd), then stops and removes the instance; the
medians of the rounds are printed with the load average before and after. Run as root, under
`flock /tmp/imago-bench.lock`. Fewer contenders than the cargo bench (no runc), so the private
and host columns of one build are measured side by side. `--new-env KEY=VALUE` adds the new
build run with that environment variable set (e.g. `IMAGO_NO_CGROUP_WARMUP=1`) as a third
build of each round.
"""
import os
import statistics
import subprocess
import sys
import time

args = sys.argv[1:]
new_env = None
if "--new-env" in args:
    i = args.index("--new-env")
    new_env = args[i + 1]
    del args[i:i + 2]
new, base, home = args[0:3]
rounds = int(args[3]) if len(args) > 3 else 40
plain = dict(os.environ)
variants = [
    ("new, host network", new, ["--network", "host"], plain),
    ("new, private network", new, [], plain),
    ("base, host network", base, ["--network", "host"], plain),
    ("base, private network", base, [], plain),
]
if new_env:
    key, value = new_env.split("=", 1)
    env = dict(plain, **{key: value})
    variants += [
        (f"new {new_env}, host", new, ["--network", "host"], env),
        (f"new {new_env}, private", new, [], env),
    ]
times = {name: [] for name, _, _, _ in variants}
print("load before:", open("/proc/loadavg").read().strip())
for _ in range(rounds):
    for name, imago, extra, env in variants:
        cmd = [imago, "--home", home, "run", "-q", *extra, "busybox:bench", "--",
               "/bin/busybox", "sleep", "1000"]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times[name].append((time.perf_counter() - start) * 1000)
        if out.returncode != 0:
            sys.exit(out.stderr)
        instance = out.stdout.strip()
        subprocess.run([imago, "--home", home, "stop", "--time", "0", instance],
                       capture_output=True)
        subprocess.run([imago, "--home", home, "rm", instance], capture_output=True)
for name, samples in times.items():
    q = statistics.quantiles(samples, n=4)
    print(f"{name:40} median {statistics.median(samples):6.2f} ms"
          f"  (p25 {q[0]:.2f}, p75 {q[2]:.2f}, n={len(samples)})")
print("load after:", open("/proc/loadavg").read().strip())
