"""The dataset manifest: what a canonical file must be, chunk by chunk.

The manifest records the file's size, the chunk size, the sha256 of every chunk and of
the whole file, and the record layout TensorFlow needs to read it (see
``docs/dataset-format.md``). Its own digest (:meth:`Manifest.digest`, the sha256 of its
canonical JSON) is what the host hands the matchmaker; a node trusts a manifest only if it
hashes to that digest, and a chunk only if it hashes to the manifest's entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crowdd.route import MAX_CHUNK

MANIFEST_VERSION = 1
DEFAULT_CHUNK = 1 << 20
_HEX = "0123456789abcdef"


class ManifestError(ValueError):
    """A manifest that is malformed, or data that does not match it."""


@dataclass(frozen=True)
class Layout:
    """Fixed-length records: a little-endian int32 label, then the features.

    Train records come first, then test records. Features are ``feature_dtype``
    (``uint8`` or ``float32``, little-endian) in row-major ``feature_shape``; multiply by
    ``scale`` to get model inputs.
    """

    feature_shape: tuple[int, ...]
    feature_dtype: str
    scale: float
    num_classes: int
    train_count: int
    test_count: int
    #: the name of each class (image folders: the subdirectory names); () means 0, 1, 2, …
    class_names: tuple[str, ...] = ()
    #: "classification" (int32 labels, one output per class) or "regression" (float32
    #: targets, ``num_classes`` 1)
    task: str = "classification"

    @property
    def feature_count(self) -> int:
        n = 1
        for d in self.feature_shape:
            n *= d
        return n

    @property
    def label_bytes(self) -> int:
        return 4

    @property
    def record_bytes(self) -> int:
        itemsize = {"uint8": 1, "float32": 4}[self.feature_dtype]
        return self.label_bytes + self.feature_count * itemsize

    @property
    def test_offset(self) -> int:
        return self.train_count * self.record_bytes

    @property
    def total_bytes(self) -> int:
        return (self.train_count + self.test_count) * self.record_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_shape"] = list(self.feature_shape)
        # optional keys only when set: an older layout keeps its digest
        d.pop("class_names")
        d.pop("task")
        if self.class_names:
            d["class_names"] = list(self.class_names)
        if self.task != "classification":
            d["task"] = self.task
        d["record_bytes"] = self.record_bytes
        d["label_bytes"] = self.label_bytes
        d["test_offset"] = self.test_offset
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Layout:
        if not isinstance(d, dict):
            raise ManifestError("layout must be an object")
        try:
            layout = cls(
                feature_shape=tuple(int(x) for x in d["feature_shape"]),
                feature_dtype=str(d["feature_dtype"]),
                scale=float(d["scale"]),
                num_classes=int(d["num_classes"]),
                train_count=int(d["train_count"]),
                test_count=int(d["test_count"]),
                class_names=tuple(str(n) for n in d.get("class_names", ())),
                task=str(d.get("task", "classification")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"bad layout: {exc!r}") from None
        if layout.feature_dtype not in ("uint8", "float32"):
            raise ManifestError(f"unknown feature_dtype {layout.feature_dtype!r}")
        if not layout.feature_shape or min(layout.feature_shape) < 1:
            raise ManifestError("feature_shape must be positive")
        if layout.task not in ("classification", "regression"):
            raise ManifestError(f"unknown task {layout.task!r}")
        if layout.task == "regression" and (layout.num_classes != 1 or layout.class_names):
            raise ManifestError("a regression layout has one output and no class names")
        if layout.task == "classification" and layout.num_classes < 2:
            raise ManifestError("layout needs >= 2 classes and >= 1 training record")
        if layout.class_names and len(layout.class_names) != layout.num_classes:
            raise ManifestError(f"{len(layout.class_names)} class names for {layout.num_classes} classes")
        if layout.train_count < 1 or layout.test_count < 0:
            raise ManifestError("layout needs >= 2 classes and >= 1 training record")
        derived = layout.to_dict()
        for key in ("record_bytes", "label_bytes", "test_offset"):
            if key in d and d[key] != derived[key]:
                raise ManifestError(f"layout {key} is {d[key]!r} but its fields give {derived[key]}")
        return layout


@dataclass(frozen=True)
class Manifest:
    size: int
    chunk_size: int
    chunks: tuple[str, ...]
    sha256: str
    layout: Layout | None = None
    name: str = ""

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        if not 0 <= index < self.num_chunks:
            raise ManifestError(f"chunk {index} out of range 0..{self.num_chunks - 1}")
        start = index * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def chunk_ok(self, index: int, data: bytes) -> bool:
        _, length = self.chunk_span(index)
        return len(data) == length and hashlib.sha256(data).hexdigest() == self.chunks[index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "sha256": self.sha256,
            "layout": self.layout.to_dict() if self.layout else None,
        }

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, compact): what :meth:`digest` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"unsupported manifest version {d.get('version')!r}")
        try:
            size, chunk_size = int(d["size"]), int(d["chunk_size"])
            chunks = tuple(str(c) for c in d["chunks"])
            sha = str(d["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"bad manifest: {exc!r}") from None
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ManifestError(f"manifest chunk size {chunk_size:,} bytes is outside 1..{MAX_CHUNK:,}")
        if size < 0 or len(chunks) != -(-size // chunk_size):
            raise ManifestError("manifest size, chunk size and chunk count disagree")
        if any(len(c) != 64 or c.strip(_HEX) for c in (*chunks, sha)):
            raise ManifestError("manifest hashes must be sha256 hex")
        layout = Layout.from_dict(d["layout"]) if d.get("layout") is not None else None
        if layout is not None and layout.total_bytes != size:
            raise ManifestError(f"layout describes {layout.total_bytes} bytes but the file has {size}")
        return cls(size, chunk_size, chunks, sha, layout, str(d.get("name", "")))

    @classmethod
    def from_json(cls, raw: bytes | str, *, expect_digest: str | None = None) -> Manifest:
        """Parse a manifest; with ``expect_digest``, refuse one that does not hash to it."""
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from None
        manifest = cls.from_dict(obj)
        if expect_digest is not None and manifest.digest() != expect_digest:
            raise ManifestError("manifest does not match the digest from the matchmaker")
        return manifest

    @classmethod
    def build(
        cls, path: Path, *, chunk_size: int = DEFAULT_CHUNK, layout: Layout | None = None, name: str = ""
    ) -> Manifest:
        """Hash a file chunk by chunk."""
        chunks = []
        whole = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            while block := fh.read(chunk_size):
                chunks.append(hashlib.sha256(block).hexdigest())
                whole.update(block)
                size += len(block)
        if layout is not None and layout.total_bytes != size:
            raise ManifestError(f"layout describes {layout.total_bytes} bytes but {path} has {size}")
        return cls(size, chunk_size, tuple(chunks), whole.hexdigest(), layout, name)

    def verify_file(self, path: Path) -> None:
        """Raise :class:`ManifestError` unless the file matches this manifest exactly."""
        other = Manifest.build(path, chunk_size=self.chunk_size)
        if other.size != self.size or other.sha256 != self.sha256:
            raise ManifestError(f"{path} does not match the manifest (size or sha256 differ)")
