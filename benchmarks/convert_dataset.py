"""Time converting an IDX dataset (Fashion-MNIST by default) into the canonical file + manifest.

Reference, measured in the same run: just reading and gunzipping the same IDX files (the
least any converter must do). Prints the ratio convert / raw read last.

    .venv/bin/python benchmarks/convert_dataset.py [--source DIR] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from crowdd.data.datasets import convert, idx_files

T = TypeVar("T")
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def raw_read(source: Path) -> int:
    total = 0
    for path in idx_files(source).values():
        raw = path.read_bytes()
        total += len(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    return total


def timed(fn: Callable[[], T], repeat: int) -> tuple[list[float], T]:
    out = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
    return out, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="directory of IDX files")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write all figures here")
    args = ap.parse_args(argv)
    if not args.source.is_dir():
        print(f"{args.source}: not found (install Debian's dataset-fashion-mnist or pass --source)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="crowdd-bench-") as tmp:
        raw_bytes = raw_read(args.source)  # warm the page cache for both
        raw_times, _ = timed(lambda: raw_read(args.source), args.repeat)
        conv_times, prepared = timed(lambda: convert(args.source, Path(tmp)), args.repeat)
    layout = prepared.manifest.layout
    raw_s, conv_s = statistics.median(raw_times), statistics.median(conv_times)
    figures = {
        "source": str(args.source),
        "raw_idx_bytes": raw_bytes,
        "canonical_bytes": prepared.manifest.size,
        "records": layout.train_count + layout.test_count if layout else None,
        "raw_read_s": raw_times,
        "convert_s": conv_times,
        "raw_read_median_s": raw_s,
        "convert_median_s": conv_s,
        "ratio_convert_over_raw_read": conv_s / raw_s,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"raw gzip read: {raw_s:.3f} s   convert (load + write + sha256 manifest): {conv_s:.3f} s")
    print(f"canonical file: {prepared.manifest.size} bytes, {figures['records']} records")
    print(f"convert / raw read = {conv_s / raw_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
