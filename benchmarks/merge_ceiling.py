"""The merge rules' ceiling: how much sooner do W asynchronous trainers reach a target than one,
when communication is free and every trainer is equally fast?

    .venv/bin/python benchmarks/merge_ceiling.py --trainers 1,2,4 --seeds 3 --json ceiling.json

``benchmarks/scaling.py`` measures the whole system (daemons, tunnels, capped machines, shaped
links); its speed-up is the product of two factors: how many more steps per second the group
makes (throughput) and how many more steps it needs to reach the target (the merge rule's
efficiency). This benchmark measures the second factor alone, in one process, with no network
and no caps: W trainers run the shipped training step (``crowdd.job.models.build_model``, the
job's loss and optimizer, ``crowdd.job.train.local_update``) on their own shuffles of the data
for K (``sync_every``) steps from the weights they pulled, then push the change with the
shipped merge rule (``crowdd.job.outer``; ``average-sqrt-lr`` at its first-half factor, as in a
run bounded far beyond its target). Pushes arrive in the order W equally fast,
staggered trainers would make them (trainer j's round r ends at ``(r + 1)·K + j·K/W`` steps),
so each push is as stale as in the real cluster. Time is counted in steps per trainer; the
model is evaluated on the whole test set every ``--eval-every`` steps of that time.

``--data-parallel`` measures what such rules approach as K shrinks instead: W trainers that average
their gradients after every step (free, synchronous all-reduce) are one trainer with a W-times
larger batch; each W is tried over a grid of learning rates and its best counts.

    .venv/bin/python benchmarks/merge_ceiling.py --data-parallel --trainers 1,4 --seeds 4 \
        --learning-rates 0.5,0.7,1,1.5 --max-steps 4000

Prints, per W, the steps per trainer to the target (mean over seeds), the ceiling speed-up
T(1)/T(W) and the efficiency speed-up/W; the last line is the 4-trainer ceiling. A run that
does not reach the target within ``--max-steps`` (or diverges) counts as failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_once(data: Any, trainers: int, merge: str, lr: float, k: int, seed: int, target: float, eval_every: int,
             max_steps: int, batch: int, hidden: list[int], optimizer: str = "sgd") -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from crowdd.hyperparams import Job
    from crowdd.job.models import build_model, loss_function
    from crowdd.job.outer import effective_merge, lr_scale, nesterov, push_scale
    from crowdd.job.train import local_update
    from crowdd.data.manifest import Layout

    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    rule = effective_merge(merge, trainers)
    job = Job(model="mlp", hidden=tuple(hidden), optimizer=optimizer, learning_rate=lr * lr_scale(rule, trainers),
              batch_size=batch)
    layout = Layout(feature_shape=tuple(x_train.shape[1:]), feature_dtype="uint8", scale=1 / 255, num_classes=10,
                    train_count=len(x_train), test_count=len(x_test))
    model = build_model(job, layout, x_train.mean(axis=0).astype(np.float32))
    loss_fn = loss_function(job, layout)
    scale = push_scale(rule, trainers)
    fixed = [v.value for v in model.non_trainable_variables]
    xt, yt = tf.constant(x_test), tf.constant(y_test)

    nw = len(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def rounds(state: list, xs: Any, ys: Any) -> list:
        # state: the weights, then the optimizer's slots (Adam's m, v and step), as on the PS
        weights, slots = state[:nw], state[nw:]
        for i in tf.range(tf.shape(xs)[0]):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                probs, _ = model.stateless_call(weights, fixed, xs[i], training=True)
                loss = loss_fn(ys[i], probs)
            weights, slots = local_update(job, weights, slots, tape.gradient(loss, weights))
        return [*weights, *slots]

    @tf.function
    def accuracy(weights: list) -> Any:
        probs, _ = model.stateless_call(weights, fixed, xt, training=False)
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), yt), tf.float32))

    rng = np.random.default_rng(seed)
    n = len(x_train)

    def stream() -> Any:
        while True:
            order = rng.permutation(n)
            for s in range(0, n - batch + 1, batch):
                yield order[s : s + batch]

    streams = [stream() for _ in range(trainers)]
    weights = [tf.constant(v.numpy()) for v in model.trainable_variables]
    if optimizer == "adam":  # the slots TrainState keeps on the PS: m, v per weight, then the step
        weights += [tf.zeros_like(w) for w in weights] * 2 + [tf.constant(0.0)]
    momentum = [tf.zeros_like(w) for w in weights[:nw]]
    pulled = {j: list(weights) for j in range(trainers)}
    ends = sorted(((r + 1) * k + j * k / trainers, j) for j in range(trainers) for r in range(max_steps // k + 1))
    next_eval, acc = eval_every, 0.0
    for t_end, j in ends:
        while next_eval <= t_end:
            acc = float(accuracy(weights[:nw]))
            if acc >= target:
                return {"steps": next_eval, "accuracy": acc}
            diverged = not all(np.isfinite(w.numpy()).all() for w in weights[:nw])
            if diverged or not math.isfinite(acc) or next_eval >= max_steps:
                return {"steps": None, "accuracy": acc}
            next_eval += eval_every
        idx = np.stack([next(streams[j]) for _ in range(k)])
        new = rounds(pulled[j], tf.constant(x_train[idx]), tf.constant(y_train[idx]))
        delta = [(a - b) * scale for a, b in zip(new, pulled[j])]
        if rule == "nesterov":  # the outer step moves the weights; the slots are averaged
            pairs = [nesterov(d, m) for d, m in zip(delta[:nw], momentum)]
            momentum = [m for m, _ in pairs]
            weights = [w + step for w, (_, step) in zip(weights[:nw], pairs)] + [
                w + d for w, d in zip(weights[nw:], delta[nw:])]
        else:
            weights = [w + d for w, d in zip(weights, delta)]
        pulled[j] = list(weights)
    return {"steps": None, "accuracy": acc}


def _floats(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return sorted(set(values))


def report(results: list[dict[str, Any]], key: str, json_path: Path | None, header: dict[str, Any],
           line: Callable[[dict[str, Any]], str], headline: str) -> int:
    """Adds each W's speed-up and efficiency against W = 1 (``results[0]``, by ``key``: steps to
    the target), writes the JSON, prints a line per W and the 4-trainer figure last."""
    ref = results[0][key]
    for r in results:
        if ref and r[key]:
            r["speedup"] = round(ref / r[key], 3)
            r["efficiency"] = round(ref / r[key] / r["trainers"], 3)
    if json_path:
        json_path.write_text(json.dumps({**header, "results": results}, indent=2))
    for r in results:
        print(line(r))
    four = next((r for r in results if r["trainers"] == 4), None)
    if four is not None:
        print(f"{headline}: {four.get('speedup')}x (efficiency {four.get('efficiency')})")
    return 0 if all(r[key] for r in results) else 1


def data_parallel(args: argparse.Namespace, data: Any) -> int:
    """The synchronous data-parallel bound: W trainers that average their gradients every step
    (free all-reduce, no staleness) take the steps of one trainer with a W-times larger batch.
    For each W the best of ``args.learning_rates`` counts; the speed-up is against the best at
    W = 1. Asynchronous rules that merge K-step changes approximate it as K shrinks; the ones
    measured stay below it (4 trainers, MLP to 0.88, 4 seeds, K 50: SGD bound 2.53x against 1.94x
    for ``average-sqrt-lr``; Adam bound 3.01x against 2.41x for ``average``)."""
    grid = args.learning_rates or [args.learning_rate * f for f in (0.5, 1.0, 2.0, 3.0)]
    results: list[dict[str, Any]] = []
    for w in args.trainers:
        tried = []
        for lr in grid:
            runs = []
            for seed in range(args.seeds):
                r = run_once(data, 1, "average", lr, args.eval_every, seed, args.target, args.eval_every,
                             args.max_steps, args.batch_size * w, [100], args.optimizer)
                runs.append({**r, "seed": seed})
                print(f"W={w} (batch {args.batch_size * w}) lr {lr:g} seed {seed}: "
                      + (f"{r['steps']} steps" if r["steps"] else "FAILED") + f" (acc {r['accuracy']:.4f})",
                      file=sys.stderr, flush=True)
                if not r["steps"]:
                    break  # one failed seed rules this rate out
            ok = [r["steps"] for r in runs if r["steps"]]
            tried.append({"learning_rate": lr, "runs": runs,
                          "steps": round(sum(ok) / len(ok), 1) if len(ok) == args.seeds else None})
        done = [t for t in tried if t["steps"]]
        best = min(done, key=lambda t: t["steps"]) if done else None
        results.append({"trainers": w, "batch_size": args.batch_size * w, "tried": tried,
                        "learning_rate": best["learning_rate"] if best else None,
                        "steps": best["steps"] if best else None})
    return report(results, "steps", args.json, {
        "mode": "data-parallel", "optimizer": args.optimizer, "batch_size": args.batch_size,
        "learning_rates": grid, "target": args.target, "eval_every": args.eval_every, "seeds": args.seeds},
        lambda r: f"data-parallel {args.optimizer}: {r['trainers']} trainer(s) (batch {r['batch_size']}, best lr "
                  f"{r['learning_rate']}) {r['steps']} steps to {args.target}, speed-up {r.get('speedup')}, "
                  f"efficiency {r.get('efficiency')}",
        "4-trainer data-parallel bound (synchronous, free communication)")


def main(argv: list[str] | None = None) -> int:
    from crowdd.config import JobConfig
    from crowdd.hyperparams import MERGES, OPTIMIZERS, Job

    job, cfg = Job(), JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", type=lambda s: sorted({int(x) for x in s.split(",") if x.strip()} | {1}),
                   default=[1, 2, 4], help="trainer counts (1, the reference, is always run)")
    p.add_argument("--merge", default=cfg.merge, choices=MERGES, help=f"default: what ships, {cfg.merge}")
    p.add_argument("--sync-every", type=int, default=cfg.sync_every, help="K: local steps per push")
    p.add_argument("--learning-rate", type=float, default=job.learning_rate)
    p.add_argument("--batch-size", type=int, default=job.batch_size)
    p.add_argument("--target", type=float, default=0.88)
    p.add_argument("--eval-every", type=int, default=100, help="steps per trainer between evaluations")
    p.add_argument("--max-steps", type=int, default=8000, help="steps per trainer before a run counts as failed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dataset", type=Path, default=FASHION)
    p.add_argument("--optimizer", default=job.optimizer, choices=OPTIMIZERS)
    p.add_argument("--data-parallel", action="store_true",
                   help="measure the synchronous data-parallel bound instead: W trainers that average their "
                        "gradients every step are one trainer with a W-times larger batch; each W is tried at "
                        "every --learning-rates value and its best is reported")
    p.add_argument("--learning-rates", type=_floats, default=None,
                   help="with --data-parallel: the learning rates to try (default: --learning-rate times "
                        "0.5, 1, 2 and 3)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.sync_every < 1 or args.eval_every < 1 or args.seeds < 1:
        p.error("--sync-every, --eval-every and --seeds must be >= 1")
    if args.learning_rates is not None and not args.data_parallel:
        p.error("--learning-rates goes with --data-parallel")

    import tensorflow as tf

    from crowdd.data.datasets import load_idx_dir
    from crowdd.job.outer import effective_merge, lr_scale

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    arrays = load_idx_dir(args.dataset)
    data = (arrays.x_train.astype(np.float32), arrays.y_train.astype(np.int32),
            arrays.x_test.astype(np.float32), arrays.y_test.astype(np.int32))
    if args.data_parallel:
        return data_parallel(args, data)
    results: list[dict[str, Any]] = []
    for w in args.trainers:
        lr = args.learning_rate * lr_scale(effective_merge(args.merge, w), w)
        runs = []
        for seed in range(args.seeds):
            t0 = time.monotonic()
            r = run_once(data, w, args.merge, args.learning_rate, args.sync_every, seed, args.target, args.eval_every,
                         args.max_steps, args.batch_size, [100], args.optimizer)
            runs.append({**r, "seed": seed, "seconds": round(time.monotonic() - t0, 1)})
            print(f"W={w} seed {seed}: " + (f"{r['steps']} steps per trainer" if r["steps"] else "FAILED")
                  + f" (acc {r['accuracy']:.4f})", file=sys.stderr, flush=True)
        ok = [r["steps"] for r in runs if r["steps"]]
        results.append({"trainers": w, "learning_rate": lr, "runs": runs, "failed": len(runs) - len(ok),
                        "steps_per_trainer": round(sum(ok) / len(ok), 1) if len(ok) == len(runs) else None})
    return report(results, "steps_per_trainer", args.json, {
        "merge": args.merge, "sync_every": args.sync_every, "optimizer": args.optimizer,
        "learning_rate": args.learning_rate, "batch_size": args.batch_size, "target": args.target,
        "eval_every": args.eval_every, "seeds": args.seeds},
        lambda r: f"merge {args.merge} K {args.sync_every} lr {r['learning_rate']:g}: {r['trainers']} trainer(s) "
                  f"{r['steps_per_trainer']} steps each to {args.target} ({r['failed']} of {args.seeds} failed), "
                  f"speed-up {r.get('speedup')}, efficiency {r.get('efficiency')}",
        "4-trainer ceiling speed-up (free communication, equal trainers)")


if __name__ == "__main__":
    sys.exit(main())
