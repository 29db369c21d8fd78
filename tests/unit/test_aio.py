"""crowdd.aio: cancelling that waits, and tracked tasks."""

from __future__ import annotations

import asyncio

from crowdd.aio import cancel_and_wait, spawn_tracked


async def test_cancel_and_wait_cancels_and_awaits() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(task, None, done)
    assert task.cancelled() and done.done() and not done.cancelled()


async def test_a_task_that_swallows_one_cancel_is_cancelled_again() -> None:
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.append(1)
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait(task, timeout=2.0)
    assert swallowed == [1] and task.cancelled()


async def test_spawn_tracked_forgets_finished_tasks() -> None:
    tasks: set[asyncio.Task[None]] = set()
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    t = spawn_tracked(tasks, work())
    assert tasks == {t}
    gate.set()
    await t
    await asyncio.sleep(0)
    assert tasks == set()
