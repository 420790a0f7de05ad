#!/usr/bin/env python3
"""Prints the README's two performance tables (Markdown) from a seqcompare
JSON of several rounds (`./scripts/compare.sh --rounds 3 --json FILE`).

    python3 bench/readme_table.py bench-results.json

A row is the round with the median calls/s (seqcompare's `rows`); "vs Redis
none" is the median of each round's own ratio to Redis without persistence
(same workload, same callers, same round), with the rounds' spread in the
peak table. "Rounds meeting both": rounds whose half-load run had p99 under
1 ms and p999 under 3 ms (DESIGN.md's target); a miss in whose window the
harness's real-time stall meter woke 3 ms or more late says so (its CPU ran
nothing else meanwhile; whether the slow calls overlapped it is not
checked). The peak table's last columns are the open-loop runs at half of
each round's peak (since session 40).
"""

import json
import statistics
import sys

TARGETS = {
    "seqd-1node": ("seqd 1 node", "Raft, fsync (majority of 1)"),
    "seqd-3node": ("seqd 3 nodes (`read_index`)", "Raft, fsync on 2 of 3"),
    "seqd-3node-raw": ("seqd 3 nodes, one RPC per call, no client", "Raft, fsync on 2 of 3"),
    "seqd-3node-lease": ("seqd 3 nodes, `read_mode = lease`", "Raft, fsync on 2 of 3"),
    "redis-none": ("Redis `INCR`, no persistence", "none (memory)"),
    "redis-always": ("Redis `INCR`, `appendfsync always`", "fsync every write, one node"),
    "etcd": ("etcd CAS txn", "Raft, fsync (one node)"),
}
BASE = "redis-none"
# DESIGN.md's half-load target, and the machine freeze a miss is blamed on.
P99_MS, P999_MS, FREEZE_MS = 1.0, 3.0, 3.0


def workload_name(w, s):
    return {
        "next": "Next ×1",
        "next-count": f"Next ×{s['count']}",
        "batch": f"NextBatch ×{s['fanout']}",
        "ids": f"NextIds ×{s['count']}",
    }[w]


def short(v):
    """A calls/s figure in a range: 222k, 5.3k, 486."""
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def ms(v):
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def spread(values, fmt=short, sep="–"):
    return f"{fmt(min(values))}{sep}{fmt(max(values))}"


def cpu(v):
    return f"{v:,.0f}" if v >= 1000 else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def per_round(data):
    """{(workload, target, callers): [round row, ...]} in round order."""
    out = {}
    for rows in data["round_rows"]:
        for r in rows:
            out.setdefault((r["workload"], r["target"], r["callers"]), []).append(r)
    return out


def ratios(rounds, key):
    """Each round's calls/s over Redis without persistence's in that round."""
    mine, base = rounds.get(key, []), rounds.get((key[0], BASE, key[2]), [])
    return [
        a["calls_per_s"] / b["calls_per_s"]
        for a, b in zip(mine, base)
        if a.get("status") == "ok" and b.get("status") == "ok" and b["calls_per_s"] > 0
    ]


def meeting(rounds):
    """'3 of 3', or with the misses' machine freezes named."""
    ols = [r["open_loop"] for r in rounds if r.get("open_loop")]
    met = [o for o in ols if o["p99_ms"] < P99_MS and o["p999_ms"] < P999_MS]
    text = f"{len(met)} of {len(ols)}"
    frozen = [
        o["machine_stalls"]["max_ms"]
        for o in ols
        if o not in met and (o.get("machine_stalls") or {}).get("max_ms", 0) >= FREEZE_MS
    ]
    if frozen:
        what = "a miss" if len(frozen) == 1 else "misses"
        text += (
            f" ({what}; the stall meter woke {', '.join(f'{f:.1f}' for f in frozen)} ms late "
            "in the window)"
        )
    return text


def main_table(data, rounds):
    s = data["settings"]
    lines = [
        "| workload | target | durability | calls/s: median (rounds) | vs Redis none "
        "| p50 / p99 / p999 ms | target CPU µs/call | half load: p99 / p999 ms (rounds' p99) "
        "| rounds meeting both | machine stall max ms (rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = None
    for r in data["rows"]:
        if r.get("status") != "ok":
            continue
        key = (r["workload"], r["target"], r["callers"])
        name, durability = TARGETS.get(r["target"], (r["target"], r["durability"]))
        wl = workload_name(r["workload"], s) if r["workload"] != last else ""
        last = r["workload"]
        rs = [x for x in rounds.get(key, []) if x.get("status") == "ok"]
        calls = f"{r['calls_per_s']:,.0f} ({spread([x['calls_per_s'] for x in rs])})"
        vs = ratios(rounds, key)
        vs = f"{statistics.median(vs):.2f}×" if vs and r["workload"] != "ids" else "—"
        lat = f"{ms(r['p50_ms'])} / {ms(r['p99_ms'])} / {ms(r['p999_ms'])}"
        ol = r.get("open_loop")
        ols = [x["open_loop"] for x in rs if x.get("open_loop")]
        half = (
            f"{ms(ol['p99_ms'])} / {ms(ol['p999_ms'])} "
            f"({spread([o['p99_ms'] for o in ols], ms)})"
            if ol
            else "—"
        )
        stalls = [o["machine_stalls"]["max_ms"] for o in ols if o.get("machine_stalls")]
        stall = spread(stalls, lambda v: f"{v:.1f}") if stalls else "—"
        lines.append(
            f"| {wl} | {name} | {durability} | {calls} | {vs} | {lat} "
            f"| {cpu(r['target_cpu_us_per_call'])} | {half} | {meeting(rs)} | {stall} |"
        )
    return "\n".join(lines)


def peak_table(data, rounds):
    s = data["settings"]
    points = [s["callers"]] + list(s.get("peak_callers") or [])
    targets = [t for t in TARGETS if any(k[1] == t and k[2] != s["callers"] for k in rounds)]
    head = " | ".join(f"{c} callers" for c in points)
    lines = [
        f"| target | {head} | peak | vs Redis none at the same callers "
        "| half of peak: offered/s, p99 / p999 ms (medians) | rounds meeting both |",
        "|---" * (len(points) + 5) + "|",
    ]
    for t in targets:
        cells, best, vs = [], None, []
        for c in points:
            rs = [x for x in rounds.get(("next", t, c), []) if x.get("status") == "ok"]
            if not rs:
                cells.append("—")
                continue
            med = statistics.median_low([x["calls_per_s"] for x in rs])
            cells.append(f"{med:,.0f} ({spread([x['calls_per_s'] for x in rs])})")
            if best is None or med > best[0]:
                best = (med, c)
            rv = ratios(rounds, ("next", t, c))
            if rv:
                vs.append(
                    f"{c}: {statistics.median(rv):.2f}× ({spread(rv, lambda v: f'{v:.2f}')})"
                )
        peak = f"{best[0]:,.0f} at {best[1]}" if best else "—"
        # The open-loop runs after the last point, at half of each round's
        # peak (since session 40).
        last = [x for x in rounds.get(("next", t, points[-1]), []) if x.get("status") == "ok"]
        ols = [x["open_loop"] for x in last if x.get("open_loop")]
        if ols:
            def med(k):
                return statistics.median([o[k] for o in ols])

            half = f"{med('offered_per_s'):,.0f}, {ms(med('p99_ms'))} / {ms(med('p999_ms'))}"
            met = meeting(last)
        else:
            half, met = "—", "—"
        lines.append(
            f"| {TARGETS[t][0]} | {' | '.join(cells)} | {peak} | {', '.join(vs)} | {half} | {met} |"
        )
    return "\n".join(lines)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: readme_table.py SEQCOMPARE_JSON (a run of --rounds 3 or more)")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    rounds = per_round(data)
    print(main_table(data, rounds))
    print()
    print(peak_table(data, rounds))


if __name__ == "__main__":
    main()
