"""A job's environment is an allowlist: the daemon's secrets never reach a group's graphs."""

from __future__ import annotations

from pathlib import Path

from crowdd.platform.jobenv import DEFAULT_PATH, job_env


def test_secrets_in_the_daemons_environment_stay_out_and_what_a_job_needs_stays_in(tmp_path: Path) -> None:
    daemon = {
        "PATH": "/opt/bin:/usr/bin", "LANG": "de_DE.UTF-8", "LC_TIME": "C", "TZ": "Europe/Berlin",
        "PYTHONPATH": "/srv/crowdd", "CROWDD_TEST_BYZANTINE": "2:nan",
        # what a member must never read
        "AWS_SECRET_ACCESS_KEY": "secret", "SSH_AUTH_SOCK": "/run/user/0/ssh", "HOME": "/root",
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/0/bus", "GITHUB_TOKEN": "ghp", "CROWDD_TOKEN": "t",
        "XDG_RUNTIME_DIR": "/run/user/0", "DISPLAY": ":0", "NOTIFY_SOCKET": "/run/systemd/notify",
    }
    env = job_env(daemon, tmp_path, 2)
    for k in ("PATH", "LANG", "LC_TIME", "TZ", "PYTHONPATH", "CROWDD_TEST_BYZANTINE"):
        assert env[k] == daemon[k], k
    for k in ("AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "GITHUB_TOKEN", "CROWDD_TOKEN",
              "XDG_RUNTIME_DIR", "DISPLAY", "NOTIFY_SOCKET"):
        assert k not in env, k
    assert env["HOME"] == str(tmp_path) and env["KERAS_HOME"] == str(tmp_path / ".keras")
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"] == "2"
    assert not {"secret", "ghp", "/run/user/0/ssh", "/run/user/0"} & set(env.values())


def test_a_daemon_started_without_path_still_gives_its_job_one(tmp_path: Path) -> None:
    assert job_env({}, tmp_path, 1)["PATH"] == DEFAULT_PATH
