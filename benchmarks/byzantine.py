"""Bad workers against the host's validation: accuracy, time to accuracy, expulsions, cost.

Every run is a real crowdd cluster on this machine (host job + 3 worker jobs on loopback),
Fashion-MNIST, 784-100-10 MLP, plain SGD, lr 0.5, batch 100, `full` sharding, an evaluation
every 2 s of training. Bad workers come from the host job's test-only hook
(``CROWDD_TEST_BYZANTINE``, :mod:`crowdd.job.byzantine`): with 1 bad member slot 3 is bad,
with 2 bad slots 2 and 3 (slot 0 is the host's own trainer and is never bad). The clean run
(0 bad; validation on, as always) is measured once in the same invocation and is every
attack's reference. For each attack mode and bad count the script prints:

* the final test accuracy and its difference from the clean run's, in points;
* the time to ``--target`` test accuracy (the first ``eval`` event at or above it: its
  ``train_seconds``, the training loop's wall time with evaluations) and its ratio to the
  clean run's;
* the share of honest members' changes the validator rejected (slots 1-3 not bad; slot 0,
  the host's own, is only checked for form and is left out), from ``out/validation.jsonl``;
* for each bad slot, how many of its changes were checked up to and including the one that
  got it expelled ("never" if it was not);
* the host's validation CPU (``done.validation.check_cpu_seconds``, the coordinator thread's
  CPU time inside the checks) over the training wall time (the last eval's
  ``train_seconds``): the share of one core that validation takes while training.

Targets (the issue's): time to target <= 1.3x clean with 1 bad, <= 1.5x with 2 bad;
accuracy within 1 point (1 bad) / 2 points (2 bad) of clean; each bad member expelled within
3 of its changes; honest changes rejected <= 2%; validation <= 10% of the host's CPU. The
last line is the worst time-to-target ratio and whether every target was met.

    .venv/bin/python benchmarks/byzantine.py [--attacks sign-flip,alie] [--bad 1,2] [--epochs 5]
        [--target 0.85] [--repeats 1] [--json out.json]

Measured: one run of each cell on a shared 2-core VM (other engineers' jobs ran beside it;
load average between 6 and 16 for most of it, so the times are noisy: whole runs took up to
2.2x the clean run's training time, even where the bad members were out after 3 changes),
``nice -n 10 .venv/bin/python benchmarks/byzantine.py --json /tmp/byz-full.json`` (26 min)::

    attack       bad accuracy  Δ pts  t→target  ratio  honest rejected  checks to expel    CPU
    none           0   0.8825  +0.00     20.0s   1.00       0/43  0.0%                -   1.4%
    nan            1   0.8829  +0.04     24.9s   1.24       0/40  0.0%              3:1   1.3%
    nan            2   0.8833  +0.08     25.7s   1.29       0/28  0.0%          2:1,3:1   1.1%
    scale100       1   0.8813  -0.12     22.8s   1.14       0/41  0.0%              3:3   1.1%
    scale100       2   0.8880  +0.55     17.2s   0.86       0/30  0.0%          2:3,3:3   1.1%
    sign-flip      1   0.8869  +0.44     18.2s   0.91       0/40  0.0%              3:3   1.8%
    sign-flip      2   0.8894  +0.69     22.7s   1.14       0/30  0.0%          2:3,3:3   1.4%
    noise          1   0.8844  +0.19     20.5s   1.02       0/42  0.0%              3:3   1.6%
    noise          2   0.8855  +0.30     19.7s   0.99       0/28  0.0%          2:3,3:3   1.2%
    alie           1   0.8836  +0.11     22.2s   1.11       2/39  5.1%             3:12   1.5%
    alie           2   0.8872  +0.47     29.2s   1.46       0/30  0.0%         2:4,3:10   1.0%
    ipm-0.1        1   0.8852  +0.27     19.8s   0.99       0/41  0.0%              3:3   1.2%
    ipm-0.1        2   0.8856  +0.31     17.8s   0.89       0/36  0.0%          2:3,3:3   1.0%
    ipm-0.5        1   0.8859  +0.34     34.7s   1.74       0/44  0.0%              3:3   1.0%
    ipm-0.5        2   0.8849  +0.24     48.5s   2.43       0/28  0.0%          2:3,3:3   0.7%
    flip-labels    1   0.8863  +0.38     45.6s   2.28       0/39  0.0%              3:3   1.0%
    flip-labels    2   0.8822  -0.03     26.1s   1.31       0/30  0.0%          2:3,3:3   0.9%
    free-rider     1   0.8850  +0.25     20.2s   1.01       0/36  0.0%              3:3   1.1%
    free-rider     2   0.8849  +0.24     52.8s   2.64       0/32  0.0%          2:3,3:3   0.8%
    worst time to 0.85 vs clean (20.0 s): 2.64x (free-rider, 2 bad); all targets met: NO

Met: accuracy (18/18 cells; every cell within +0.69/-0.12 points of clean), validation CPU
(19/19; 0.7-1.8% of one core), no honest member expelled. Not met: expulsion within 3 changes
for ``alie`` (12 changes with 1 bad; 4 and 10 with 2 bad), honest rejections for ``alie`` with
1 bad (2 of 39, 5.1%: "direction"), and time to target in 4 of 18 cells (ipm-0.5 1.74x/2.43x,
flip-labels 1 bad 2.28x, free-rider 2 bad 2.64x), all of them run while the VM was loaded:
rerun on a quiet machine, with ``--repeats``, before reading them as the attacks' cost. With
two colluding bad members that send the same vector (alie, ipm-0.5), the second was caught as
a replay of the first.

Rerun of the cells that missed, on the final validator (the VM quieter),
``.venv/bin/python benchmarks/byzantine.py --attacks alie,ipm-0.5,flip-labels,free-rider --bad 1,2``
(9 min)::

    attack       bad accuracy  Δ pts  t→target  ratio  honest rejected  checks to expel    CPU
    none           0   0.8847  +0.00     22.0s   1.00       0/44  0.0%                -   1.7%
    alie           1   0.8797  -0.50     21.5s   0.98       0/32  0.0%          3:never   1.8%
    alie           2   0.8856  +0.09     18.7s   0.85       0/27  0.0%          2:4,3:4   1.5%
    ipm-0.5        1   0.8869  +0.22     18.1s   0.82       0/41  0.0%              3:3   1.7%
    ipm-0.5        2   0.8868  +0.21     22.3s   1.01       0/32  0.0%          2:3,3:3   1.6%
    flip-labels    1   0.8871  +0.24     20.8s   0.94       0/42  0.0%              3:3   2.0%
    flip-labels    2   0.8853  +0.06     22.3s   1.01       0/31  0.0%          2:3,3:4   1.3%
    free-rider     1   0.8864  +0.17     18.6s   0.84       0/40  0.0%              3:3   1.8%
    free-rider     2   0.8865  +0.18     17.8s   0.81       0/31  0.0%          2:3,3:3   1.8%
    worst time to 0.85 vs clean (22.0 s): 1.01x (ipm-0.5, 2 bad); all targets met: NO

Time to target, accuracy, honest rejections (0 of 310) and CPU (1.3-2.0%) met in every cell;
expulsion within 3 not met for ``alie`` (never expelled with 1 bad: its changes sit inside the
honest spread and were all accepted, at a cost of 0.5 points; 4 changes each with 2 bad) and
once for ``flip-labels`` with 2 bad (4 changes). The other five attacks were not rerun.

Caveat: ``crowdd/job/validate.py`` was edited while this run went on (each cell's host job
imports it afresh): commit 54ec981 (05:33) dropped the descent verdict and raised the norm bound
from 4x the median to 10x, and the working tree then changed it again (10x the largest; the
direction check only while the held-back loss falls). The cells up to about alie (whose
expulsion reason was still "pointed uphill") ran the earlier validator; which version each
later cell ran is not known. Rerun before quoting these figures for the current validator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from crowdd.job.byzantine import ENV, MODES

FASHION = Path("/usr/share/datasets/fashion-mnist")
WORKERS = 3  # additional workers: slots 1..3 (slot 0 is the host's own trainer)
AUDIT = Path("member0") / "out" / "validation.jsonl"
TIME_LIMIT = {1: 1.3, 2: 1.5}  # time to target, times the clean run's
ACCURACY_POINTS = {1: 1.0, 2: 2.0}  # final accuracy may fall this many points below clean
EXPEL_WITHIN = 3  # each bad member expelled within this many of its changes
HONEST_REJECTED = 0.02  # share of honest changes rejected
CPU_SHARE = 0.10  # validation CPU / training wall time


def bad_slots(count: int, workers: int = WORKERS) -> list[int]:
    """The slots made bad when ``count`` of ``workers`` are bad: the highest ones."""
    if not 0 <= count <= workers:
        raise ValueError(f"bad count must be 0..{workers}, got {count}")
    return list(range(workers - count + 1, workers + 1))


def hook(attack: str, slots: Sequence[int]) -> str:
    """The ``CROWDD_TEST_BYZANTINE`` value: ``"2:sign-flip,3:sign-flip"``."""
    return ",".join(f"{s}:{attack}" for s in slots)


def time_to(events: Iterable[Mapping[str, Any]], target: float) -> float | None:
    """``train_seconds`` of the first eval event with ``test_accuracy >= target`` (None: never)."""
    for e in events:
        if e.get("event") == "eval" and e.get("test_accuracy", -1.0) >= target:
            return float(e["train_seconds"])
    return None


def train_seconds(events: Iterable[Mapping[str, Any]]) -> float | None:
    """The training wall time: the last eval event's ``train_seconds``."""
    evals = [e for e in events if e.get("event") == "eval"]
    return float(evals[-1]["train_seconds"]) if evals else None


def honest_rejected(audit: Iterable[Mapping[str, Any]], bad: Iterable[int]) -> tuple[int, int]:
    """(rejected, checked) over honest workers' changes: every slot but 0 and the bad ones."""
    skip = {0, *bad}
    rows = [r for r in audit if r["slot"] not in skip]
    return sum(1 for r in rows if not r["accepted"]), len(rows)


def checks_to_expel(audit: Iterable[Mapping[str, Any]], slot: int, expelled: bool) -> int | None:
    """How many of ``slot``'s changes were checked up to and including its expulsion (None if it
    never was). An expelled slot's later changes are dropped unchecked, so every audit row of
    the slot counts."""
    if not expelled:
        return None
    return sum(1 for r in audit if r["slot"] == slot)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(events: list[dict[str, Any]], audit: list[dict[str, Any]], bad: Sequence[int],
            target: float) -> dict[str, Any]:
    """One run's figures (see the module docstring); ``error`` set when it did not finish."""
    done = next((e for e in events if e.get("event") == "done"), None)
    if done is None:
        err = next((e for e in events if e.get("event") == "error"), None)
        return {"error": str(err) if err else "no done event"}
    validation = done.get("validation", {})
    expelled = {int(s): why for s, why in validation.get("expelled", {}).items()}
    rejected, checked = honest_rejected(audit, bad)
    wall = train_seconds(events)
    cpu = float(validation.get("check_cpu_seconds", 0.0))
    return {
        "test_accuracy": float(done["test_accuracy"]),
        "time_to_target": time_to(events, target),
        "train_seconds": wall,
        "honest_rejected": rejected,
        "honest_checked": checked,
        "honest_reasons": sorted({r.get("reason", "") for r in audit if r["slot"] not in {0, *bad}
                                  and not r["accepted"]}),
        "checks_to_expel": {str(s): checks_to_expel(audit, s, s in expelled) for s in bad},
        "expelled": {str(s): why for s, why in sorted(expelled.items())},
        "honest_expelled": sorted(s for s in expelled if s not in bad),
        "check_cpu_seconds": cpu,
        "cpu_share": ratio(cpu, wall),
        "checked": validation.get("checked"),
        "audit_rows": len(audit),
        "steps": done.get("steps"),
    }


def _median(values: list[float | None], *, none_is_worst: bool = False) -> float | None:
    """The median; None values are dropped, or (``none_is_worst``) count as +infinity."""
    if none_is_worst:
        vals = sorted(float("inf") if v is None else v for v in values)
        m = statistics.median_low(vals) if vals else float("inf")
        return None if m == float("inf") else m
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def combine(runs: list[dict[str, Any]], bad: Sequence[int]) -> dict[str, Any]:
    """Repeats of one cell: median times and CPU share, mean accuracy, pooled honest counts,
    the worst (largest; None if any never) checks to expulsion."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": "; ".join(r["error"] for r in runs)}
    worst: dict[str, int | None] = {}
    for s in bad:
        counts = [r["checks_to_expel"][str(s)] for r in ok]
        worst[str(s)] = None if any(c is None for c in counts) else max(counts)
    return {
        "test_accuracy": statistics.fmean(r["test_accuracy"] for r in ok),
        "time_to_target": _median([r["time_to_target"] for r in ok], none_is_worst=True),
        "honest_rejected": sum(r["honest_rejected"] for r in ok),
        "honest_checked": sum(r["honest_checked"] for r in ok),
        "checks_to_expel": worst,
        "honest_expelled": sorted({s for r in ok for s in r["honest_expelled"]}),
        "cpu_share": _median([r["cpu_share"] for r in ok]),
        "failed_runs": len(runs) - len(ok),
    }


def judge(cell: Mapping[str, Any], clean: Mapping[str, Any], count: int) -> dict[str, bool | None]:
    """Each target met (True), not met (False), or not applicable to this bad count (None)."""
    if "error" in cell:
        return {"time": False, "accuracy": False, "expel": False, "honest": False, "cpu": False}
    r = ratio(cell["time_to_target"], clean.get("time_to_target"))
    drop = (clean["test_accuracy"] - cell["test_accuracy"]) * 100 if "test_accuracy" in clean else None
    share = cell["honest_rejected"] / cell["honest_checked"] if cell["honest_checked"] else 0.0
    cpu = cell["cpu_share"]
    return {
        "time": None if count not in TIME_LIMIT else (r is not None and r <= TIME_LIMIT[count]),
        "accuracy": None if count not in ACCURACY_POINTS else (drop is not None and drop <= ACCURACY_POINTS[count]),
        "expel": None if count == 0 else all(c is not None and c <= EXPEL_WITHIN for c in cell["checks_to_expel"].values()),
        "honest": share <= HONEST_REJECTED and not cell["honest_expelled"],
        "cpu": cpu is not None and cpu <= CPU_SHARE,
    }


def _f(value: float | None, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


HEADER = (f"{'attack':<12} {'bad':>3} {'accuracy':>8} {'Δ pts':>6} {'t→target':>9} {'ratio':>6} "
          f"{'honest rejected':>16} {'checks to expel':>16} {'CPU':>6}  targets")


def row(attack: str, count: int, cell: Mapping[str, Any], clean: Mapping[str, Any],
        verdict: Mapping[str, bool | None]) -> str:
    if "error" in cell:
        return f"{attack:<12} {count:>3}  FAILED: {cell['error']}"
    diff = (cell["test_accuracy"] - clean["test_accuracy"]) * 100 if "test_accuracy" in clean else None
    t = cell["time_to_target"]
    share = cell["honest_rejected"] / cell["honest_checked"] if cell["honest_checked"] else 0.0
    honest = f"{cell['honest_rejected']}/{cell['honest_checked']} {share:5.1%}"
    expel = ",".join(f"{s}:{'never' if c is None else c}" for s, c in cell["checks_to_expel"].items()) or "-"
    if cell["honest_expelled"]:
        expel += " (honest expelled: " + ",".join(map(str, cell["honest_expelled"])) + ")"
    failed = [k for k, v in verdict.items() if v is False]
    return (f"{attack:<12} {count:>3} {cell['test_accuracy']:8.4f} {_f(diff, '+6.2f', '     -')} "
            f"{_f(t, '8.1f', 'never'):>8}s {_f(ratio(t, clean.get('time_to_target')), '6.2f', '     -')} "
            f"{honest:>16} {expel:>16} {_f(cell['cpu_share'], '6.1%', '     -')}  "
            + ("met" if not failed else "NOT met: " + ", ".join(failed)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=FASHION, help="IDX directory (Fashion-MNIST)")
    p.add_argument("--attacks", default=",".join(MODES), help="comma list of modes (default: all)")
    p.add_argument("--bad", default="1,2", help=f"comma list of bad counts, 1..{WORKERS} (1: slot 3; 2: slots 2, 3)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--target", type=float, default=0.85, help="test accuracy for time to accuracy")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell (medians; worst expulsion)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in MODES]
    if unknown or not attacks:
        p.error(f"--attacks: unknown {', '.join(unknown) or '(none)'}; modes: {', '.join(MODES)}")
    try:
        counts = sorted({int(b) for b in args.bad.split(",") if b.strip()})
        for c in counts:
            bad_slots(c)
    except ValueError as exc:
        p.error(f"--bad: {exc}")
    if 0 in counts:
        counts.remove(0)  # the clean run is always measured

    from crowdd.data.datasets import convert
    from crowdd.testing.local_cluster import run_cluster

    job = {"model": "mlp", "hidden": [100], "optimizer": "sgd", "sharding": "full", "learning_rate": 0.5,
           "epochs": args.epochs, "batch_size": 100, "eval_every_secs": 2}
    settings = {"threads": 1, "nice": 0, "checkpoint_secs": 3600.0}
    cells: list[tuple[str, int]] = [("none", 0)] + [(a, c) for a in attacks for c in counts]
    runs: dict[str, list[dict[str, Any]]] = {}
    combined: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, dict[str, bool | None]] = {}
    started = time.monotonic()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="crowdd-byzantine-") as tmp:
        root = Path(tmp)
        prep = convert(args.dataset, root / "cache")
        n = 0
        for attack, count in cells:
            slots = bad_slots(count)
            name = f"{attack}/{count}"
            runs[name] = []
            for rep in range(args.repeats):
                env = {ENV: hook(attack, slots)} if slots else {}
                print(f"[{time.monotonic() - started:6.0f} s] {name} run {rep + 1}/{args.repeats}: "
                      f"{env.get(ENV, 'no bad workers')}", file=sys.stderr, flush=True)
                where = root / f"run{n}"
                n += 1
                result = run_cluster(where, prep.data_path, prep.manifest_path, WORKERS, job, settings,
                                     timeout=1200, host_env=env)
                audit = read_audit(where / AUDIT)
                m = measure(result.events, audit, slots, args.target)
                if "error" not in m and m["checked"] != m["audit_rows"]:
                    print(f"  note: {m['audit_rows']} audit rows, done says {m['checked']} checked",
                          file=sys.stderr)
                runs[name].append(m)
            combined[name] = combine(runs[name], slots)
            clean = combined["none/0"]
            verdicts[name] = judge(combined[name], clean, count)
            print(row(attack, count, combined[name], clean, verdicts[name]), flush=True)

    clean = combined["none/0"]
    if "error" in clean:
        print(f"the clean run failed: {clean['error']}")
        return 1
    # summary: each target, each cell
    targets = ("time", "accuracy", "expel", "honest", "cpu")
    print()
    print(f"targets: time to {args.target} <= {TIME_LIMIT[1]}x clean (1 bad) / {TIME_LIMIT[2]}x (2 bad); accuracy within "
          f"{ACCURACY_POINTS[1]:g} / {ACCURACY_POINTS[2]:g} points; each bad member expelled within {EXPEL_WITHIN} changes; "
          f"honest rejected <= {HONEST_REJECTED:.0%}; validation CPU <= {CPU_SHARE:.0%}")
    print(f"{'attack':<12} {'bad':>3} " + " ".join(f"{t:>8}" for t in targets))
    mark = {True: "met", False: "NOT met", None: "-"}
    for attack, count in cells:
        v = verdicts[f"{attack}/{count}"]
        print(f"{attack:<12} {count:>3} " + " ".join(f"{mark[v[t]]:>8}" for t in targets))
    tally = {t: [v[t] for v in verdicts.values() if v[t] is not None] for t in targets}
    print(f"{'met in':<16} " + " ".join(f"{sum(bool(x) for x in tally[t]):>3}/{len(tally[t]):<4}" for t in targets))
    all_met = all(all(x) for x in tally.values())

    ratios = {k: ratio(c.get("time_to_target"), clean.get("time_to_target")) for k, c in combined.items() if k != "none/0"}
    never = sorted(k for k, r in ratios.items() if r is None)
    finite = {k: r for k, r in ratios.items() if r is not None}
    worst_key = max(finite, key=lambda k: finite[k]) if finite else None
    summary = {
        "job": job,
        "settings": settings,
        "workers": WORKERS,
        "bad_slots": {str(c): bad_slots(c) for c in [0, *counts]},
        "target_accuracy": args.target,
        "repeats": args.repeats,
        "targets": {"time_ratio": TIME_LIMIT, "accuracy_points": ACCURACY_POINTS, "expel_within": EXPEL_WITHIN,
                    "honest_rejected": HONEST_REJECTED, "cpu_share": CPU_SHARE},
        "runs": runs,
        "cells": combined,
        "verdicts": verdicts,
        "time_ratios": ratios,
        "worst_time_ratio": {"cell": worst_key, "ratio": finite[worst_key] if worst_key else None},
        "never_reached_target": never,
        "all_targets_met": all_met,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if clean.get("time_to_target") is None:
        print(f"the clean run never reached {args.target}: no time ratios; all targets met: {'yes' if all_met else 'NO'}")
        return 0
    worst = f"{finite[worst_key]:.2f}x ({worst_key.replace('/', ', ')} bad)" if worst_key else "-"
    print(f"worst time to {args.target} vs clean ({clean['time_to_target']:.1f} s): {worst}"
          + (f"; never reached in {', '.join(never)}" if never else "")
          + f"; all targets met: {'yes' if all_met else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
