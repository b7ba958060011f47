"""The peer benchmark of W11/W12 (DBOS Transact) run from our commands, and
its counting wire proxy used for our statements too.

The peer's scripts live outside the repository (``../shared/peer-bench/
workflows-dbos`` of a checkout, or ``TRIO_CLUSTER_PEER_BENCH``); its venv is
``.venv-dbos`` at the repository root (or ``TRIO_CLUSTER_PEER_PYTHON``). When
either is missing, the peer's figures are skipped and said so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import REPO, progress

ENV_DIR = "TRIO_CLUSTER_PEER_BENCH"
ENV_PYTHON = "TRIO_CLUSTER_PEER_PYTHON"


def peer_dir() -> Path | None:
    """The folder of the peer's scripts (``w11.py``, ``pgwire_count.py``)."""
    given = os.environ.get(ENV_DIR)
    candidates = [Path(given)] if given else []
    candidates.extend(
        parent / "shared" / "peer-bench" / "workflows-dbos" for parent in REPO.parents
    )
    for candidate in candidates:
        if (candidate / "pgwire_count.py").exists():
            return candidate
    return None


def peer_python() -> Path | None:
    """The python of the peer's venv, if it is installed."""
    given = os.environ.get(ENV_PYTHON)
    python = Path(given) if given else REPO / ".venv-dbos" / "bin" / "python"
    return python if python.exists() else None


def wire_counter(host: str, port: int) -> Any:
    """A started `PgWireCounter` (the peer's proxy, in a thread of this
    process) forwarding to ``host:port``; None without the peer's folder."""
    folder = peer_dir()
    if folder is None:
        return None
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    from pgwire_count import PgWireCounter  # type: ignore[import-not-found]

    counter = PgWireCounter(host, port)
    counter.start()
    return counter


def run_peer(
    script: str, env: dict[str, str], *, seconds: float
) -> list[dict[str, Any]]:
    """Run the peer's ``script`` with ``env`` added; its JSON figures (empty,
    with a note on stderr, if it cannot run or fails)."""
    folder, python = peer_dir(), peer_python()
    if folder is None or python is None:
        progress(f"peer {script}: skipped (no peer folder or no .venv-dbos)")
        return []
    try:
        done = subprocess.run(
            [str(python), script],
            cwd=folder,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        progress(f"peer {script}: timed out after {seconds} s")
        return []
    if done.returncode != 0:
        progress(f"peer {script} failed ({done.returncode}): {done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line[:1] == "{"]
