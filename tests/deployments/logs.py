"""Reading the ingress replicas' log files of the session's Ray cluster (Ray Serve writes one per replica)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

# Ray's default temporary directory; `session_latest` points at the newest session started on this machine.
_LATEST_LOGS = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"  # noqa: S108


def session_logs() -> Path:
    """The log folder of the Ray session this process is connected to. `session_latest` would be another
    cluster's once one starts beside this test session, so the connected node's own folder is read (Ray
    has no public call for it); with no connection, `session_latest`."""
    node = ray._private.worker._global_node
    return _LATEST_LOGS if node is None else Path(node.get_session_dir_path()) / "logs"


def _serve_logs() -> Path:
    return session_logs() / "serve"


def serve_log_text() -> str:
    """Everything Ray Serve's replicas, proxies and controller have logged in this session."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(_serve_logs().glob("*.log")))


def every_log_text() -> str:
    """Everything the session's processes wrote: Serve's log files, and every worker's, raylet's and
    daemon's stdout, stderr and log files (a `print` or an uncaught traceback in a replica lands in its
    worker's .out/.err, not in Serve's files). What must never be logged is looked for here."""
    logs = session_logs()
    paths = sorted({*(logs / "serve").glob("*.log"), *logs.glob("*.out"), *logs.glob("*.err")})
    paths += sorted(logs.glob("*.log"))
    return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


def serve_log_lines(app: str, needle: str, timeout: float = 15.0) -> list[str]:
    """Lines of `app`'s ingress replica logs that contain `needle`, waiting until there is one."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for path in sorted(_serve_logs().glob(f"replica_{app}_Ingress_*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if needle in line
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)
