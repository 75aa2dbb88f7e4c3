"""Every crawler command reports bad input as one line, `error: ...`, exit status 2, and changes nothing.

Rows `(id, argv, setup)` as tests/cli_errors.py runs them (the first of each command in a subprocess),
the whole temporary directory unchanged afterwards.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.cli_errors import REPO, Setup, assert_one_line_error, config_dir, files, nothing, params


def corpus(tmp: Path) -> dict[str, Any]:
    """A valid corpus of two pictures, for rows whose fault is elsewhere."""
    for name in ("happiness/a.jpg", "sadness/b.jpg"):
        (tmp / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp / "corpus" / name)
    return {}


def port_in_use(tmp: Path) -> dict[str, Any]:
    corpus(tmp)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return {"port": holder.getsockname()[1], "holder": holder}


BUILD = ["crawler.build", "--no-progress", "--workers", "0", "--out", "{tmp}/out"]
OPENVERSE = [*BUILD, "--provider", "openverse"]
URLLIST = [*BUILD, "--provider", "urllist", "--faces", "none"]
LOCALWEB = ["crawler.localweb", "--port", "0"]
SYNTHETIC = ["crawler.synthetic", "--out", "{tmp}/out", "--per-class", "1"]

CASES: list[tuple[str, list[str], Setup]] = [
    # crawler.build: the inputs issue 16 names
    ("build-queries-yaml-syntax", [*OPENVERSE, "--queries", "{tmp}/q.yaml"],
     files({"q.yaml": "happiness:\n  en: [smile\n"})),
    ("build-config-yaml-syntax", [*OPENVERSE, "--config", "{tmp}/c.yaml"], files({"c.yaml": "fetch: {retries: [1\n"})),
    ("build-set-yaml-syntax", [*OPENVERSE, "--set", "fetch.timeout_s=[1"], nothing),
    ("build-config-is-a-directory", [*OPENVERSE, "--config", "{tmp}/conf.d"], config_dir),
    ("build-set-wrong-type", [*OPENVERSE, "--set", "per_query=abc"], nothing),
    ("build-set-list-of-wrong-type", [*OPENVERSE, "--set", "fetch.allow_hosts=[1,2]"], nothing),
    ("build-url-list-without-rows", [*URLLIST, "--input", "{tmp}/urls.csv"], files({"urls.csv": "url,label\n"})),
    # crawler.build: found by probing
    ("build-queries-not-utf8", [*OPENVERSE, "--queries", "{tmp}/q.yaml"], files({"q.yaml": b"\xff\xfe\x00h"})),
    ("build-queries-unknown-class", [*OPENVERSE, "--queries", "{tmp}/q.yaml"], files({"q.yaml": "joy: {en: [x]}\n"})),
    ("build-config-not-a-mapping", [*OPENVERSE, "--config", "{tmp}/c.yaml"], files({"c.yaml": "- a\n- b\n"})),
    ("build-config-missing", [*OPENVERSE, "--config", "{tmp}/nosuch.yaml"], nothing),
    ("build-set-unknown", [*OPENVERSE, "--set", "fetch.no_such_setting=1"], nothing),
    ("build-set-int-for-bool", [*OPENVERSE, "--set", "resume=1"], nothing),
    ("build-set-short-tuple", [*OPENVERSE, "--set", "faces.mtcnn_thresholds=[0.5,0.5]"], nothing),
    ("build-set-budget-below-cap", [*OPENVERSE, "--set", "fetch.inflight_bytes=1000"], nothing),
    ("build-provider-setting-wrong-type", [*OPENVERSE, "--provider-setting", "page_size=abc"], nothing),
    ("build-api-base-not-http", [*OPENVERSE, "--api-base", "ftp://example.org"], nothing),
    ("build-min-side-negative", [*OPENVERSE, "--min-side", "-1"], nothing),
    ("build-flag-not-an-int", [*OPENVERSE, "--workers", "abc"], nothing),
    ("build-log-level-unknown", [*OPENVERSE, "--log-level", "loud"], nothing),
    ("build-out-missing", ["crawler.build", "--provider", "openverse"], nothing),
    ("build-out-is-a-file", OPENVERSE, files({"out": "not a directory"})),
    ("build-url-list-missing", [*URLLIST, "--input", "{tmp}/nosuch.csv"], nothing),
    ("build-url-list-not-parquet", [*URLLIST, "--input", "{tmp}/urls.parquet"], files({"urls.parquet": b"PAR1"})),
    ("build-url-list-not-utf8", [*URLLIST, "--input", "{tmp}/urls.csv"], files({"urls.csv": b"url,label\n\xff\n"})),
    ("build-url-list-bad-label", [*URLLIST, "--input", "{tmp}/urls.csv"],
     files({"urls.csv": "url,label\nhttp://example.org/a.jpg,joy\n"})),
    # crawler.localweb
    ("localweb-corpus-missing", [*LOCALWEB, "--corpus", "{tmp}/nosuch"], nothing),
    ("localweb-corpus-empty", [*LOCALWEB, "--corpus", "{tmp}/corpus"], files({"corpus/notes.txt": "none"})),
    ("localweb-corpus-csv-not-utf8", [*LOCALWEB, "--corpus", "{tmp}/corpus"], files({"corpus/corpus.csv": b"\xff"})),
    ("localweb-corpus-csv-bad-class", [*LOCALWEB, "--corpus", "{tmp}/corpus"],
     files({"corpus/corpus.csv": "file,class\na.jpg,joy\n"})),
    ("localweb-noise-out-of-range", [*LOCALWEB, "--corpus", "{tmp}/corpus", "--noise", "2"], corpus),
    ("localweb-noise-not-a-number", [*LOCALWEB, "--corpus", "{tmp}/corpus", "--noise", "lots"], corpus),
    ("localweb-host-not-loopback", [*LOCALWEB, "--corpus", "{tmp}/corpus", "--host", "10.0.0.1"], corpus),
    ("localweb-port-out-of-range", ["crawler.localweb", "--corpus", "{tmp}/corpus", "--port", "99999"], corpus),
    ("localweb-port-in-use", ["crawler.localweb", "--corpus", "{tmp}/corpus", "--port", "{port}"], port_in_use),
    # crawler.synthetic
    ("synthetic-per-class-zero", [*SYNTHETIC, "--per-class", "0"], nothing),
    ("synthetic-image-size-huge", [*SYNTHETIC, "--image-size", "100000"], nothing),
    ("synthetic-image-size-not-an-int", [*SYNTHETIC, "--image-size", "big"], nothing),
    ("synthetic-unknown-class", [*SYNTHETIC, "--classes", "joy"], nothing),
    ("synthetic-seed-negative", [*SYNTHETIC, "--seed", "-1"], nothing),
    ("synthetic-rafdb-test-fraction", [*SYNTHETIC, "--layout", "rafdb", "--test-fraction", "0"], nothing),
    ("synthetic-out-is-a-file", SYNTHETIC, files({"out": "not a directory"})),
]


@pytest.mark.parametrize("argv, setup, in_subprocess", params(CASES, in_subprocess=()))
def test_bad_input_is_one_line_and_changes_nothing(argv: list[str], setup: Setup, in_subprocess: bool,
                                                   tmp_path: Path) -> None:
    assert_one_line_error(argv, setup, tmp_path, in_subprocess)


def test_debug_log_level_shows_the_traceback(tmp_path: Path) -> None:
    command = [sys.executable, "-m", *OPENVERSE, "--set", "per_query=abc", "--log-level", "DEBUG"]
    done = subprocess.run([arg.format(tmp=tmp_path) for arg in command], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1] == "error: setting per_query: expected int, got 'abc'"
