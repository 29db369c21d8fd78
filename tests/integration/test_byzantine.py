"""Bad workers, for real: host + 3 workers train the Fashion-MNIST MLP while 1 or 2 of the
workers send bad changes (the test-only hook :data:`crowdd.job.byzantine.ENV`, read by the
host's job; never a setting). Each run has its clean twin's accuracy to match, every bad
member is expelled within 3 of its changes, and honest changes are rarely rejected.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from crowdd.data.datasets import Prepared, convert
from crowdd.job.byzantine import ENV
from crowdd.testing.local_cluster import RunResult, run_cluster
from crowdd.testing.bounds import at_least

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FASHION = Path("/usr/share/datasets/fashion-mnist")
JOB = {"model": "mlp", "hidden": [100], "optimizer": "sgd", "sharding": "full", "learning_rate": 0.5,
       "batch_size": 100}
SETTINGS = {"threads": 1, "nice": 0, "checkpoint_secs": 3600.0}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    if not FASHION.is_dir():
        pytest.skip(f"{FASHION} is not installed (scripts/setup installs dataset-fashion-mnist as root)")
    return convert(FASHION, tmp_path_factory.mktemp("fashion"))


def train(root: Path, data: Prepared, epochs: int, bad: str = "", settings: dict[str, Any] = SETTINGS
          ) -> tuple[RunResult, list[dict[str, Any]]]:
    run = run_cluster(root, data.data_path, data.manifest_path, 3, {**JOB, "epochs": epochs}, settings,
                      timeout=600, host_env={ENV: bad} if bad else None)
    assert run.done is not None, run.error
    verdicts = [json.loads(line) for line in (root / "member0" / "out" / "validation.jsonl").read_text().splitlines()]
    return run, verdicts


def expelled_within(run: RunResult, verdicts: list[dict[str, Any]], slot: int) -> int:
    """How many of ``slot``'s changes were rejected up to its expulsion (fails if it never was)."""
    expel = [e for e in run.events if e["event"] == "expel" and e["task"] == slot]
    assert expel, f"slot {slot} was never expelled; its verdicts: {[v for v in verdicts if v['slot'] == slot][:6]}"
    assert str(slot) in run.done["validation"]["expelled"]  # type: ignore[index]
    return len([v for v in verdicts if v["slot"] == slot and not v["accepted"]])


def honest_rejected(verdicts: list[dict[str, Any]], bad: set[int]) -> tuple[int, int]:
    """(rejected, checked) over the honest workers' changes (slot 0, the host's own, aside)."""
    honest = [v for v in verdicts if v["slot"] not in bad and v["slot"] != 0]
    return sum(1 for v in honest if not v["accepted"]), len(honest)


def test_one_and_two_bad_of_four_keep_the_clean_accuracy(fashion: Prepared, tmp_path: Path) -> None:
    clean, clean_v = train(tmp_path / "clean", fashion, 3)
    base = clean.done["test_accuracy"]  # type: ignore[index]
    # Fashion-MNIST MLP, 3 epochs, 4 trainers: 0.8748 in a clean-clone run 2026-12-07
    # (CROWDD_METRICS, crowdd/testing/bounds.py); one run on 10,000 test images has a standard
    # error of ~0.0033, so 0.85 is ~7 of them below
    at_least(base, 0.85)
    assert not clean.done["validation"]["expelled"]  # type: ignore[index]  # the clean twin expels nobody

    one, one_v = train(tmp_path / "one", fashion, 3, "3:sign-flip")
    # 0.8795 against 0.8748 clean in that run; 0.01 is ~2 standard errors of the difference
    at_least(one.done["test_accuracy"], base - 0.01, "accuracy, 1 bad of 4, vs clean")  # type: ignore[index]
    # three rejected changes expel (one merged before them is the exception asserted below)
    assert expelled_within(one, one_v, 3) <= 3

    two, two_v = train(tmp_path / "two", fashion, 3, "2:flip-labels,3:noise")
    # 0.8785 against 0.8748 clean in that run; 0.02 is ~4 standard errors of the difference
    at_least(two.done["test_accuracy"], base - 0.02, "accuracy, 2 bad of 4, vs clean")  # type: ignore[index]
    assert expelled_within(two, two_v, 2) <= 3 and expelled_within(two, two_v, 3) <= 3

    rejected, checked = map(sum, zip(honest_rejected(clean_v, set()), honest_rejected(one_v, {3}),
                                     honest_rejected(two_v, {2, 3})))
    assert checked >= 30 and rejected <= 0.02 * checked, (rejected, checked)
    # at most one bad change was merged, and only one that passed every check: early in a run,
    # before the direction check has a history, a change trained on flipped labels can raise
    # the held-back loss by less than the 15% tolerance (seen: +11%) (docs/security.md)
    merged_bad = [v for v in one_v if v["slot"] == 3 and v["accepted"]]
    merged_bad += [v for v in two_v if v["slot"] in (2, 3) and v["accepted"]]
    assert len(merged_bad) <= 1, merged_bad
    assert all(v["loss_after"] <= 1.15 * v["loss_before"] for v in merged_bad), merged_bad


@pytest.mark.parametrize("attacks", ["1:nan,2:scale100", "1:ipm-0.1,2:ipm-0.5", "1:free-rider,2:sign-flip"])
def test_every_attack_is_expelled_within_three_changes(fashion: Prepared, tmp_path: Path, attacks: str) -> None:
    # rounds of 100 steps: every trainer sends several changes in one epoch, even a slow one
    run, verdicts = train(tmp_path, fashion, 1, attacks, {**SETTINGS, "sync_every": 100, "steps_per_function": 100})
    slots = {int(part.split(":")[0]) for part in attacks.split(",")}
    for slot in slots:
        assert expelled_within(run, verdicts, slot) <= 3
        assert not [v for v in verdicts if v["slot"] == slot and v["accepted"]], "a bad change was merged"
    reasons = Counter(v.get("reason") for v in verdicts if v["slot"] in slots)
    if "1:nan" in attacks:
        assert reasons["form"] == 1  # one non-finite change is enough
    if "free-rider" in attacks:  # zeros until it has seen an honest change to replay
        free = Counter(v.get("reason") for v in verdicts if v["slot"] == 1)
        assert free and set(free) <= {"zero", "replay"}, free
    rejected, checked = honest_rejected(verdicts, slots)
    assert rejected <= max(1, 0.02 * checked), (rejected, checked)
    # a run nobody could end: 0.8585, 0.8632, 0.8606 for the three pairs in the clean-clone run 2026-12-07
    at_least(run.done["test_accuracy"], 0.8)  # type: ignore[index]
