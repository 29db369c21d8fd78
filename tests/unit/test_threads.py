"""The environment that caps a job's CPU threads."""

from __future__ import annotations

from crowdd.platform.threads import thread_env


def test_thread_env_caps_every_pool() -> None:
    env = thread_env(3)
    assert env["TF_NUM_INTRAOP_THREADS"] == "3"
    assert env["OMP_NUM_THREADS"] == "3"
    assert set(env.values()) == {"3"}
    assert thread_env(0)["MKL_NUM_THREADS"] == "1"
