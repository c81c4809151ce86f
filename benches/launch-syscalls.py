#!/usr/bin/env python3
"""Syscalls of one launch (issue 15), up to the exec of the program.

    benches/launch-syscalls.py IMAGO HOME ROUNDS

One `imago run -q --network host busybox:bench -- /bin/busybox sleep 1000` per round under
`strace -f` (every syscall of every process); counts per launch: syscalls, processes, opens of
mountinfo and of a /proc/.../cgroup file, writes of a pid into a cgroup.procs (the engine's, not
the warm-up's `0`), clone/clone3/fork calls. Medians and every round's value. HOME holds
busybox:bench (benches/launch.sh makes one). Root, strace.
"""
import os, re, subprocess, sys, tempfile, time, statistics
imago, home, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def one():
    out = tempfile.mktemp(prefix="lw-strace-")
    p = subprocess.Popen(["strace", "-f", "-qq", "-o", out, imago, "--home", home, "run", "-q",
                          "--network", "host", "busybox:bench", "--", "/bin/busybox", "sleep", "1000"],
                         stdout=subprocess.PIPE, text=True)
    inst = p.stdout.readline().strip()
    time.sleep(1.0); p.kill(); p.wait()
    subprocess.run([imago, "--home", home, "stop", "--time", "0", inst], capture_output=True)
    subprocess.run([imago, "--home", home, "rm", inst], capture_output=True)
    lines = open(out).read().splitlines(); os.unlink(out)
    # up to the exec of the program (execve of /bin/busybox); the rest is the supervisor's run
    fds, c = {}, dict(syscalls=0, pids=set(), mountinfo=0, proc_cgroup=0, procs_writes=0, clones=0)
    for l in lines:
        m = re.match(r"(\d+)\s+(\w+)\(", l)
        if not m: continue
        pid, call = m[1], m[2]
        c["syscalls"] += 1; c["pids"].add(pid)
        if call in ("openat", "openat2", "open"):
            mm = re.search(r'"([^"]+)".*= (\d+)', l)
            if mm:
                fds[(pid, mm[2])] = mm[1]
                if mm[1].endswith("mountinfo"): c["mountinfo"] += 1
                if re.search(r"(^|/)cgroup$", mm[1]): c["proc_cgroup"] += 1
        if call in ("clone", "clone3", "fork", "vfork"): c["clones"] += 1
        if call == "write":
            mm = re.match(r'\d+\s+write\((\d+), "([^"]*)"', l)
            if mm and fds.get((pid, mm[1]), "").endswith("cgroup.procs") and mm[2] != "0":
                c["procs_writes"] += 1
        if call == "execve" and re.match(r"\d+\s+execve\(\"/bin/busybox\"", l): break
    c["pids"] = len(c["pids"])
    return c
rs = [one() for _ in range(rounds)]
for k in rs[0]:
    print(f"{k:14} median {statistics.median(r[k] for r in rs)}  all {[r[k] for r in rs]}")
