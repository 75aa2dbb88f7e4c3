"""What the table-driven tests of bad input share (tests/test_cli_errors_*.py).

Rows are `(id, argv, setup)`, where `setup(tmp)` writes the inputs the row needs and
returns values for the argv's `{placeholders}` (`{tmp}` is always there). The whole
temporary directory, inputs and outputs included, must be the same after the command as
before it.

The first row of each command, and rows a test file names, run the real entry point in
a subprocess: what a user sees, with logging set up as the command sets it up. The
others call the command's `main(argv)` in the test process, its stderr and every log
record at INFO or above collected as the lines a user would see: a subprocess per row
spent most of the suite's time starting Python and importing torch and Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parents[1]

Setup = Callable[[Path], dict[str, Any]]


def files(contents: dict[str, str | bytes]) -> Setup:
    """A setup writing files under tmp (relative path -> text or bytes)."""

    def setup(tmp: Path) -> dict[str, Any]:
        for name, content in contents.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return {}

    return setup


def nothing(tmp: Path) -> dict[str, Any]:
    return {}


def config_dir(tmp: Path) -> dict[str, Any]:
    (tmp / "conf.d").mkdir()
    return {}


def snapshot(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every path under `root`: a file's size and sha256, None for a directory."""
    return {str(path.relative_to(root)): None if path.is_dir() else
            (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(root.rglob("*"))}


Case = tuple[str, list[str], Setup]


def params(cases: Iterable[Case], in_subprocess: Iterable[str] = ()) -> list[Any]:
    """pytest params `(argv, setup, subprocess)` of the rows: the first row of each command, and
    the rows named in `in_subprocess`, in a subprocess."""
    named, seen, out = set(in_subprocess), set(), []
    for name, argv, setup in cases:
        out.append(pytest.param(argv, setup, argv[0] not in seen or name in named, id=name))
        seen.add(argv[0])
    return out


def _run_subprocess(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=180)
    return done.returncode, done.stderr


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """`main(argv)` of module argv[0] (or its __main__), stderr and log records at INFO or above
    as the text a user would see on stderr (the commands log at INFO by default)."""
    module = importlib.import_module(argv[0])
    main = getattr(module, "main", None) or importlib.import_module(argv[0] + ".__main__").main
    err, root = io.StringIO(), logging.getLogger()
    handler, level = logging.StreamHandler(err), root.level
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv[1:])
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return code, err.getvalue()


def assert_one_line_error(argv: list[str], setup: Setup, tmp: Path, in_subprocess: bool = True) -> None:
    """Run the command `argv` after `setup(tmp)`: exit status 2, one stderr line `error: ...`, tmp unchanged."""
    values = setup(tmp)
    try:
        before = snapshot(tmp)
        command = [arg.format(tmp=tmp, **values) for arg in argv]
        code, stderr = (_run_subprocess if in_subprocess else _run_in_process)(command)
    finally:
        for value in values.values():
            if isinstance(value, socket.socket):
                value.close()
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert snapshot(tmp) == before
