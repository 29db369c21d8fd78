"""crowdd.job.byzantine: the test-only bad workers, mode by mode (TF-free).

(Named apart from tests/integration/test_byzantine.py: test modules share one namespace.)
"""

from __future__ import annotations

import numpy as np
import pytest

from crowdd.job.byzantine import ALIE_Z, ENV, HISTORY, MODES, BadWorkers, parse

SHAPES = [(40, 25), (25,)]


def change(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.01, size=s).astype(np.float32) for s in SHAPES]


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


def assert_same_form(got: list[np.ndarray], honest: list[np.ndarray]) -> None:
    assert isinstance(got, list) and len(got) == len(honest)
    assert [a.shape for a in got] == [a.shape for a in honest]
    assert all(a.dtype.kind == "f" for a in got)


# --------------------------------------------------------------------------- parse


def test_parse_reads_slot_mode_pairs() -> None:
    assert parse("2:sign-flip,3:alie") == {2: "sign-flip", 3: "alie"}
    assert parse(" 1:nan , 4:ipm-0.5 ,") == {1: "nan", 4: "ipm-0.5"}
    assert parse("") == {} and parse(" , ") == {}
    assert parse(",".join(f"{i}:{m}" for i, m in enumerate(MODES, 1))) == dict(enumerate(MODES, 1))


@pytest.mark.parametrize(
    "value",
    ["0:nan", "2:bogus", "2:", "2", ":nan", "x:nan", "-1:nan", "2-nan", "2:Sign-Flip", "1.5:nan", "2:nan,3:evil"],
)
def test_parse_refuses_a_malformed_value_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(value)
    assert ENV in str(info.value)


def test_slot_0_the_hosts_own_trainer_cannot_be_made_bad() -> None:
    with pytest.raises(ValueError, match="SLOT >= 1"):
        parse("0:sign-flip")


def test_from_env_reads_the_variable() -> None:
    bad = BadWorkers.from_env({ENV: "2:flip-labels,3:nan", "OTHER": "1:nan"})
    assert dict(bad.modes) == {2: "flip-labels", 3: "nan"}
    assert BadWorkers.from_env({}).modes == {}
    assert BadWorkers.from_env({"CROWDD_OTHER": "1:nan"}).modes == {}
    with pytest.raises(ValueError, match=ENV):
        BadWorkers.from_env({ENV: "1:everything"})


def test_from_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "5:scale100")
    # the default argument is bound at import: os.environ itself, read when called
    assert dict(BadWorkers.from_env().modes) == {5: "scale100"}
    monkeypatch.delenv(ENV)
    assert BadWorkers.from_env().modes == {}


def test_flipped_lists_the_flip_labels_slots() -> None:
    bad = BadWorkers(parse("1:flip-labels,2:nan,4:flip-labels"))
    assert bad.flipped == frozenset({1, 4})
    assert BadWorkers().flipped == frozenset()


# --------------------------------------------------------------------------- corrupt


def test_honest_and_flip_labels_slots_send_their_change_unchanged() -> None:
    bad = BadWorkers(parse("2:sign-flip,3:flip-labels"))
    honest = change(1)
    for slot in (0, 1, 3, 4):
        got = bad.corrupt(slot, honest)
        assert got is honest  # untouched: flip-labels is real work on flipped data
    assert all(np.array_equal(a, b) for a, b in zip(honest, change(1)))


def test_nan_sends_all_nan() -> None:
    honest = change(1)
    got = BadWorkers({2: "nan"}).corrupt(2, honest)
    assert_same_form(got, honest)
    assert all(np.isnan(a).all() for a in got)


def test_scale100_sends_a_hundred_times_the_change() -> None:
    honest = change(1)
    got = BadWorkers({2: "scale100"}).corrupt(2, honest)
    assert_same_form(got, honest)
    for a, h in zip(got, honest):
        np.testing.assert_allclose(a, 100 * h, rtol=1e-6)


def test_sign_flip_sends_the_negated_change() -> None:
    honest = change(1)
    got = BadWorkers({2: "sign-flip"}).corrupt(2, honest)
    assert_same_form(got, honest)
    for a, h in zip(got, honest):
        np.testing.assert_array_equal(a, -h)


def test_noise_has_the_honest_norm_and_no_direction() -> None:
    bad = BadWorkers({2: "noise"})
    honest = change(1)
    first = bad.corrupt(2, honest)
    second = bad.corrupt(2, honest)
    assert_same_form(first, honest)
    h = flat(honest)
    for got in (first, second):
        g = flat(got)
        assert np.linalg.norm(g) == pytest.approx(np.linalg.norm(h), rel=1e-5)
        assert abs(float(g @ h) / (np.linalg.norm(g) * np.linalg.norm(h))) < 0.1  # 1025 values: ~0.03
    assert not np.allclose(flat(first), flat(second))  # fresh noise every change
    # reproducible: the same seed, slot and count give the same noise
    again = BadWorkers({2: "noise"}).corrupt(2, honest)
    np.testing.assert_array_equal(flat(again), flat(first))


def _seen(bad: BadWorkers, seeds: range) -> list[list[np.ndarray]]:
    pool = [change(s) for s in seeds]
    for c in pool:
        bad.seen(c)
    return pool


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_ipm_sends_minus_eps_times_the_mean_of_the_honest_changes_seen(eps: float) -> None:
    bad = BadWorkers({3: f"ipm-{eps}"})
    pool = _seen(bad, range(10, 14))
    own = change(99)
    got = bad.corrupt(3, own)
    assert_same_form(got, own)
    for i, a in enumerate(got):
        mean = np.mean([p[i] for p in pool], axis=0)
        np.testing.assert_allclose(a, -eps * mean, rtol=1e-5, atol=1e-9)


def test_ipm_with_nothing_seen_uses_its_own_change() -> None:
    own = change(5)
    got = BadWorkers({3: "ipm-0.5"}).corrupt(3, own)
    for a, h in zip(got, own):
        np.testing.assert_allclose(a, -0.5 * h, rtol=1e-6)


def test_alie_sends_the_mean_minus_z_standard_deviations() -> None:
    bad = BadWorkers({3: "alie"})
    pool = _seen(bad, range(20, 25))
    own = change(99)
    got = bad.corrupt(3, own)
    assert_same_form(got, own)
    assert all(a.dtype == np.float32 for a in got)
    for i, a in enumerate(got):
        stack = np.stack([p[i] for p in pool])
        np.testing.assert_allclose(a, stack.mean(0) - ALIE_Z * stack.std(0), rtol=1e-5, atol=1e-8)


def test_the_colluders_remember_only_the_last_history_changes() -> None:
    bad = BadWorkers({3: "ipm-0.5"})
    pool = _seen(bad, range(HISTORY + 5))
    got = bad.corrupt(3, change(99))
    for i, a in enumerate(got):
        mean = np.mean([p[i] for p in pool[-HISTORY:]], axis=0)
        np.testing.assert_allclose(a, -0.5 * mean, rtol=1e-5, atol=1e-9)


def test_seen_keeps_a_copy() -> None:
    bad = BadWorkers({3: "ipm-0.5"})
    c = change(1)
    bad.seen(c)
    expected = [-0.5 * a.copy() for a in c]
    for a in c:
        a[...] = 1000.0  # the caller's arrays change afterwards
    for a, e in zip(bad.corrupt(3, change(2)), expected):
        np.testing.assert_allclose(a, e, rtol=1e-6)


def test_free_rider_sends_zeros_first_then_a_copy_of_the_last_honest_change() -> None:
    bad = BadWorkers({4: "free-rider"})
    pool = _seen(bad, range(30, 33))
    own = change(99)
    first = bad.corrupt(4, own)
    assert_same_form(first, own)
    assert all(not np.any(a) for a in first)
    for _ in range(3):
        got = bad.corrupt(4, own)
        assert_same_form(got, own)
        for a, h in zip(got, pool[-1]):
            np.testing.assert_array_equal(a, h)  # exactly: its bytes are a replay
            assert a.dtype == h.dtype
    newer = change(40)
    bad.seen(newer)
    for a, h in zip(bad.corrupt(4, own), newer):
        np.testing.assert_array_equal(a, h)
    # the copy is its own: changing it does not change what the attacker remembers
    got = bad.corrupt(4, own)
    got[0][...] = 7.0
    np.testing.assert_array_equal(bad.corrupt(4, own)[0], newer[0])


def test_a_free_rider_with_nothing_to_copy_keeps_sending_zeros() -> None:
    bad = BadWorkers({4: "free-rider"})
    for _ in range(3):
        assert all(not np.any(a) for a in bad.corrupt(4, change(1)))


def test_each_slot_counts_its_own_changes() -> None:
    bad = BadWorkers({2: "free-rider", 3: "free-rider"})
    _seen(bad, range(2))
    assert all(not np.any(a) for a in bad.corrupt(2, change(9)))
    assert all(not np.any(a) for a in bad.corrupt(3, change(9)))  # slot 3's first: zeros too
    assert all(np.any(a) for a in bad.corrupt(2, change(9)))


def test_every_mode_is_handled() -> None:
    honest = change(1)
    for mode in MODES:
        bad = BadWorkers({1: mode})
        bad.seen(change(2))
        bad.seen(change(3))
        got = bad.corrupt(1, honest)
        assert_same_form(got, honest)
    bad = BadWorkers({1: "teleport"})  # a mode parse would refuse, set directly
    with pytest.raises(ValueError, match="teleport"):
        bad.corrupt(1, honest)
