import json,glob,statistics as st,collections
res=collections.defaultdict(list)
for f in sorted(glob.glob('runs/*.json')):
    arm,t,w,i=f.split('/')[-1][:-5].split('-',1)[0], None,None,None
    name=f.split('/')[-1][:-5]
    parts=name.split('-')
    arm=parts[0]; i=parts[-1]; w=parts[-2]; t='-'.join(parts[1:-2])
    d=json.load(open(f)); r=d['rows'][0]; o=r['open_loop']
    res[(t,w,arm)].append(dict(i=i,closed=r['calls_per_s'],c_h=r['cpu']['harness_cores']*1e6/r['calls_per_s'],c_t=r['target_cpu_us_per_call'],
        o_h=o['cpu']['harness_cores']*1e6/o['calls_per_s'],o_t=o['target_cpu_us_per_call'],p50=o['p50_ms'],p99=o['p99_ms'],p999=o['p999_ms'],stall=o['machine_stalls']['max_ms']))
for k in sorted(res):
    v=res[k]
    f=lambda key: "%s (%s)"%(round(st.median([x[key] for x in v]),2), ",".join(str(round(x[key],2)) for x in v))
    print(k, len(v))
    for key in ['closed','c_h','c_t','o_h','o_t','p50','p99','p999','stall']:
        print("   ",key,f(key))
