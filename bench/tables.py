#!/usr/bin/env python3
"""BENCHMARKS.md's tables from bench/results/<target>.jsonl (the newest run of each label).

    python3 bench/tables.py            # prints Markdown
"""
import json
import pathlib

RESULTS = pathlib.Path(__file__).parent / "results"


def newest(target):
    """The newest run of each label; the sustained rates only from their newest series."""
    runs = {}
    path = RESULTS / f"{target}.jsonl"
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            runs[run["label"]] = run
    series = [r for l, r in runs.items() if l.startswith("sustained-")]
    if series:
        latest = max(series, key=lambda r: r["at"])["commit"]
        runs = {l: r for l, r in runs.items() if not l.startswith("sustained-") or r["commit"] == latest}
    return runs


def ms(value):
    return "–" if value is None else f"{value:.1f}"


def ratio(mine, ceiling):
    if not mine or not ceiling:
        return "–"
    return f"{mine / ceiling:.2f}×"


def integrity(run):
    text = f"{run['lost']}/{run['duplicates']}/{run['out_of_order']}"
    if run.get("misrouted") or run.get("arrived_unacknowledged"):
        text += f" (misrouted {run.get('misrouted')}, unacknowledged {run.get('arrived_unacknowledged')})"
    return text


def achieved(run):
    """Changes/s sent, flagged when under 90 % of the rate asked for."""
    rate, asked = run["mutations_per_sec"], run.get("requested_rate") or 0
    flag = f" (asked {asked:g}/s)" if asked and rate < 0.9 * asked else ""
    return f"{rate:,.1f}{flag}"


def held(runs):
    """The sustained run with the highest rate whose p99 stayed <= 100 ms at >= 90% of it."""
    best = None
    for label, run in runs.items():
        if not label.startswith("sustained-"):
            continue
        rate = int(label.split("-")[1])
        p99 = (run.get("latency") or {}).get("p99_ms")
        if p99 is not None and p99 <= 100 and run["mutations_per_sec"] >= 0.9 * rate:
            if best is None or rate > best[0]:
                best = (rate, run)
    return best


def main():
    ceiling = newest("ceiling")
    for backend, title in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        runs = newest(backend)
        if not runs:
            continue
        print(f"### {title}\n")
        fan, cfan = runs.get("fanout"), ceiling.get("fanout")
        if fan:
            print("(a) Fan-out: one change to 10,000 subscribers on 100 connections, 10 changes/s\n")
            print("| | changes/s sent | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | delivered / expected | lost/dup/out of order |")
            print("|---|---|---|---|---|---|---|---|---|")
            for name, run in (("syncgraph", fan), ("ceiling", cfan)):
                if run:
                    lat = run["latency"] or {}
                    print(f"| {name} | {achieved(run)} | {ms(lat.get('p50_ms'))} | {ms(lat.get('p90_ms'))} | {ms(lat.get('p99_ms'))} | "
                          f"{ms(lat.get('p999_ms'))} | {ms(lat.get('max_ms'))} | {run['delivered']:,} / {run['expected']:,} | {integrity(run)} |")
            if cfan:
                p99 = lambda r: (r["latency"] or {}).get("p99_ms")
                print(f"| syncgraph ÷ ceiling | | | | {ratio(p99(fan), p99(cfan))} | | | | |")
            print()
        sat, csat = runs.get("saturation"), ceiling.get("saturation")
        if sat:
            print("(b) Saturation: the same 10,000 subscribers, changes back to back\n")
            print("| | changes/s | deliveries/s | p99 ms | server CPU % | lost/dup/out of order |")
            print("|---|---|---|---|---|---|")
            for name, run in (("syncgraph", sat), ("ceiling", csat)):
                if run:
                    print(f"| {name} | {run['mutations_per_sec']:,.0f} | {run['deliveries_per_sec']:,.0f} | "
                          f"{ms((run['latency'] or {}).get('p99_ms'))} | {run['server_cpu_percent'] or 0:.0f} | {integrity(run)} |")
            if csat:
                print(f"| syncgraph ÷ ceiling | | {ratio(sat['deliveries_per_sec'], csat['deliveries_per_sec'])} | | | |")
            print()
        mine, theirs = held(runs), held(ceiling)
        tried = sorted(int(l.split("-")[1]) for l in runs if l.startswith("sustained-"))
        if tried:
            print("(c) Sustained writes: 100 subscribers over 100 channels, rising postMessage rates\n")
            print("| | rates tried | highest held (end-to-end p99 ≤ 100 ms) | its deliveries/s | its end-to-end p99 ms | its mutation p99 ms |")
            print("|---|---|---|---|---|---|")
            for name, best, source in (("syncgraph", mine, runs), ("ceiling", theirs, ceiling)):
                rates = sorted(int(l.split("-")[1]) for l in source if l.startswith("sustained-"))
                if best:
                    rate, run = best
                    print(f"| {name} | {', '.join(map(str, rates))} | {rate:,}/s ({run['mutations_per_sec']:,.0f} achieved) | "
                          f"{run['deliveries_per_sec']:,.0f} | {ms(run['latency']['p99_ms'])} | {ms((run['mutation_latency'] or {}).get('p99_ms'))} |")
                elif rates:
                    print(f"| {name} | {', '.join(map(str, rates))} | none | | | |")
            if mine and theirs:
                print(f"| syncgraph ÷ ceiling | | {ratio(mine[0], theirs[0])} | | | |")
            print()
        conn, sub = runs.get("idle-connections"), runs.get("idle-subscriptions")
        if conn or sub:
            print("(d) Memory: server RSS per idle connection (10,000 connections) and per idle subscription (10,000 on 100 connections)\n")
            print("| | KiB per idle connection | KiB per idle subscription | RSS before → connected → subscribed (MiB) |")
            print("|---|---|---|---|")
            for name, c, s in (("syncgraph", conn, sub), ("ceiling", ceiling.get("idle-connections"), ceiling.get("idle-subscriptions"))):
                per_c = c and c.get("rss_per_connection_kib")
                per_s = s and s.get("rss_per_subscription_kib")
                mib = lambda k: "–" if k is None else f"{k / 1024:.1f}"
                path = f"{mib(s['rss_before_kib'])} → {mib(s['rss_connected_kib'])} → {mib(s['rss_subscribed_kib'])}" if s else "–"
                print(f"| {name} | {'–' if per_c is None else f'{per_c:.1f}'} | {'–' if per_s is None else f'{per_s:.2f}'} | {path} |")
            print()
        mut, cmut = runs.get("mutations"), ceiling.get("mutations")
        if mut:
            print("(e) Mutations alone: postMessage over HTTP from 64 concurrent clients\n")
            print("| | mutations/s | p50 ms | p99 ms | failed | server CPU % |")
            print("|---|---|---|---|---|---|")
            for name, run in (("syncgraph", mut), ("ceiling", cmut)):
                if run:
                    lat = run["mutation_latency"] or {}
                    print(f"| {name} | {run['mutations_per_sec']:,.0f} | {ms(lat.get('p50_ms'))} | {ms(lat.get('p99_ms'))} | "
                          f"{run['publish_failed']} | {run['server_cpu_percent'] or 0:.0f} |")
            if cmut:
                print(f"| syncgraph ÷ ceiling | {ratio(mut['mutations_per_sec'], cmut['mutations_per_sec'])} | | | | |")
            print()


if __name__ == "__main__":
    main()
