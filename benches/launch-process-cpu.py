#!/usr/bin/env python3
"""CPU per process of a launch (issue 15): `perf sched record -a` over N launches of
`imago run -q --network host busybox:bench -- /bin/busybox sleep 1000` (each stopped and removed
0.3 s later), then `perf sched timehist -s`: run time of the CLI, its warm-up child, the
supervisor (whole life, stop included), libcontainer's intermediate process (if any), the init
(up to and with the program) and the init's seccomp-check fork; medians, first launch left out.

    benches/launch-process-cpu.py IMAGO HOME N

HOME holds busybox:bench (benches/launch.sh makes one). Root, perf.
"""
import os, re, statistics, subprocess, sys, tempfile
imago, home, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = tempfile.mktemp(prefix="launch-sched-")
loop = (f"for i in $(seq {n}); do id=$({imago} --home {home} run -q --network host busybox:bench "
        f"-- /bin/busybox sleep 1000); sleep 0.3; {imago} --home {home} stop --time 0 $id >/dev/null; "
        f"{imago} --home {home} rm $id >/dev/null; sleep 0.3; done")
subprocess.run(["perf", "sched", "record", "-a", "-o", data, "--", "bash", "-c", loop],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
out = subprocess.run(["perf", "sched", "timehist", "-i", data, "-s"], capture_output=True,
                     text=True).stdout
os.unlink(data)
rows = []
for l in out.splitlines():
    m = re.match(r"\s*(.+)\[(\d+)\]\s+(\d+)\s+(\d+)\s+([0-9.]+)", l)
    if m: rows.append(dict(comm=m[1], pid=int(m[2]), ppid=int(m[3]), rt=float(m[5])))
by_pid = {r["pid"]: r for r in rows}
kids = {}
for r in rows: kids.setdefault(r["ppid"], []).append(r)
res = {k: [] for k in ["cli", "warmup", "supervisor", "intermediate", "init", "validate", "sum"]}
for s in rows:
    if not s["comm"].startswith("imago-supervise"): continue
    cli = by_pid.get(s["ppid"])
    # Only this run's launches: other processes on the host may run supervisors too.
    if not cli or cli["comm"] != os.path.basename(imago)[:15]: continue
    warm = [k for k in kids.get(s["ppid"], []) if k["pid"] != s["pid"]]
    inter = [k for k in kids.get(s["pid"], []) if k["comm"].startswith("youki:[1:INTER]")]
    init = [k for k in kids.get(inter[0]["pid"] if inter else s["pid"], []) if k["comm"] == "busybox"]
    val = [k for k in kids.get(init[0]["pid"], []) if k["comm"].startswith("youki:[2")] if init else []
    got = dict(cli=cli["rt"], warmup=sum(w["rt"] for w in warm), supervisor=s["rt"],
               intermediate=sum(i["rt"] for i in inter), init=init[0]["rt"] if init else 0,
               validate=sum(v["rt"] for v in val))
    got["sum"] = sum(got.values())
    for k, v in got.items(): res[k].append(v)
print(f"{imago}: {len(res['sum'])} launches (first left out); load {open('/proc/loadavg').read().strip()}")
for k, v in res.items():
    v = v[1:] if len(v) > 1 else v
    if v: print(f"  {k:13} median {statistics.median(v):6.2f} ms  range {min(v):.2f}-{max(v):.2f}")
