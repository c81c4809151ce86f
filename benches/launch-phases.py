#!/usr/bin/env python3
"""Wall-clock phases of `imago run` (issue 15): where one launch waits, not only where it
spends CPU.

    benches/launch-phases.py IMAGO HOME N

Records N launches of `imago run -q --network host busybox:bench -- /bin/busybox sleep 1000`
(each stopped and removed 0.3 s later) with `perf record -a` of the scheduler's events
(switch, wakeup, fork, exec, exit, run time), then splits each launch at its hand-offs: the
CLI's exec, the fork of the supervisor, the supervisor's clone of the container init, the
init's exec of the program, the CLI's exit; and each process's share of its phase into
running, runnable (waiting for a CPU) and asleep (waiting for something: a lock, a pipe, a
child; `perf sched timehist` may count a preempted task's time off the CPU here too). Medians over the N launches, each launch's figure in brackets. HOME holds
busybox:bench (benches/launch.sh makes one). Root, perf.
"""
import os, re, subprocess, sys, statistics, collections, tempfile
imago, home, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = tempfile.mktemp(prefix="launch-phases-")
loop = (f"for i in $(seq {n}); do id=$({imago} --home {home} run -q --network host busybox:bench "
        f"-- /bin/busybox sleep 1000); sleep 0.3; {imago} --home {home} stop --time 0 $id >/dev/null; "
        f"{imago} --home {home} rm $id >/dev/null; sleep 0.3; done")
events = ",".join("sched:" + e for e in ["sched_switch", "sched_waking", "sched_wakeup_new",
                  "sched_process_fork", "sched_process_exec", "sched_process_exit",
                  "sched_stat_runtime", "sched_migrate_task"])
print(f"load before: {open('/proc/loadavg').read().strip()}")
subprocess.run(["perf", "record", "-a", "-o", data, "-e", events, "--", "bash", "-c", loop],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
print(f"load after: {open('/proc/loadavg').read().strip()}")
cli_comm = os.path.basename(imago)[:15]
ev = subprocess.run(["perf","script","-i",data,"-F","comm,pid,tid,time,event,trace"],capture_output=True,text=True).stdout
forks=[]; execs={}; exits={}; comm_of={}
for l in ev.splitlines():
    m=re.match(r'\s*(.+?)\s+(\d+)/(\d+)\s+([0-9.]+):\s+sched:(\w+):\s*(.*)',l)
    if not m: continue
    comm,pid,tid,t,e,tr=m[1],int(m[2]),int(m[3]),float(m[4])*1000,m[5],m[6]
    if e=='sched_process_fork':
        c=int(re.search(r'child_pid=(\d+)',tr)[1]); forks.append((t,tid,c,comm))
    elif e=='sched_process_exec':
        execs.setdefault(tid,[]).append((t,re.search(r'filename=(\S+)',tr)[1]))
    elif e=='sched_process_exit':
        exits[tid]=t
th=subprocess.run(["perf","sched","timehist","-i",data],capture_output=True,text=True).stdout
segs=collections.defaultdict(list)  # tid -> (end, wait, delay, run)
for l in th.splitlines():
    m=re.match(r'\s*([0-9.]+)\s+\[\d+\]\s+(.+?)\[(\d+)(?:/\d+)?\]\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)',l)
    if m: segs[int(m[3])].append((float(m[1])*1000,float(m[4]),float(m[5]),float(m[6])))
children=collections.defaultdict(list)
for t,p,c,comm in forks: children[p].append((t,c))
def split(tid,a,b):
    """run, runnable-wait, sleep of tid within [a,b] (segments ending in the window)"""
    r=d=s=0
    for end,w,dl,rn in segs.get(tid,[]):
        start=end-rn
        if end<=a or start-dl-w>=b: continue
        r+=max(0,min(end,b)-max(start,a)); 
        ds=start-dl; d+=max(0,min(start,b)-max(ds,a))
        ws=ds-w; s+=max(0,min(ds,b)-max(ws,a))
    return r,d,s
rows=[]
for t,p,c,comm in forks:
    ex=[e for e in execs.get(c,[]) if cli_comm in e[1][-15:] or e[1].endswith('imago')]
    if not ex: continue
    kids=sorted(children.get(c,[]))
    if len(kids)<1: continue
    # the supervisor: the child that forks
    sup=[k for k in kids if children.get(k[1])]
    if not sup: continue
    tsup,sp=sup[0]; warm=[k for k in kids if k[1]!=sp]
    init=sorted(children[sp])[0]; tinit,ip=init
    bx=[e for e in execs.get(ip,[]) if 'busybox' in e[1]]
    if not bx or c not in exits: continue
    texec=bx[0][0]; tend=exits[c]
    ph=dict(start=t, exec_cli=ex[0][0], fork_sup=tsup, clone_init=tinit, exec_prog=texec, cli_exit=tend)
    ph['cli_run_to_fork']=split(c,t,tsup)
    ph['sup_run_to_clone']=split(sp,tsup,tinit)
    ph['init_run_to_exec']=split(ip,tinit,texec)
    ph['cli_tail']=split(c,texec,tend)
    rows.append(ph)
os.unlink(data)
print(f"{imago}: {len(rows)} launches")
keys=[('exec of CLI (fork..exec done)','start','exec_cli'),('CLI until supervisor forked','exec_cli','fork_sup'),
      ('supervisor until init cloned','fork_sup','clone_init'),('init until program exec','clone_init','exec_prog'),
      ('program exec until CLI exit','exec_prog','cli_exit'),('total','start','cli_exit')]
for name,a,b in keys:
    v=[r[b]-r[a] for r in rows]
    print(f"{name:34} median {statistics.median(v):6.2f} ms  ({' '.join(f'{x:.1f}' for x in v)})")
for k in ['cli_run_to_fork','sup_run_to_clone','init_run_to_exec','cli_tail']:
    for i,n in enumerate(['run','runnable','sleep']):
        v=[r[k][i] for r in rows]
        print(f"  {k:18} {n:9} median {statistics.median(v):6.2f}  ({' '.join(f'{x:.1f}' for x in v)})")
