#!/usr/bin/env python3
"""Aggregate the fio JSON files of one scripts/bench run into one table.

Usage: report.py RESULTS_DIR ROWS PEERS

RESULTS_DIR holds one file per cell, named ROW.PEER.rROUND.json, as written by
fio --output-format=json --output=FILE (anything before the first '{' is
skipped: fio's nbd engine prints "fio: connected to NBD server" on stdout).
ROWS and PEERS are comma-separated, in the order to print them.

Per cell it takes, from the job's read or write side (the one that moved data):

    iops     read.iops / write.iops
    MB/s     bw_bytes / 1e6
    p50 p99  clat_ns percentiles, in µs; for the fsync row the flush's
             sync.lat_ns percentiles instead (the flush dominates the cycle)

and prints, per row and peer, the median over rounds, with min..max of IOPS.
Ratios are median stor IOPS / median peer IOPS. A second table gives the
server's CPU time per I/O (from ROW.PEER.rROUND.cpu: "TICKS HZ", the
server's utime+stime+cutime+cstime over the cell) and the cores it kept busy. The row with the lowest
stor/FIRST-OTHER-PEER ratio is written to RESULTS_DIR/worst-row as
"ROW PEER RATIO", for the profile.
"""

import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON in fio output")
    return json.loads(text[start:])


def cell(path, row):
    job = load(path)["jobs"][0]
    if job.get("error"):
        raise ValueError(f"{path}: fio job error {job['error']}")
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    if row.endswith("fsync") and "sync" in job:
        pct = job["sync"]["lat_ns"].get("percentile", pct)
    cpu_us, cores = None, None
    cpu_path = path[: -len(".json")] + ".cpu"
    if os.path.exists(cpu_path):
        with open(cpu_path) as f:
            ticks, hz = (float(x) for x in f.read().split())
        secs = ticks / hz
        if side.get("total_ios"):
            cpu_us = secs * 1e6 / side["total_ios"]
        if job.get("job_runtime"):
            cores = secs / (job["job_runtime"] / 1e3)
    return {
        "cpu_us": cpu_us,
        "cores": cores,
        "iops": side["iops"],
        "mbs": side["bw_bytes"] / 1e6,
        "p50": pct.get("50.000000", 0) / 1e3,
        "p99": pct.get("99.000000", 0) / 1e3,
    }


def kfmt(v):
    if v >= 100_000:
        return f"{v / 1000:.0f}k"
    if v >= 10_000:
        return f"{v / 1000:.1f}k"
    if v >= 1000:
        return f"{v / 1000:.2f}k"
    return f"{v:.0f}"


def nfmt(v):
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(lines):
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    def fmt(l):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |"
    out = [fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(l) for l in lines[1:]]
    print("\n".join(out))


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    results, rows, peers = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    cells = {}  # (row, peer) -> [cell]
    for name in sorted(os.listdir(results)):
        if not name.endswith(".json"):
            continue
        parts = name[: -len(".json")].split(".")
        if len(parts) != 3:
            continue
        row, peer, _round = parts
        try:
            cells.setdefault((row, peer), []).append(cell(os.path.join(results, name), row))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            print(f"bench: skipping {name}: {e}", file=sys.stderr)

    med = {}
    for key, cs in cells.items():
        iops = [c["iops"] for c in cs]
        med[key] = {
            "n": len(cs),
            "iops": statistics.median(iops),
            "min": min(iops),
            "max": max(iops),
            "mbs": statistics.median(c["mbs"] for c in cs),
            "p50": statistics.median(c["p50"] for c in cs),
            "p99": statistics.median(c["p99"] for c in cs),
            "cpu_us": median_or_none([c["cpu_us"] for c in cs]),
            "cores": median_or_none([c["cores"] for c in cs]),
        }

    others = [p for p in peers if p != "stor"]
    head = ["row"]
    for p in peers:
        head += [f"{p} IOPS (min..max)", "MB/s", "p50 µs", "p99 µs"]
    head += [f"stor/{p}" for p in others]
    lines = [head]
    worst, worst_ratio = None, None
    for row in rows:
        line = [row]
        for p in peers:
            m = med.get((row, p))
            if m is None:
                line += ["-", "-", "-", "-"]
                continue
            line += [
                f"{kfmt(m['iops'])} ({kfmt(m['min'])}..{kfmt(m['max'])})",
                nfmt(m["mbs"]),
                nfmt(m["p50"]),
                nfmt(m["p99"]),
            ]
        for p in others:
            s, o = med.get((row, "stor")), med.get((row, p))
            if s is None or o is None or o["iops"] == 0:
                line.append("-")
                continue
            r = s["iops"] / o["iops"]
            line.append(f"{r:.2f}")
            if p == others[0] and (worst_ratio is None or r < worst_ratio):
                worst, worst_ratio = row, r
        lines.append(line)

    table(lines)
    rounds = sorted({m["n"] for m in med.values()})
    print()
    print(f"IOPS: median over {'/'.join(map(str, rounds))} round(s), min..max in brackets; "
          "MB/s and latencies: medians; latency is fio's completion latency "
          "(the fsync row: the flush's latency).")

    if any(m["cpu_us"] is not None for m in med.values()):
        print()
        head = ["row"] + [f"{p} CPU µs/op (cores)" for p in peers] + [f"stor/{p} CPU/op" for p in others]
        lines = [head]
        for row in rows:
            line = [row]
            for p in peers:
                m = med.get((row, p))
                if m is None or m["cpu_us"] is None:
                    line.append("-")
                    continue
                line.append(f"{nfmt(m['cpu_us'])} ({m['cores']:.2f})" if m["cores"] is not None else nfmt(m["cpu_us"]))
            for p in others:
                s, o = med.get((row, "stor")), med.get((row, p))
                if s is None or o is None or not s["cpu_us"] or not o["cpu_us"]:
                    line.append("-")
                    continue
                line.append(f"{s['cpu_us'] / o['cpu_us']:.2f}")
            lines.append(line)
        table(lines)
        print()
        print("Server CPU time (user+system, threads and reaped children, from /proc/PID/stat) "
              "per I/O and in cores busy, medians; fio's own CPU is not counted. "
              "Less sensitive to a shared machine than IOPS; a CPU/op ratio below 1 favours stor.")
    if worst is not None:
        with open(os.path.join(results, "worst-row"), "w") as f:
            f.write(f"{worst} {others[0]} {worst_ratio:.2f}\n")


if __name__ == "__main__":
    main()
