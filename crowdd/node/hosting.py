"""A host request's whole life on this node: the hosting desk.

``crowdd host`` reaches the daemon as a :class:`~crowdd.protocol.control.HostRequest`. The desk
(:class:`HostingDesk`) checks that this node is free to host, copies in a dataset that was
handed over (:mod:`crowdd.data.handoff`), converts it into the cache (the user learns at once
whether it is accepted, and why not), and records it for a restart (:mod:`crowdd.node.resume`).
The daemon's next cycle hosts what the desk holds; the desk forgets it when that session ends
or the user stops it. A daemon stopped mid-session keeps the record, and at its next start the
desk hands the same session back, from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from crowdd import wire
from crowdd.data.cache import DatasetCache
from crowdd.errors import CrowddError, InputError
from crowdd.data.handoff import remove_staging
from crowdd.data.modelfile import check_model_file
from crowdd.node import disk
from crowdd.node.checkpoints import latest_checkpoint
from crowdd.node.hosted import HostedJob
from crowdd.node.resume import HostingRecord
from crowdd.node.states import State
from crowdd.node.status import StatusView
from crowdd.protocol.control import HostRequest

log = logging.getLogger(__name__)

INCOMING = "incoming"  # under the cache directory: datasets handed over, until converted


def convert_dataset(cache: DatasetCache, chunk_size: int, req: HostRequest) -> HostedJob:
    """Convert the dataset to the canonical file + manifest in the cache (blocking: run it in
    a thread). A dataset that cannot be hosted raises :class:`InputError` (field ``dataset``)
    naming the file and what is wrong, so the control socket refuses the request with it."""
    from crowdd.data import datasets  # numpy: only when hosting

    try:
        p = datasets.convert(req.dataset, cache.root, chunk_size=chunk_size, test_fraction=req.test_fraction,
                             label=req.label, images=datasets.ImageOptions(req.image_size, req.color), task=req.task,
                             name=datasets.default_name(req.shown))
    except datasets.DatasetError as exc:
        raise InputError(f"cannot host {req.shown}: {req.as_shown(str(exc))}", field="dataset") from None
    except OSError as exc:
        raise InputError(f"cannot host {req.shown}: {req.as_shown(str(exc))}", field="dataset") from None
    if req.model_file is not None and p.manifest.layout is not None:
        check_model_file(req.model_file, p.manifest.layout)  # InputError naming what does not fit
    path = cache.has(p.manifest) or p.data_path
    return HostedJob(path, p.manifest, p.manifest.name or req.shown.name, req.job, req.model_file)


def describe(prepared: HostedJob) -> dict[str, Any]:
    """What the host's ``ok`` reply and its status say about an accepted dataset."""
    m = prepared.manifest
    d: dict[str, Any] = {"name": prepared.name, "size": m.size, "digest": m.digest()}
    if m.layout is not None:
        d.update(train=m.layout.train_count, test=m.layout.test_count, classes=m.layout.num_classes,
                 shape=list(m.layout.feature_shape))
    return d


class HostingDesk:
    """What this node hosts: ``request`` and its ``prepared`` dataset once accepted (the next
    cycle hosts it), ``pending`` while its dataset is converted, ``resume_from`` the job
    directory of a session a restart interrupted. ``disk_max_gb()`` is ``[limits] disk_max_gb``
    (0: no cap); ``prune(reserve=…)`` makes room under it."""

    def __init__(self, state_dir: Path, cache_dir: Path, cache: DatasetCache, view: StatusView, *,
                 chunk_size: Callable[[], int], disk_max_gb: Callable[[], float],
                 prune: Callable[..., Awaitable[None]]) -> None:
        self.record = HostingRecord(state_dir)  # what a restart mid-session resumes
        self.incoming = cache_dir / INCOMING
        self.cache, self.view = cache, view
        self.chunk_size, self.disk_max_gb, self.prune = chunk_size, disk_max_gb, prune
        self.request: HostRequest | None = None
        self.prepared: HostedJob | None = None
        self.pending: HostRequest | None = None  # its dataset is being converted
        self.resume_from: Path | None = None  # the interrupted session's job dir (checkpoints)
        self._staging: Path | None = None  # the copy of a handed-over dataset (crowdd.data.handoff)

    def start(self) -> None:
        """At the daemon's start: what a killed daemon left, and a session to resume."""
        remove_staging(self.incoming)  # left by a daemon that was killed
        self._load_interrupted()

    def _load_interrupted(self) -> None:
        """A session this node hosted when it stopped mid-way: host it again, from its last
        checkpoint; or say in the status why that cannot be done."""
        interrupted, why = self.record.load(self.cache)
        if why is not None:
            self.record.clear()
            message = f"the session this node hosted when it stopped cannot be resumed: {why}"
            self.view.begin("host")
            self.view.fail(message)
            self.view.log(logging.ERROR, message)
            self.view.end()
            return
        if interrupted is None:
            return
        p = interrupted.prepared
        self.request = HostRequest(dataset=p.data_path, job=p.job, model_file=p.model_file)
        self.prepared = p
        self.resume_from = interrupted.workdir
        ckpt = latest_checkpoint(interrupted.workdir) if interrupted.workdir is not None else None
        self.view.log(logging.INFO, f"resuming the session this node hosted when it stopped ({p.name}"
                      + (f", from its checkpoint {ckpt.name}" if ckpt is not None else "") + "); looking for workers")

    def check(self, state: State, *, preparing: bool = True) -> None:
        """This node may take a host request now (it is not hosting, nor busy as a worker)."""
        role = self.view.role
        if self.request is not None or role == "host" or (preparing and self.pending is not None):
            raise wire.WireError(wire.ErrorCode.BUSY, "already hosting; `crowdd stop` ends that session first")
        if role == "worker" and state not in (State.STANDBY, State.REGISTERING, State.WAITING):
            raise wire.WireError(wire.ErrorCode.BUSY, f"this node is {state.value} as a worker; `crowdd stop` first")

    async def take(self, request: HostRequest, state: Callable[[], State]) -> HostedJob:
        """Accept ``request``: its dataset converted into the cache and recorded. The reply
        waits for the conversion: the user learns at once whether it is accepted, and why not
        (file, line, column, as an :class:`InputError`) when it is not."""
        self.check(state())
        self.pending = pending = request
        try:
            if request.upload is not None:  # handed over (crowdd.data.handoff): copy it in first
                request = await self._stage(request)
                self.view.log(logging.INFO, f"asked to host {request.shown} (handed over, copied to "
                              f"{request.dataset}); preparing it")
            else:
                self.view.log(logging.INFO, f"asked to host {request.shown}; preparing it")
            prepared = await asyncio.get_running_loop().run_in_executor(
                None, convert_dataset, self.cache, self.chunk_size(), request
            )
        except InputError as exc:
            self.view.log(logging.ERROR, exc.message)
            raise
        finally:
            self.drop_staging()  # converted into the cache (or refused): the copy has served
            if self.pending is pending:
                self.pending = None
            else:  # stopped while it was being prepared
                raise wire.WireError(wire.ErrorCode.BUSY, "stopped while the dataset was being prepared")
        self.check(state(), preparing=False)
        self.request, self.prepared = request, prepared
        self.record.save(prepared)
        self.resume_from = None
        return prepared

    async def _stage(self, request: HostRequest) -> HostRequest:
        """Copy the files a client handed over into the cache's ``incoming`` directory; the
        request then names that copy. Kept while the request is, then removed."""
        upload = request.upload
        assert upload is not None
        if self._staging is not None:
            raise wire.WireError(wire.ErrorCode.BUSY, "already receiving a dataset")
        staging = self.incoming / secrets.token_hex(8)
        self._staging = staging
        target = staging / (request.dataset.name or "dataset") if upload.is_dir else staging
        gb = self.disk_max_gb()
        cap = disk.gb_to_bytes(gb) if gb > 0 else None
        if cap is not None and upload.total() > cap:
            self._staging = None
            raise InputError(f"the dataset ({upload.total():,} bytes) is larger than this node may keep "
                             f"([limits] disk_max_gb = {gb:g})", field="dataset")
        await self.prune(reserve=upload.total())
        try:
            path = await asyncio.to_thread(upload.copy_into, target, max_bytes=cap)
        except OSError as exc:
            self.drop_staging()
            raise CrowddError(f"cannot copy the dataset into {staging.parent}: {exc.strerror or exc}") from None
        except BaseException:
            self.drop_staging()
            raise
        return dataclasses.replace(request, dataset=path, upload=None, origin=request.dataset)

    def drop_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is not None:
            remove_staging(staging)

    def withdraw(self) -> None:
        """``crowdd stop``: nothing is hosted any more (a session running is ended by the daemon)."""
        self.request = self.prepared = self.pending = None
        self.drop_staging()

    def ended(self, *, closing: bool, finished: bool) -> None:
        """The hosted session's cycle ended. It ended for good (done, failed, stopped), or its
        job finished before the daemon was stopped: nothing to resume. A daemon stopped
        (``closing``) mid-run resumes it at its next start."""
        self.request = self.prepared = None
        if not closing or finished:
            self.record.clear()
            self.resume_from = None


__all__ = ["INCOMING", "HostingDesk", "convert_dataset", "describe"]
