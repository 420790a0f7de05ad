import json,sys,glob,os
d=sys.argv[1]
for f in sorted(glob.glob(os.path.join(d,'ab-*.json')), key=lambda p:(p.split('-')[-1], p)):
    j=json.load(open(f))
    out=[]
    for r in j['rows']+j.get('peak_rows',[]):
        ol=r.get('open_loop') or {}
        s=f"{r['workload']}@{r['callers']}: {int(r['calls_per_s'])} cpu {r.get('target_cpu_us_per_call') or 0:.2f} p99 {r['p99_ms']}"
        if ol: s+=f" | half p99 {ol['p99_ms']} p999 {ol['p999_ms']}"
        out.append(s)
    print(os.path.basename(f), ' ; '.join(out))
