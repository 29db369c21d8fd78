"""Turns: plan targets are served one at a time, in plan order; a late or departed one is skipped."""

from __future__ import annotations

import asyncio

from crowdd.replication.turns import Turns


async def test_targets_go_in_plan_order() -> None:
    turns = Turns([1, 2], late_bound=5.0)
    assert turns.planned(1) and turns.planned(2) and not turns.planned(3)
    assert not await turns.acquire(2, keepalive=0.05)  # 1 goes first; 2 keeps waiting
    assert await turns.acquire(1, keepalive=0.05)
    assert not await turns.acquire(2, keepalive=0.05)  # 1 is still being served
    await turns.release(1, completed=True)
    assert not turns.planned(1)
    assert await turns.acquire(2, keepalive=0.05)


async def test_a_late_target_is_skipped() -> None:
    turns = Turns([1, 2], late_bound=0.1)
    assert await asyncio.wait_for(turns.acquire(2, keepalive=2.0), 1.0)
    assert turns.skipped == {1}


async def test_a_target_that_leaves_no_longer_holds_up_the_others() -> None:
    turns = Turns([1, 2], late_bound=5.0)
    assert not await turns.acquire(2, keepalive=0.05)
    await turns.leave(1)
    assert await turns.acquire(2, keepalive=0.05)
    await turns.release(2, completed=False)
    assert turns.skipped == {1, 2} and turns.active is None
