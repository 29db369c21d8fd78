"""Replication benchmark: N namespaced hosts, every link shaped to RATE, one random file.

    python benchmarks/replication.py --nodes 16 --size 64MiB --rate 100mbit --json out.json

Builds N network namespaces on a bridge (root only), shapes every host's uplink and
downlink with ``tc tbf`` to RATE, runs one real node process per host and replicates a
random file of SIZE from node 0. Every connection is what real nodes use: TLS 1.3, mutual,
pinned to the group's identities (one made per node), with the token proof inside. Reports
the wall time (peer list sent → last node holds a verified copy) next to the theory for the
same run, B = RATE:

    star     N·S/B        binomial ceil(log2 N)·S/B        chain S/B

(a chain forwards whole verified chunks, so it cannot beat (S + (N-1)·CHUNK)/B: the JSON's
``floor_s``).

and prints the ratio time/theory, each against its target (binomial ≤ 1.15,
chain ≤ 1.15; star has none), then star/binomial when both ran, and LAST the default route's
(``crowdd.route.DEFAULT_ROUTE``, chain) time against S/B, the floor of any route (target
≤ 1.15); exits 1 when a target is missed. The default runs the default route with the
default chunk size (what ships); ``--route all`` runs all three.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdd.config import ReplicationConfig
from crowdd.data.manifest import Manifest
from crowdd.route import DEFAULT_ROUTE
from crowdd.testing.netns import NetnsLab, NetnsUnavailable, Shape
from crowdd.testing.replication_cluster import NodeCluster

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
               "g": 10**9, "gb": 10**9, "gib": 1 << 30}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 67108864, 64MiB, 100MB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(text: str) -> tuple[str, float]:
    """'100mbit' (tc syntax, also '100Mbit/s') → ('100mbit', bytes per second)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?bit)(?:/s|ps)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (e.g. 100mbit)")
    bits = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    return f"{m.group(1)}{m.group(2)}", bits / 8


ROUTES = ("binomial", "chain", "star")
#: time/theory each route must stay within (over TLS, on shaped links).
TARGETS = {"binomial": 1.15, "chain": 1.15}
#: the default route's time over S/B (the issue's target for what ships).
DEFAULT_TARGET = 1.15


def parse_routes(text: str) -> list[str]:
    """'all' or a comma-separated list of binomial, chain, star."""
    if text == "all":
        return list(ROUTES)
    routes = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in routes if r not in ROUTES]
    if bad or not routes:
        raise argparse.ArgumentTypeError(f"bad route list {text!r}: use 'all' or some of {', '.join(ROUTES)}")
    return list(dict.fromkeys(routes))


def theory(route: str, n: int, size: int, bps: float) -> float:
    t = size / bps
    if route == "star":
        return n * t
    if route == "binomial":
        return math.ceil(math.log2(n)) * t if n > 1 else 0.0
    return t


def run_route(lab: NetnsLab, route: str, args: argparse.Namespace, workdir: Path, src: Path, mpath: Path,
              bps: float) -> dict[str, Any]:
    rundir = workdir / route
    cluster = NodeCluster(
        rundir, n=args.nodes, token=secrets.token_hex(16), manifest_path=mpath, route=route,
        stall_timeout=args.stall_timeout, launch=lab.popen, address=lambda i: lab.hosts[i].ip,
        extra={0: {"serve_file": str(src)}},
    )
    try:
        cluster.start(timeout=120)
        time.sleep(0.5)
        t0 = cluster.go()
        done = cluster.wait_done(timeout=args.timeout)
        errors = {i: e.get("message") for i, e in done.items() if e["event"] != "done"}
        if errors:
            raise SystemExit(f"{route}: nodes failed: {errors}")
        times = {i: e["t"] - t0 for i, e in done.items()}
        cpu = {i: e.get("cpu") for i, e in done.items()}
    finally:
        cluster.close()
        shutil.rmtree(rundir, ignore_errors=True)
    wall = max(times.values())
    ref = theory(route, args.nodes, args.size, bps)
    ratio = wall / ref if ref else None
    target = TARGETS.get(route)
    floor = (args.size + (args.nodes - 1) * min(args.chunk_size, args.size)) / bps if route == "chain" else ref
    return {"route": route, "transport": "TLS 1.3, mutual, pinned", "wall_s": round(wall, 3),
            "theory_s": round(ref, 3), "floor_s": round(floor, 3),
            "ratio": round(ratio, 4) if ratio is not None else None,
            "target": target, "within_target": None if target is None or ratio is None else ratio <= target,
            "per_node_s": {str(i): round(t, 3) for i, t in sorted(times.items())},
            "cpu_s_per_node": {str(i): c for i, c in sorted(cpu.items())},
            "loadavg_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--size", type=parse_size, default=64 << 20, help="bytes (suffixes: MiB, MB, ...)")
    p.add_argument("--rate", type=parse_rate, default=parse_rate("100mbit"), help="tc rate, e.g. 100mbit")
    p.add_argument("--route", type=parse_routes, default=[DEFAULT_ROUTE],
                   help=f"'all' or a comma-separated list of binomial, chain, star (default: {DEFAULT_ROUTE})")
    p.add_argument("--chunk-size", type=parse_size, default=ReplicationConfig().chunk_size, help="default: the shipped default")
    p.add_argument("--burst", default="256kb", help="tbf bucket; smaller than a GSO packet (64 KiB) makes tbf split packets and burn CPU")
    p.add_argument("--latency", default="50ms")
    p.add_argument("--stall-timeout", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds per route")
    p.add_argument("--workdir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    p.add_argument("--json", type=Path, help="write all figures here")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error("--nodes must be at least 2")
    if args.size < 1:
        p.error("--size must be positive")
    rate_tc, bps = args.rate
    routes: list[str] = args.route

    workdir = Path(tempfile.mkdtemp(prefix="crowdd-bench-", dir=args.workdir))
    results = []
    try:
        src = workdir / "data.bin"
        with open(src, "wb") as fh:
            left = args.size
            while left:
                block = os.urandom(min(left, 1 << 20))
                fh.write(block)
                left -= len(block)
        manifest = Manifest.build(src, chunk_size=args.chunk_size, name="bench")
        mpath = workdir / "manifest.json"
        mpath.write_bytes(manifest.to_json())
        try:
            lab = NetnsLab(args.nodes, shape=Shape(rate_tc, args.burst, args.latency))
            lab.setup()
        except NetnsUnavailable as exc:
            print(f"cannot run: {exc}", file=sys.stderr)
            return 2
        try:
            for route in routes:
                res = run_route(lab, route, args, workdir, src, mpath, bps)
                results.append(res)
                print(f"{route:9s} N={args.nodes} S={args.size} B={rate_tc} over TLS: wall {res['wall_s']:.2f} s, "
                      f"theory {res['theory_s']:.2f} s, ratio {res['ratio']:.3f}", flush=True)
        finally:
            lab.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    out: dict[str, Any] = {"nodes": args.nodes, "size": args.size, "rate": rate_tc, "rate_bytes_per_s": bps,
                           "chunk_size": args.chunk_size, "burst": args.burst, "latency": args.latency,
                           "transport": "TLS 1.3, mutual, pinned to the group", "cpus": os.cpu_count(),
                           "routes": results}
    by = {r["route"]: r for r in results}
    if "star" in by and "binomial" in by:
        out["star_over_binomial"] = round(by["star"]["wall_s"] / by["binomial"]["wall_s"], 3)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    for r in results:
        verdict = "" if r["target"] is None else f" (target <= {r['target']}: {'ok' if r['within_target'] else 'MISSED'})"
        print(f"ratio time/theory ({r['route']}): {r['ratio']:.3f}{verdict}")
    if "star_over_binomial" in out:
        print(f"star/binomial: {out['star_over_binomial']:.2f}")
    ok = all(r["within_target"] is not False for r in results)
    if DEFAULT_ROUTE in by:
        over = by[DEFAULT_ROUTE]["wall_s"] / (args.size / bps)
        out["default_route"] = {"route": DEFAULT_ROUTE, "time_over_s_b": round(over, 4), "target": DEFAULT_TARGET}
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        ok = ok and over <= DEFAULT_TARGET
        print(f"default route ({DEFAULT_ROUTE}) N={args.nodes}: time/(S/B) {over:.3f} "
              f"(target <= {DEFAULT_TARGET}: {'ok' if over <= DEFAULT_TARGET else 'MISSED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
