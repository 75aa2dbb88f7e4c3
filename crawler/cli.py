"""What the crawler's commands share: bad input is one line on stderr, `error: ...`, exit status 2.

Someone who passed a broken file, setting or URL needs its name and what is wrong with
it; a traceback buries both. Whoever debugs the code gets the traceback with
`--log-level DEBUG`. Library code raises ValueError or OSError naming the input (see
`crawler.settings`); only the commands (`crawler.build`, `crawler.localweb`,
`crawler.synthetic`) turn that into the line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (a missing or malformed flag) are the same one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="log level (default INFO); DEBUG also prints the traceback behind an error")


def configure_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)


def bad_input(exc: BaseException) -> int:
    """Report `exc` as one `error:` line on stderr (its traceback at debug level); the exit status 2."""
    log.debug("the error below was raised here", exc_info=exc)
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2
