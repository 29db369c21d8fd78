"""crowdd as a Windows service (pywin32 ``ServiceFramework``).

Install with ``install.ps1`` (or ``python service.py --startup auto install``). The service
runs the same daemon as ``crowdd daemon`` with every file below ``%ProgramData%\\crowdd``
(config ``crowdd.toml``, ``state``, ``cache``, ``log``, ``run``); the control endpoint is
loopback TCP with its token in ``run\\control.token``, so ``crowdd status --root
%ProgramData%\\crowdd`` (or the TUI with the same ``--root``) talks to it.

Only the Windows part imports pywin32; the start/stop logic lives in
:class:`crowdd.platform.windows_service.ServiceRunner`, tested on Linux, and :func:`daemon_entry`
(the daemon behind a stop event) runs on any platform.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowdd.config import Paths
from crowdd.platform.windows_service import DaemonEntry, ServiceRunner

logger = logging.getLogger("crowdd.windows_service")

SERVICE_NAME = "crowdd"
DISPLAY_NAME = "crowdd volunteer training daemon"
DESCRIPTION = "Donates this machine's idle time to train neural networks together (crowdd)."


def default_root() -> Path:
    return Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "crowdd"


def service_paths(root: Path) -> Paths:
    """The service's layout: everything below ``root`` (the CLI reaches it with ``--root``)."""
    return Paths.under(root)


def daemon_entry(root: Path, *, tcp: bool | None = None) -> DaemonEntry:
    """The daemon as ``(threading.Event) -> exit status``: it stops when the event is set (the
    same node ``crowdd daemon`` builds: :func:`crowdd.node.entry.service_entry`)."""
    from crowdd.node.entry import service_entry

    return service_entry(service_paths(root), system=True, tcp=tcp)


def lower_priority() -> None:
    """IDLE_PRIORITY_CLASS for the service and (inherited) its job child."""
    try:
        import psutil

        idle = getattr(psutil, "IDLE_PRIORITY_CLASS", None)
        psutil.Process().nice(idle if idle is not None else 19)
    except (ImportError, OSError) as exc:
        logger.warning("cannot lower the service's priority: %s", exc)
    except Exception as exc:  # noqa: BLE001 - psutil.Error and friends: never fatal
        logger.warning("cannot lower the service's priority: %s", exc)


def setup_service_logging(paths: Paths) -> None:
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(paths.log_dir / "crowdd.log", maxBytes=5 << 20, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    if sys.platform != "win32":
        raise SystemExit("packaging/windows/service.py runs only on Windows; on Linux use the systemd units")
    _windows_main(list(sys.argv if argv is None else [sys.argv[0], *argv]))
    return 0


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import servicemanager
    import win32service
    import win32serviceutil

    class CrowddService(win32serviceutil.ServiceFramework):
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.runner = ServiceRunner(daemon_entry(default_root()), name=SERVICE_NAME)

        def SvcDoRun(self) -> None:
            servicemanager.LogMsg(
                servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STARTED, (self._svc_name_, "")
            )
            paths = service_paths(default_root())
            setup_service_logging(paths)
            lower_priority()
            code = self.runner.run()
            if code != 0 and not self.runner.stop_requested:
                servicemanager.LogErrorMsg(f"crowdd daemon exited with status {code}; see {paths.log_dir}")
            servicemanager.LogMsg(
                servicemanager.EVENTLOG_INFORMATION_TYPE, servicemanager.PYS_SERVICE_STOPPED, (self._svc_name_, "")
            )

        def _report_stop_pending(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=30_000)

        def SvcStop(self) -> None:
            self.runner.stop(report_pending=self._report_stop_pending)

        def SvcShutdown(self) -> None:
            self.SvcStop()

    def _windows_main(argv: list[str]) -> None:
        if len(argv) == 1:
            # started by the service control manager (pythonservice.exe / frozen exe)
            servicemanager.Initialize()
            servicemanager.PrepareToHostSingle(CrowddService)
            servicemanager.StartServiceCtrlDispatcher()
        else:
            win32serviceutil.HandleCommandLine(CrowddService, argv=argv)

else:

    def _windows_main(argv: list[str]) -> None:
        raise SystemExit("packaging/windows/service.py runs only on Windows")


if __name__ == "__main__":
    raise SystemExit(main())
