"""Atomic outputs: every file or folder repq-tvm writes appears whole or not at all.

Why: an interrupted run (Ctrl-C, kill, full disk) must leave the previous calibrated file or artifact
intact, never a half-written one that loads. Each output is written into a hidden temporary sibling
(same folder, so the final rename stays on one filesystem) and renamed into place only when complete;
a failure removes the temporary. A folder replaces its previous version with one atomic exchange
(Linux `renameat2(RENAME_EXCHANGE)`), or two renames where that call is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile

from .errors import ReqError

TEMP_PREFIX = ".repq-tmp-"


def ensure_parent(path: str) -> str:
    """Create the folder that will hold `path` and check a new file can be made in it; a clear ReqError when
    either cannot be."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror or exc
        raise ReqError(f"cannot create the output folder {parent}: {why}") from None
    try:  # a real new file, not os.access: root passes access() where the filesystem still refuses (/proc)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ReqError(f"cannot write into the output folder {parent}: {exc.strerror or exc}") from None
    return parent


def _default_mode(folder: bool) -> int:
    """The mode a plain open() / mkdir() would give under the current umask (mkstemp / mkdtemp make 0600 / 0700:
    without this a calibrated file or an artifact would be private to its writer)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _write_error(path: str, exc: OSError) -> ReqError:
    if exc.errno == errno.ENOSPC:
        return ReqError(f"cannot write {path}: no space left on the device (the previous version, if any, is kept)")
    return ReqError(f"cannot write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to `path`; it becomes `path` only if the block completes."""
    if os.path.isdir(path):
        raise ReqError(f"output {path} is a folder, expected a file path")
    parent = ensure_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(folder=False))
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary folder next to `path`; it replaces `path` (file or folder) only if the block completes."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ReqError(f"output {path} exists and is not a folder")
    parent = ensure_parent(path)
    try:
        tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        yield tmp
        os.chmod(tmp, _default_mode(folder=True))
        if not os.path.exists(path):
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # now holds the previous version
        else:
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
