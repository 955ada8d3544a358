"""Validation at the edge: argparse `type=` callables for every numeric option and output path of `repq-tvm`.

Each states its range; a value outside it is refused while the command line is parsed, before any model is
loaded, with one line (`repq-tvm: error: argument --batch: must be an integer in [1, 4096], got 0`, see
`cli.Parser`). Input files (models, data, artifacts, images) are checked by the code that reads them, which
raises `ReqError`; limits that depend on the model (the largest batch a model can be compiled for) are
checked in `repq_tvm.limits` once the model is known.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from .atomic import TEMP_PREFIX, ensure_parent
from .errors import ReqError


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except (ValueError, AttributeError):
        return None


def int_in(lo: int, hi: int):
    """An integer in [lo, hi]."""

    def parse(text: str) -> int:
        n = _parse_int(text)
        if n is None or not lo <= n <= hi:
            got = n if n is not None else repr(text)
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {got}")
        return n

    parse.__name__ = f"integer in [{lo}, {hi}]"
    parse.range = (lo, hi)  # for the tests and --help
    return parse


def int_choice(choices, what: str = "value"):
    """One of the integers `choices` (`what` names them in the message, e.g. "weight bits")."""
    listed = ", ".join(map(str, choices))

    def parse(text: str) -> int:
        n = _parse_int(text)
        if n not in choices:
            got = n if n is not None else repr(text)
            raise argparse.ArgumentTypeError(f"{what} must be one of {listed}, got {got}")
        return n

    parse.__name__ = f"one of {listed}"
    parse.choices = tuple(choices)
    return parse


def _type_error(exc: ReqError) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(str(exc))


def _nonempty(path: str) -> str:
    if not path or not path.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return path


def output_file(path: str) -> str:
    """A file to write (replaced atomically): not a folder; its folder is created and must take a new file."""
    _nonempty(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"output {path} is a folder, expected a file path")
    try:
        ensure_parent(path)
    except ReqError as exc:
        raise _type_error(exc) from None
    return path


def output_folder(path: str) -> str:
    """A folder to write whole (an artifact, replaced atomically): not an existing file; its parent is created."""
    _nonempty(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"output {path} exists and is not a folder")
    try:
        ensure_parent(path)
    except ReqError as exc:
        raise _type_error(exc) from None
    return path


def work_folder(path: str) -> str:
    """A folder files are written into (`--dump-ir`, `--out-dir`): created now, and must take new files."""
    _nonempty(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write into the folder {path}: {exc.strerror or exc}") from None
    return path


PLOT_SUFFIXES = ("", ".png", ".pdf", ".svg")


def plot_file(path: str) -> str:
    """An image file for matplotlib: .png (also without a suffix), .pdf or .svg, in a writable folder."""
    _nonempty(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"cannot plot into {path}: use a .png, .pdf or .svg file name")
    return output_file(path)


def host_port(text: str) -> str:
    """HOST:PORT of a TVM RPC tracker or server ("[::1]:9190" for IPv6; port 1-65535)."""
    from .deploy.rpc import parse_address

    try:
        parse_address(text)
    except ReqError as exc:
        raise _type_error(exc) from None
    return text.strip()


def rpc_key(text: str) -> str:
    """A device key of a TVM RPC tracker: one word (the server's handshake splits at whitespace)."""
    if not text or not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"a device key is one word without spaces (e.g. rpi4), got {text!r}")
    return text
