"""The model card: a JSON file beside ``model.keras`` saying what the model is and how it
was made — dataset digest, hyperparameters and plan, members, every evaluation, time — and
how to use it (TF-free; the host job writes it, the host daemon adds the members)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from crowdd.data.manifest import Layout
from crowdd.wire import dumps

CARD_NAME = "model.card.json"


def class_names(layout: Layout) -> list[str]:
    """The name of each output unit, in order (the class numbers of the labels)."""
    return list(layout.class_names) or [str(i) for i in range(layout.num_classes)]


def usage(model_path: Path, layout: Layout) -> str:
    """One line of Python that loads the model and predicts on raw features."""
    shape = ", ".join(str(d) for d in layout.feature_shape)
    what = "y = model.predict(x)[:, 0]" if layout.task == "regression" else "classes = model.predict(x).argmax(-1)"
    return (f"import keras, numpy as np; model = keras.models.load_model({str(model_path)!r}); "
            f"x = np.asarray(x, 'float32').reshape(-1, {shape}); {what}  # x: raw features, as in the dataset")


def usage_hint(model_path: str) -> list[str]:
    """What a user is told next to a finished model's path: how to use it, where its card is."""
    card = Path(model_path).with_name(CARD_NAME)
    return [f"import keras; model = keras.models.load_model({model_path!r}); model.predict(x)"
            "  # x: raw features, as in the dataset",
            f"model card (classes, metrics, how it was trained): {card}"]


def build_card(
    *, model_path: Path, layout: Layout, dataset: dict[str, Any], job: dict[str, Any], settings: dict[str, Any],
    workers: int, evaluations: list[dict[str, Any]], started: float, steps: int, total_steps: int, stopped: bool,
    checkpoint: str | None,
) -> dict[str, Any]:
    now = time.time()
    last = evaluations[-1] if evaluations else {}
    return {
        "format": "crowdd-model-card/1",
        "model": str(model_path),
        "usage": usage(model_path, layout),
        "input": {"shape": list(layout.feature_shape), "raw": True,
                  "note": "features as in the dataset; scaling and centering are inside the model"},
        "output": ({"kind": "regression", "note": "one number per sample, in the target's units"}
                   if layout.task == "regression" else
                   {"kind": "classification", "classes": class_names(layout),
                    "note": "softmax probabilities, one per class; argmax is the class index"}),
        "dataset": {**dataset, "train_records": layout.train_count, "test_records": layout.test_count},
        "hyperparameters": job,
        "plan": settings,
        "workers": workers,
        "members": [],
        "evaluations": evaluations,
        **{k: last.get(k) for k in (("test_mae", "test_mse") if layout.task == "regression" else ("test_accuracy",))},
        "test_loss": last.get("test_loss"),
        "steps": steps,
        "total_steps": total_steps,
        "stopped_early": stopped,
        "checkpoint": checkpoint,
        "started": round(started, 3),
        "finished": round(now, 3),
        "seconds": round(now - started, 3),
    }


def write_card(path: Path, card: dict[str, Any]) -> None:
    """Write atomically (strict JSON: a non-finite number is null)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(card, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def with_members(raw: bytes, members: list[dict[str, Any]]) -> bytes | None:
    """The card ``raw`` with the members the host daemon knows trained (None: not a card)."""
    try:
        card = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(card, dict):
        return None
    card["members"] = members
    return (dumps(card, indent=2) + "\n").encode("utf-8")


__all__ = ["CARD_NAME", "build_card", "class_names", "usage", "usage_hint", "with_members", "write_card"]
