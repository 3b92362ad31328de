# Joins the wall-clock marks of docs/probes/c1-latency.patch (files MTOR_LAT.PID
# from the nodes and the bench) per query and prints each step's median, as in
# docs/benchmarks.md, "Where c = 1's added millisecond goes". c = 1 only.
# Usage: python3 c1-latency.py BENCH-FILE WORKER-FILE BRIDGE-FILE  (or BENCH-FILE NODE-FILE)
import sys, statistics
ev=[]
for f in sys.argv[1:]:
    for line in open(f):
        s,t=line.split(); ev.append((int(t),int(s)))
ev.sort()
qs=[];cur=None
for t,s in ev:
    if s==0:
        cur={0:t}; qs.append(cur)
    elif cur is not None and s not in cur:
        cur[s]=t
names={1:'router.Query',2:'NewStream ret',3:'request written',5:'worker handleStream',6:'worker serve',7:'backend before post',8:'backend post returned',9:'first NextBytes call',10:'first SendText',4:'router first event',12:'bridge sse.queue',13:'sse.write start',14:'sse.write end',15:'worker serve returns',16:'router Done',17:'handler returns',20:'BACKEND handler entry',21:'BACKEND body read',22:'BACKEND first token sent',23:'client.Do call',18:'before settle',19:'after settle',24:'bridge query returned',25:'before stop',26:'after stop'}
qs=qs[200:-50]
order=sorted(names, key=lambda k: statistics.median([q[k]-q[0] for q in qs if k in q]) if any(k in q for q in qs) else 1e18)
prev=0
for k in order:
    v=[q[k]-q[0] for q in qs if k in q]
    if not v: continue
    m=statistics.median(v)/1000
    print(f"{names[k]:28s} n={len(v):5d} p50 {m:8.1f} us  (+{m-prev:6.1f})")
    prev=m
