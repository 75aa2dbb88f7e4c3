"""The README's user path, run as written: the commands are read from README.md itself, so the
README and what the commands accept cannot drift apart.

The block under "A first run, step by step" goes through bash from a fresh directory holding
only a link to the repository's `cluster/` (the configs the commands name), with this
environment's Python first on PATH, as `source .venv/bin/activate` would have it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cli_errors import REPO

HEADING = "## A first run, step by step"


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    assert heading in text, f"README.md has no section {heading!r}"
    match = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S)
    assert match, f"no bash block under {heading!r}"
    return match.group(1)


def test_the_block_is_the_user_path() -> None:
    """Every stage the README promises is in the block, each through its command."""
    commands = [line.split()[2] for line in readme_block(HEADING).splitlines() if line.startswith("python -m ")]
    assert commands == ["crawler.synthetic", "crawler.localweb", "crawler.build", "shards.split", "scn_scale.train",
                        "scn_scale.evaluate", "scn_scale.predict", "scn_scale.export"]


@pytest.mark.slow
def test_the_readme_user_path_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "cluster").symlink_to(REPO / "cluster")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Its own session, so whatever the block left running (the embedded web, if a command failed) is stopped.
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", readme_block(HEADING)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=840)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-4000:]

    crawled = pq.read_table(tmp_path / "data/web/manifest.parquet").num_rows
    splits = {name: pq.read_table(tmp_path / "data/web" / name / "manifest.parquet").num_rows
              for name in ("train", "val", "test")}
    assert crawled > 100 and sum(splits.values()) == crawled and min(splits.values()) > 0
    metrics = [json.loads(line) for line in (tmp_path / "runs/first/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert "accuracy" in (tmp_path / "reports/first/report.md").read_text()
    faces = sorted((tmp_path / "data/faces/happiness").iterdir())
    predicted = [line for line in output.splitlines() if line.startswith("data/faces/happiness/")]
    assert len(predicted) == len(faces)
    assert (tmp_path / "first.onnx").stat().st_size > 1_000_000
