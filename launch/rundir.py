"""Where a cluster's sockets live: a private folder (mode 0700) per cluster, found again by the CLI.

Layout: <base>/cluster-<pid>-<random>/{cluster.json, coordinator.sock, worker-N.sock}. <base> is
$FIDDLER_RUNTIME_DIR, else $XDG_RUNTIME_DIR/fiddler-moe, else /tmp/fiddler-moe-<uid>. Folders of clusters whose
launcher is gone are stale and removed at the next launch; live ones are never touched. Files kept between runs
(checkpoints the project writes, kernels it builds) go to host/paths.py's `cache_dir()` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ClusterInfo:
    pid: int
    address: str
    model: str
    started: float


def base_dir() -> Path:
    if os.environ.get("FIDDLER_RUNTIME_DIR"):
        base = Path(os.environ["FIDDLER_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR") and os.access(os.environ["XDG_RUNTIME_DIR"], os.W_OK):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "fiddler-moe"
    else:
        base = Path(tempfile.gettempdir()) / f"fiddler-moe-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = base.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(
            f"{base} must be a folder of yours with mode 0700 (it holds the cluster's sockets); "
            f"fix it with: chmod 700 {base}, or set FIDDLER_RUNTIME_DIR to another folder"
        )
    return base


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(folder: Path) -> int | None:
    try:
        return int(folder.name.split("-")[1])
    except (IndexError, ValueError):
        return None


def remove_stale(base: Path) -> list[Path]:
    """Remove the folders of clusters whose launcher process no longer exists."""
    removed = []
    for folder in base.glob("cluster-*"):
        pid = _owner_pid(folder)
        if pid is not None and not alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def create() -> Path:
    base = base_dir()
    remove_stale(base)
    return Path(tempfile.mkdtemp(prefix=f"cluster-{os.getpid()}-", dir=base))


def publish(folder: Path, info: ClusterInfo) -> None:
    tmp = folder / "cluster.json.tmp"
    tmp.write_text(json.dumps(asdict(info)))
    os.replace(tmp, folder / "cluster.json")


def live_clusters() -> list[ClusterInfo]:
    """Running clusters of this user, newest first."""
    found = []
    for path in base_dir().glob("cluster-*/cluster.json"):
        try:
            info = ClusterInfo(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if alive(info.pid):
            found.append(info)
    return sorted(found, key=lambda c: c.started, reverse=True)
