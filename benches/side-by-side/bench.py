#!/usr/bin/env python3
"""Helpers for benches/side-by-side.sh (standard library only).

  bench.py fsync DIR ITERATIONS           median of a 4 KiB append + fdatasync in DIR,
                                          and of the same over zeros written ahead
  bench.py parse-wrk  KEY=VALUE... < out  one JSON result line from wrk's WRKJSON line
  bench.py parse-sovra KEY=VALUE... < out one JSON result line from sovra-load's line
  bench.py na KEY=VALUE...                a result line for a workload that was not run
  bench.py meta KEY=VALUE...              the run's description as a JSON object
  bench.py report RESULTS FSYNC META OUT  prints the table, writes OUT/side-by-side.{json,md}

KEY=VALUE pairs (engine, workload, clients, storage, raw) are copied into the
result line. Nothing here invents a number: a run that printed no result is
kept as failed, a workload that was not run as n/a.
"""

import json
import os
import re
import statistics
import sys
import time


def kv_args(args):
    out = {}
    for a in args:
        k, _, v = a.partition("=")
        out[k] = int(v) if k in ("clients", "wall_s") else v
    return out


def probe_syncs(fd, iterations, write):
    """Times `write(i)` + fdatasync `iterations` times (after a warm-up);
    returns the sorted latencies (ns) and the process CPU per sync (µs)."""
    for i in range(min(50, iterations)):  # warm-up: allocate, settle
        write(i)
        os.fdatasync(fd)
    times = []
    cpu0 = os.times()
    for i in range(iterations):
        t = time.perf_counter_ns()
        write(i)
        os.fdatasync(fd)
        times.append(time.perf_counter_ns() - t)
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    times.sort()
    return times, cpu * 1e6 / iterations


def quantile(times, p):
    return times[min(len(times) - 1, int(p * len(times)))] / 1000.0


def cmd_fsync(directory, iterations):
    """4 KiB appends, each followed by fdatasync, on a file opened O_APPEND
    (the bound); then the same 4 KiB writes over zeros written and synced
    beforehand, as the write-ahead log writes its groups (for the record:
    a sync that need not write the file's size)."""
    iterations = int(iterations)
    path = os.path.join(directory, "fsync-probe.%d" % os.getpid())
    buf = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        times, cpu_us = probe_syncs(fd, iterations, lambda i: os.write(fd, buf))
    finally:
        os.close(fd)
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        n = iterations + min(50, iterations)
        for _ in range(n):
            os.write(fd, bytes(4096))
        os.fsync(fd)
        over, over_cpu_us = probe_syncs(fd, iterations,
                                        lambda i: os.pwrite(fd, buf, (i % n) * 4096))
    finally:
        os.close(fd)
        os.unlink(path)

    def q(p):
        return quantile(times, p)

    print(json.dumps({
        "dir": directory,
        "iterations": iterations,
        "median_us": statistics.median(times) / 1000.0,
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "max_us": times[-1] / 1000.0,
        "cpu_us": cpu_us,
        "prealloc_median_us": statistics.median(over) / 1000.0,
        "prealloc_p99_us": quantile(over, 0.99),
        "prealloc_cpu_us": over_cpu_us,
    }))


def cmd_parse_wrk(args):
    rec = kv_args(args)
    text = sys.stdin.read()
    m = re.search(r"^WRKJSON (\{.*\})\s*$", text, re.M)
    if not m:
        rec["failed"] = True
    else:
        w = json.loads(m.group(1))
        e = w["errors"]
        rec.update({
            "ops": w["requests"],
            "seconds": w["duration_s"],
            "rate": w["rate"],
            "p50_us": w["p50_us"],
            "p90_us": w["p90_us"],
            "p99_us": w["p99_us"],
            "p999_us": w["p999_us"],
            "errors": e["connect"] + e["read"] + e["write"] + e["status"] + e["timeout"],
            "error_detail": e,
        })
    print(json.dumps(rec))


def cmd_parse_sovra(args):
    rec = kv_args(args)
    text = sys.stdin.read()
    line = None
    for ln in text.splitlines():
        if ln.startswith("mode=") and "throughput=" in ln:
            line = ln
    if line is None:
        rec["failed"] = True
    else:
        f = dict(p.split("=", 1) for p in line.split() if "=" in p)

        def us(k):
            return float(f[k].rstrip("us")) if k in f else None

        rec.update({
            "ops": int(f["ops"]),
            "seconds": float(f["seconds"]),
            "rate": float(f["throughput"].rstrip("/s")),
            "p50_us": us("p50"),
            "p90_us": us("p90"),
            "p99_us": us("p99"),
            "p999_us": us("p999"),
            "errors": int(f["errors"]),
        })
        # --mode batch-put: one op is a stream of records; rate in records/s.
        for ln in text.splitlines():
            if ln.startswith("records=") and "records_per_s=" in ln:
                g = dict(p.split("=", 1) for p in ln.split() if "=" in p)
                rec["streams_per_s"] = rec["rate"]
                rec["rate"] = float(g["records_per_s"])
    print(json.dumps(rec))


def cmd_meta(args):
    print(json.dumps(dict(a.partition("=")[::2] for a in args), indent=2))


def cmd_na(args):
    rec = kv_args(args)
    rec["na"] = True
    print(json.dumps(rec))


# What is compared with what. Sovra workloads are sovra-load modes.
SOVRA = [
    ("read", "GetFields, 1 field (audited)", "kv-read"),
    ("write", "PutRecord, 1 field, new customer, durable", "kv-write"),
    ("write-plain", "PutRecord, 1 plain field (no feature), new customer", "kv-write"),
    ("write-record", "PutRecord, whole 11-field record, new customer", "kv-write"),
    ("consent", "RecordConsent (grant) with receipt", None),
    ("batch-put", "BatchPut (the demo's)", None),
]
OPENBAO = [
    ("kv-read", "OpenBao KV-v2 read"),
    ("kv-write", "OpenBao KV-v2 write, new key"),
    ("transit-decrypt", "OpenBao Transit decrypt"),
]
SHORT = {"kv-read": "KV read", "kv-write": "KV write", "transit-decrypt": "Transit decrypt"}


def fmt_rate(x):
    return "—" if x is None else "{:,.0f}".format(x)


def fmt_ms(us):
    if us is None:
        return "—"
    ms = us / 1000.0
    return "%.2f ms" % ms if ms < 10 else "%.1f ms" % ms


def cmd_report(results_path, fsync_path, meta_path, out_dir):
    results = [json.loads(l) for l in open(results_path) if l.strip()]
    fsync = json.load(open(fsync_path))
    meta = json.load(open(meta_path))
    med_s = fsync["median_us"] / 1e6

    def find(engine, workload, clients, storage):
        for r in results:
            if (r.get("engine"), r.get("workload"), r.get("clients"), r.get("storage")) == (
                    engine, workload, clients, storage):
                return r
        return None

    clients_list = sorted({r["clients"] for r in results if "clients" in r})
    rows = []
    for mode, label, match in SOVRA:
        for c in clients_list:
            d = find("sovra", mode, c, "disk")
            if d is None:
                continue
            t = find("sovra", mode, c, "tmpfs")
            o = find("openbao", match, c, "disk") if match else None
            row = {"engine": "sovra", "workload": mode, "label": label, "clients": c,
                   "fsync_bound": c / med_s}
            if d.get("na"):
                row["note"] = "n/a (sovra-load has no such mode)"
            elif d.get("failed"):
                row["note"] = "failed (see %s)" % d.get("raw", "raw/")
            else:
                row.update({k: d[k] for k in ("rate", "p50_us", "p90_us", "p99_us", "p999_us",
                                              "errors", "ops")})
            if t and not t.get("na") and not t.get("failed"):
                row.update({"cpu_bound": t["rate"], "tmpfs_p50_us": t["p50_us"],
                            "tmpfs_p99_us": t["p99_us"], "tmpfs_errors": t["errors"]})
            if match:
                row["openbao_match"] = match
                if o and o.get("rate") is not None:
                    row["openbao_rate"] = o["rate"]
                    if row.get("rate") is not None and o["rate"] > 0:
                        row["ratio"] = row["rate"] / o["rate"]
            if row.get("rate") is not None:
                lower = min(x for x in (row["fsync_bound"], row.get("cpu_bound")) if x is not None)
                row["lower_bound"] = lower
                row["pct_of_lower_bound"] = 100.0 * row["rate"] / lower
            rows.append(row)
    for work, label in OPENBAO:
        for c in clients_list:
            d = find("openbao", work, c, "disk")
            if d is None:
                continue
            row = {"engine": "openbao", "workload": work, "label": label, "clients": c,
                   "fsync_bound": c / med_s}
            if d.get("failed"):
                row["note"] = "failed (see %s)" % d.get("raw", "raw/")
            else:
                row.update({k: d[k] for k in ("rate", "p50_us", "p90_us", "p99_us", "p999_us",
                                              "errors", "ops")})
                row["lower_bound"] = row["fsync_bound"]
                row["pct_of_lower_bound"] = 100.0 * row["rate"] / row["fsync_bound"]
            rows.append(row)

    head = ["workload", "clients", "rate/s", "p50", "p99", "errors", "vs OpenBao",
            "fsync bound/s", "CPU bound/s (tmpfs)", "% of lower bound"]
    with_notes = any("note" in r for r in rows)
    if with_notes:
        head.append("note")
    table = []
    for r in rows:
        if "note" in r and r.get("rate") is None:
            vs = "—"
            table.append([r["label"], str(r["clients"]), r["note"].split(" ")[0], "—", "—", "—",
                          vs, fmt_rate(r["fsync_bound"]), fmt_rate(r.get("cpu_bound")), "—",
                          r["note"]])
            continue
        if r["engine"] == "sovra" and r.get("openbao_match"):
            vs = ("%.2f× %s" % (r["ratio"], SHORT[r["openbao_match"]])) if "ratio" in r else \
                "— (no %s result)" % SHORT[r["openbao_match"]]
        else:
            vs = "—"
        table.append([
            r["label"], str(r["clients"]), fmt_rate(r["rate"]), fmt_ms(r["p50_us"]),
            fmt_ms(r["p99_us"]), str(r["errors"]), vs, fmt_rate(r["fsync_bound"]),
            fmt_rate(r.get("cpu_bound")) if r["engine"] == "sovra" else "—",
            "%.0f %%" % r["pct_of_lower_bound"]] + ([r.get("note", "")] if with_notes else []))

    m = meta
    intro = [
        "machine: %s, %s CPUs, %s, kernel %s, %s RAM" % (m["hostname"], m["nproc"], m["cpu_model"],
                                                       m["kernel"], m["mem"]),
        "commit: %s; sovra: %s (%s); sovra-load: %s (%s)" % (
            m["git_commit"], m["sovra_bin"], m["sovra_sha256"], m["sovra_load_bin"],
            m["sovra_load_sha256"]),
        "openbao: %s (raft storage, file audit device: %s entries written); wrk: %s, %s threads" % (
            m["bao_version"], m.get("openbao_audit_entries", "?"), m["wrk_version"], m["threads"]),
        "run: %s, %s s per test after 1 s of warm-up, clients %s, %s preloaded customers for "
        "GetFields/RecordConsent" % (m["date"], m["duration"], m["clients"], m["preload"]),
        "data dirs: %s (%s); tmpfs: %s (%s)" % (m["data_dir"], m["data_fs"], m["shm_dir"],
                                                m["shm_fs"]),
        "fsync: 4 KiB append + fdatasync in the data dirs' filesystem, median %.0f µs "
        "(p90 %.0f, p99 %.0f, %d iterations); fsync bound = clients / median" % (
            fsync["median_us"], fsync["p90_us"], fsync["p99_us"], fsync["iterations"]),
    ]
    if "prealloc_median_us" in fsync:
        intro.append(
            "sync CPU: %.0f µs per 4 KiB append + fdatasync; over zeros written beforehand (as the "
            "log writes its groups) median %.0f µs (p99 %.0f), %.0f µs of CPU" % (
                fsync["cpu_us"], fsync["prealloc_median_us"], fsync["prealloc_p99_us"],
                fsync["prealloc_cpu_us"]))
    notes = [
        "vs OpenBao: sovra rate / OpenBao rate at the same client count (GetFields vs KV read, "
        "PutRecord vs KV write).",
        "CPU bound: the same sovra workload with its data directory on tmpfs, where a sync costs "
        "nothing; % of lower bound = rate / min(fsync bound, CPU bound).",
        "OpenBao rows: % of the fsync bound only (OpenBao is not run on tmpfs); its reads and "
        "decrypts write no storage, so that bound does not limit them.",
        "The load generators run on the same machine as the servers.",
    ]

    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h)
              for i, h in enumerate(head)]
    numeric = {1, 2, 3, 4, 5, 7, 8, 9}

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    print()
    for s in intro:
        print(s)
    print()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print(line(row))
    print()
    for s in notes:
        print("  " + s)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "side-by-side.json"), "w") as f:
        json.dump({"meta": meta, "fsync": fsync, "rows": rows, "results": results}, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "side-by-side.md"), "w") as f:
        for s in intro:
            f.write("- " + s + "\n")
        f.write("\n| " + " | ".join(head) + " |\n")
        f.write("|" + "|".join("---:" if i in numeric else "---" for i in range(len(head))) + "|\n")
        for row in table:
            f.write("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |\n")
        f.write("\n")
        for s in notes:
            f.write("- " + s + "\n")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fsync":
        cmd_fsync(*args)
    elif cmd == "parse-wrk":
        cmd_parse_wrk(args)
    elif cmd == "parse-sovra":
        cmd_parse_sovra(args)
    elif cmd == "meta":
        cmd_meta(args)
    elif cmd == "na":
        cmd_na(args)
    elif cmd == "report":
        cmd_report(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
