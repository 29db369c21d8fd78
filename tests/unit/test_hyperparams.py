"""Hyperparameters: one set of rules, each impossible value named."""

from __future__ import annotations

from typing import Any

import pytest

from crowdd.hyperparams import (
    HyperparamError,
    Job,
    check_field,
    parse_hidden,
    validate_job,
)


def test_defaults() -> None:
    assert validate_job({}) == Job()
    assert Job().to_dict()["hidden"] == [100]


def test_valid_job() -> None:
    job = validate_job({
        "model": "cnn", "hidden": "128,64", "optimizer": "adam", "learning_rate": 0.01,
        "batch_size": 32, "epochs": 3, "workers": 4, "min_workers": 2, "wait": 30,
        "sharding": "overlap",
    })
    assert job.hidden == (128, 64) and job.workers == 4 and job.wait == 30.0
    assert validate_job(job.to_dict()) == job  # to_dict round-trips


def test_integral_float_accepted_for_int() -> None:
    assert validate_job({"epochs": 2.0}).epochs == 2


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": 1000}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": "0.1"}, "learning_rate"),
        ({"learning_rate": True}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": 1 << 30}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": -3}, "epochs"),
        ({"epochs": "1"}, "epochs"),
        ({"workers": -1}, "workers"),
        ({"workers": 1025}, "workers"),
        ({"workers": True}, "workers"),
        ({"workers": 2, "min_workers": 3}, "min_workers"),
        ({"min_workers": -1}, "min_workers"),
        ({"wait": -1}, "wait"),
        ({"wait": 10**6}, "wait"),
        ({"model": "transformer"}, "model"),
        ({"model": None}, "model"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"sharding": "random"}, "sharding"),
        ({"loss": "mse"}, "loss"),
        ({"hidden": []}, "hidden"),
        ({"hidden": [0]}, "hidden"),
        ({"hidden": [100000]}, "hidden"),
        ({"hidden": "a,b"}, "hidden"),
        ({"hidden": [1] * 17}, "hidden"),
        ({"hidden": [1.5]}, "hidden"),
        ({"hidden": 5}, "hidden"),
        ({"dropout": 0.1}, "dropout"),
    ],
)
def test_impossible_values_name_the_field(job: dict[str, Any], field: str) -> None:
    with pytest.raises(HyperparamError) as info:
        validate_job(job)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_not_a_mapping() -> None:
    with pytest.raises(HyperparamError) as info:
        validate_job([1, 2])  # type: ignore[arg-type]
    assert info.value.field == "job"


def test_parse_hidden() -> None:
    assert parse_hidden("128, 64") == (128, 64)
    assert parse_hidden("128-64") == (128, 64)
    assert parse_hidden([10]) == (10,)


def test_check_field() -> None:
    assert check_field("learning_rate", 0.1) is None
    assert check_field("min_workers", 5) is None
    msg = check_field("learning_rate", -1)
    assert msg is not None and "> 0" in msg
    assert check_field("model", "x") is not None
