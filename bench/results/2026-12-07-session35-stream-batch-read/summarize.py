import json,glob,os,sys,statistics as st
# Medians of the alternated pairs in the directory given (default: here).
os.chdir(sys.argv[1] if len(sys.argv) > 1 else '.')
rows={}
pairs=sorted({f.split('-')[-1].split('.')[0] for f in glob.glob('ab-old-*.json')})
for v in ['old','new']:
    for i in pairs:
        d=json.load(open(f'ab-{v}-{i}.json'))
        for r in d['rows']:
            k=(r['workload'],r['target'])
            ol=r.get('open_loop') or {}
            harness=r['cpu']['harness_cores']/r['calls_per_s']*1e6
            rows.setdefault(k,{}).setdefault(v,[]).append((r['calls_per_s'],r['target_cpu_us_per_call'],r['p99_ms'],ol.get('p99_ms'),ol.get('p999_ms'),ol.get('target_cpu_us_per_call'),harness))
names=["calls/s","cpu us/call","closed p99 ms","open p99 ms","open p999 ms","open cpu us/call","harness us/call"]
for k,vv in rows.items():
    o=vv['old'];n=vv['new']
    print(f"{k[0]} {k[1]}")
    for j,nm in enumerate(names):
        if any(x[j] is None for x in o+n):
            continue  # closed loop only: no open-loop figures
        f=lambda L: "/".join(f"{x[j]:.0f}" if x[j]>100 else f"{x[j]:.2f}" for x in L)
        mo=st.median(x[j] for x in o); mn=st.median(x[j] for x in n)
        print(f"  {nm:18s} old {f(o):28s} new {f(n):28s} medians {mo:.4g} -> {mn:.4g} ({(mn/mo-1)*100:+.1f}%)")
