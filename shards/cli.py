"""What every command shares: bad input is one line on stderr, `error: ...`, exit status 2.

Someone who passed a broken file, setting or URL needs its name and what is wrong with
it; a traceback buries both. Whoever debugs the code gets the traceback with
`--log-level DEBUG`. Library code raises an error naming the input; only the commands
(`crawler.*`, `scn_scale.*`, `shards.verify`, `shards.split`) turn it into the line.

It lives in `shards`, the one room both the crawler and scn_scale import, so the two
sides report errors alike without importing each other. The YAML readers and `--set` are
here for the same reason: both sides read settings that people write by hand, in files
and on the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (a missing or malformed flag) are the same one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
                        help=f"log level (default {default}); DEBUG also prints the traceback behind an error")


def add_set(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE`, repeatable: how every command takes one setting on the command line (see `key_values`)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a setting, e.g. {example}; repeatable, a later one wins")


def key_values(items: Sequence[str], what: str) -> dict[str, str]:
    """`KEY=VALUE` items as {key: value text}, a later repeat of a key winning; each command parses the values.

    `what` names the items in the error for one without `=` or a key (`--set`, `override`).
    """
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {item!r} is not of the form key=value")
        parsed[key.strip()] = value
    return parsed


def set_flags(settings: Iterable[str]) -> list[str]:
    """The arguments that hand `KEY=VALUE` settings to a command: `--set` before each."""
    return [arg for setting in settings for arg in ("--set", setting)]


def configure_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)


def bad_input(exc: BaseException, flag: str = "") -> int:
    """Report `exc` as one `error:` line on stderr (its traceback at debug level); the exit status 2.

    `flag` names the option whose value the message starts with (`--checkpoint`), for a
    command with several inputs of one kind.
    """
    log.debug("the error below was raised here", exc_info=exc)
    print("error: " + " ".join(f"{flag} {exc}".split()), file=sys.stderr)
    return 2


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python values; a syntax error is a ValueError naming `source`, line and column, on one line."""
    import yaml  # only the commands that read settings files pay for it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{source}: invalid YAML{where}: {problem}") from exc


def read_yaml(path: str | Path) -> Any:
    """A YAML file's values; a file that is missing, not a file, not UTF-8 or not YAML raises an error naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_yaml(text, str(path))
