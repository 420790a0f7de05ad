import sys,json,glob,statistics as st,collections
res=collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1] + '/*-*-*.json')):
    arm,w,i=f.split('/')[-1][:-5].split('-')
    d=json.load(open(f)); r=d['rows'][0]; o=r['open_loop']
    res[(w,arm)].append(dict(closed=r['calls_per_s'],ct=r['target_cpu_us_per_call'],ot=o['target_cpu_us_per_call'],p50=o['p50_ms'],p99=o['p99_ms'],p999=o['p999_ms'],node99=o['node']['p99_at_most_ms'],stall=o['machine_stalls']['max_ms']))
for k in sorted(res):
    v=res[k]
    print(k,len(v))
    for key in ['closed','ct','ot','p50','p99','p999','node99','stall']:
        xs=[x[key] for x in v]
        print("   %-7s median %8.2f  (%s)"%(key,st.median(xs),", ".join("%.2f"%x for x in xs)))
