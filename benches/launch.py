#!/usr/bin/env python3
"""Launch latency of `imago run` against plain runc and crun, in interleaved rounds.

    benches/launch.py IMAGO HOME [ROUNDS] [--base OTHER_IMAGO] [--env KEY=VALUE]...

Called by benches/launch.sh, which makes HOME (an image `busybox:bench` holding only a static
/bin/busybox) and checks the tools. Each round runs every contender once, in a rotated order,
0.3 s apart; a launch is timed from the command's start to its exit (for imago: the program
exec'd; for `runc run -d` / `crun run -d`: the same). Printed: medians with p25/p75 and the load
average before and after, so that only figures of one run are compared.

Contenders:
- imago, embedded engine, host network and private network (IMAGO; with --base also OTHER_IMAGO;
  each --env KEY=VALUE adds IMAGO run with that variable set)
- imago --runtime runc, host network
- plain `runc run -d` of the bundle imago wrote for a host-network instance (same config.json:
  same mounts, capabilities and seccomp rules; the embedded engine's precompiled rules are put
  back from seccomp.json)
- plain `crun run -d` of that bundle (crun 1.8 refuses hybrid cgroups, so it runs in a mount
  namespace made once per run in which the cgroup2 mount at /sys/fs/cgroup/unified is
  unmounted, entered with `nsenter --mount`; `nsenter ... true` is timed too, to subtract)
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

args = sys.argv[1:]
base = None
envs = []
while "--base" in args:
    i = args.index("--base")
    base = args[i + 1]
    del args[i:i + 2]
while "--env" in args:
    i = args.index("--env")
    envs.append(args[i + 1])
    del args[i:i + 2]
imago, home = args[0:2]
rounds = int(args[2]) if len(args) > 2 else 25
plain = dict(os.environ)
plain.pop("IMAGO_NO_CGROUP_WARMUP", None)
work = tempfile.mkdtemp(prefix="imago-launch-bench-")


def run_imago(binary, extra, env):
    cmd = [binary, "--home", home, "run", "-q", *extra, "busybox:bench", "--",
           "/bin/busybox", "sleep", "1000"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = (time.perf_counter() - start) * 1000
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {out.stderr}")
    instance = out.stdout.strip()
    subprocess.run([binary, "--home", home, "stop", "--time", "0", instance], capture_output=True)
    subprocess.run([binary, "--home", home, "rm", instance], capture_output=True)
    return elapsed


def imago_launcher(binary, extra, env):
    return lambda: run_imago(binary, extra, env)


def plain_bundle():
    """A copy of the config.json imago writes for a host-network instance (its rootfs path is
    absolute, into imago's rootfs cache, which stays)."""
    out = subprocess.run([imago, "--home", home, "run", "-q", "--network", "host", "busybox:bench",
                          "--", "/bin/busybox", "sleep", "1000"],
                         capture_output=True, text=True, check=True)
    instance = out.stdout.strip()
    bundle = os.path.join(work, "bundle")
    os.makedirs(bundle)
    source = os.path.join(home, "instances", instance, "bundle")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    # The embedded engine's filter is precompiled: its rules sit in seccomp.json (OCI operand
    # order, what runc and crun read), not in config.json. Put them back for the plain engines.
    rules = os.path.join(source, "seccomp.json")
    if os.path.exists(rules):
        with open(rules) as f:
            config["linux"]["seccomp"] = json.load(f)
        config["annotations"].pop("org.imago.seccomp", None)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    subprocess.run([imago, "--home", home, "stop", "--time", "0", instance], capture_output=True)
    subprocess.run([imago, "--home", home, "rm", instance], capture_output=True)
    return bundle


counter = [0]


def engine_launcher(prefix, engine, root, bundle):
    def launch():
        counter[0] += 1
        cid = f"bench-{os.getpid()}-{counter[0]}"
        start = time.perf_counter()
        subprocess.run([*prefix, engine, "--root", root, "run", "-d", "--bundle", bundle, cid],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        elapsed = (time.perf_counter() - start) * 1000
        subprocess.run([*prefix, engine, "--root", root, "delete", "--force", cid],
                       capture_output=True)
        return elapsed
    return launch


def timed(cmd):
    def launch():
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        return (time.perf_counter() - start) * 1000
    return launch


bundle = plain_bundle()
contenders = [
    ("imago embedded, host network", imago_launcher(imago, ["--network", "host"], plain)),
    ("imago embedded, private network", imago_launcher(imago, [], plain)),
]
for kv in envs:
    key, value = kv.split("=", 1)
    env = dict(plain, **{key: value})
    contenders += [
        (f"imago {kv}, host", imago_launcher(imago, ["--network", "host"], env)),
        (f"imago {kv}, private", imago_launcher(imago, [], env)),
    ]
if base:
    contenders += [
        ("base embedded, host network", imago_launcher(base, ["--network", "host"], plain)),
        ("base embedded, private network", imago_launcher(base, [], plain)),
    ]
contenders += [
    ("imago --runtime runc, host network",
     imago_launcher(imago, ["--runtime", "runc", "--network", "host"], plain)),
    ("plain runc run -d, same bundle",
     engine_launcher([], "runc", os.path.join(work, "runc-root"), bundle)),
]
mntns = None
if shutil.which("crun"):
    # A mount namespace without the cgroup2 mount, kept by a bind mount of its nsfs file.
    mntns = os.path.join(work, "mntns")
    open(mntns, "w").close()
    subprocess.run(["unshare", f"--mount={mntns}", "--propagation", "private",
                    "umount", "/sys/fs/cgroup/unified"], check=True)
    enter = ["nsenter", f"--mount={mntns}"]
    contenders += [
        ("crun run -d (via nsenter), same bundle",
         engine_launcher(enter, "crun", os.path.join(work, "crun-root"), bundle)),
        ("nsenter --mount ... true (subtract)", timed([*enter, "true"])),
    ]

times = {name: [] for name, _ in contenders}
print("load before:", open("/proc/loadavg").read().strip(), flush=True)
try:
    for r in range(rounds):
        shift = r % len(contenders)
        for name, launch in contenders[shift:] + contenders[:shift]:
            times[name].append(launch())
            time.sleep(0.3)
finally:
    if mntns:
        subprocess.run(["umount", mntns])
    shutil.rmtree(work, ignore_errors=True)
for name, samples in times.items():
    q = statistics.quantiles(samples, n=4)
    print(f"{name:44} median {statistics.median(samples):6.2f} ms"
          f"  (p25 {q[0]:.2f}, p75 {q[2]:.2f}, n={len(samples)})")
print("load after:", open("/proc/loadavg").read().strip())
