"""Writing files and folders whole or not at all: every output that a reader (a resumed job, a server, another
replica) may look at while it is written, or after a crash, goes through here.

A file is written under a unique hidden name beside its destination, flushed to disk, then renamed over it (or, with
``exclusive``, hard-linked to a name that must not exist yet), and its folder is synced, so that after a kill or a
power loss the name holds the old content or the new one, never a half; two writers never share a temporary name. A
folder is copied the same way and swapped in with renames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable. Some file systems (network mounts, FUSE) refuse to sync a folder: the
    rename has happened all the same, and durability there is the mount's own."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, *, exclusive: bool = False) -> None:
    """Write ``data`` (a str is written as UTF-8) to ``path`` whole or not at all.

    ``exclusive``: never replace an existing ``path``; ``FileExistsError`` if it exists (checked by the hard link
    that publishes the file, so two writers of one name cannot both win).
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    # os.open rather than mkstemp: the file gets the umask's ordinary permissions (mkstemp's are 0600), since what is
    # written here is read by other processes (servers, other replicas, the user)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
                if path.exists():
                    raise FileExistsError(f"{path} exists") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (before a rename publishes them)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """An empty folder (a unique hidden name beside ``dest``) to fill in the ``with`` block; when the block ends
    without an error it is synced to disk and renamed to ``dest``, replacing what ``dest`` held (the old folder is
    renamed aside, then removed). A reader of ``dest`` sees the old folder or the new one (or, for the instant between
    the two renames, no folder), never a half-written one, even after a crash; an error removes the staged folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the folder is read by servers as any other
        _fsync_tree(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


def publish_dir(src: str | Path, dest: str | Path) -> None:
    """Copy the folder ``src`` to ``dest`` through :func:`staged_dir`: a server loading ``dest`` at any moment sees
    the old folder or the new one, never a half-copied one."""
    with staged_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
