"""Every scn_scale command, shards.verify and shards.split report bad input as one line, `error: ...`,
exit status 2, and change nothing.

Rows `(id, argv, setup)` as tests/cli_errors.py runs them (the first of each command in a subprocess), the
whole temporary directory (inputs and the output named in argv) unchanged afterwards. The inputs issue
16 names come first for each command, then those found by probing it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scn_scale.model import SCNModel
from scn_scale.weights import save_model_file
from tests.cli_errors import REPO, Setup, assert_one_line_error, config_dir, files, nothing, params
from tests.conftest import write_shard_set

CLASSES = ("neutral", "happiness", "sadness", "surprise")
CONFIG = str(REPO / "cluster" / "configs" / "cpu-small.yaml")


def shard_set(tmp: Path) -> dict[str, Any]:
    """A valid set at tmp/set, for rows whose fault is elsewhere."""
    write_shard_set(tmp / "set", [4] * 4, classes=CLASSES)
    return {}


def checkpoint(tmp: Path) -> dict[str, Any]:
    """A valid checkpoint directory at tmp/ckpt (its model.pt) and a valid set at tmp/set."""
    (tmp / "ckpt").mkdir()
    save_model_file(str(tmp / "ckpt" / "model.pt"), SCNModel(len(CLASSES)), CLASSES, {"image_size": 32})
    return shard_set(tmp)


def both(*setups: Setup) -> Setup:
    def setup(tmp: Path) -> dict[str, Any]:
        return {k: v for s in setups for k, v in s(tmp).items()}

    return setup


CORRUPT_STATS = files({"set/stats.json": "{not json", "set/sizes.json": '{"shard-000000.tar": 4}',
                       "set/manifest.parquet": b"PAR1"})
GARBAGE_PT = files({"garbage.pt": b"these bytes are no model"})
EMPTY_DIR = files({"empty/notes.txt": "no checkpoint here"})

TRAIN = ["scn_scale.train", "--config", CONFIG, "--set", "train_shards={tmp}/set", "--set", "val_shards={tmp}/set",
         "--set", "out_dir={tmp}/runs"]
EVALUATE = ["scn_scale.evaluate", "--checkpoint", "{tmp}/ckpt", "--shards", "{tmp}/set", "--out", "{tmp}/report"]
EXPORT = ["scn_scale.export", "--checkpoint", "{tmp}/ckpt", "--out", "{tmp}/model.onnx"]
PREDICT = ["scn_scale.predict", "--checkpoint", "{tmp}/ckpt", "--faces", "none"]
NOISE = ["scn_scale.noise", "--shards", "{tmp}/set", "--rate", "0.3", "--out", "{tmp}/noise.parquet"]
IMPORT = ["scn_scale.importers"]
SPLIT = ["shards.split", "{tmp}/set", "--out", "{tmp}/splits"]

CASES: list[tuple[str, list[str], Setup]] = [
    # scn_scale.train: the inputs issue 16 names
    ("train-config-yaml-syntax", ["scn_scale.train", "--config", "{tmp}/c.yaml"], files({"c.yaml": "epochs: [1\n"})),
    ("train-override-yaml-syntax", [*TRAIN, "--set", "scn.delta1=[0.1"], shard_set),
    ("train-config-is-a-directory", ["scn_scale.train", "--config", "{tmp}/conf.d"], config_dir),
    # scn_scale.train: found by probing
    ("train-config-missing", ["scn_scale.train", "--config", "{tmp}/nosuch.yaml"], nothing),
    ("train-config-not-utf8", ["scn_scale.train", "--config", "{tmp}/c.yaml"], files({"c.yaml": b"\xff\xfe"})),
    ("train-config-not-a-mapping", ["scn_scale.train", "--config", "{tmp}/c.yaml"], files({"c.yaml": "- 1\n"})),
    ("train-override-unknown-key", [*TRAIN, "--set", "scn.delta3=0.1"], shard_set),
    ("train-override-wrong-type", [*TRAIN, "--set", "epochs=many"], shard_set),
    ("train-shard-set-missing", [*TRAIN, "--set", "train_shards={tmp}/nosuch"], shard_set),
    ("train-shard-set-corrupt-stats", [*TRAIN], CORRUPT_STATS),
    ("train-keep-checkpoints-negative", [*TRAIN, "--set", "keep_checkpoints=-1"], shard_set),
    ("train-fail-at-unknown-mode", [*TRAIN, "--set", "fail_at=epoch=1,step=1,rank=0,how=explode"], shard_set),
    ("train-init-garbage", [*TRAIN, "--set", "init={tmp}/garbage.pt"], both(shard_set, GARBAGE_PT)),
    ("train-out-dir-is-a-file", [*TRAIN, "--set", "out_dir={tmp}/runs"], both(shard_set, files({"runs": "a file"}))),
    ("train-log-level-unknown", [*TRAIN, "--log-level", "loud"], shard_set),
    ("train-address-unreachable", [*TRAIN, "--ray-address", "127.0.0.1:1"], shard_set),  # Ray itself retries for minutes
    # scn_scale.importers
    ("import-rafdb-root-missing", [*IMPORT, "rafdb", "--root", "{tmp}/nosuch", "--out", "{tmp}/out"], nothing),
    ("import-rafdb-bad-label-line", [*IMPORT, "rafdb", "--root", "{tmp}/raf", "--out", "{tmp}/out"],
     files({"raf/EmoLabel/list_patition_label.txt": "train_00001.jpg 9\n"})),
    ("import-imagefolder-root-missing", [*IMPORT, "imagefolder", "--root", "{tmp}/nosuch", "--out", "{tmp}/out"],
     nothing),
    ("import-imagefolder-unknown-class", [*IMPORT, "imagefolder", "--root", "{tmp}/faces", "--out", "{tmp}/out"],
     files({"faces/joy/a.png": b"x"})),
    ("import-csv-list-missing", [*IMPORT, "csv", "--list", "{tmp}/nosuch.csv", "--out", "{tmp}/out"], nothing),
    ("import-csv-unknown-label", [*IMPORT, "csv", "--list", "{tmp}/l.csv", "--out", "{tmp}/out"],
     files({"l.csv": "path,label\na.png,joy\n"})),
    ("import-classes-unknown", [*IMPORT, "imagefolder", "--root", "{tmp}/faces", "--out", "{tmp}/out", "--classes",
                                "joy"], files({"faces/happy/a.png": b"x"})),
    ("import-shard-size-zero", [*IMPORT, "imagefolder", "--root", "{tmp}/faces", "--out", "{tmp}/out",
                                "--shard-size", "0"], nothing),
    ("import-out-is-a-file", [*IMPORT, "csv", "--list", "{tmp}/l.csv", "--out", "{tmp}/out"],
     files({"l.csv": "path,label\na.png,happiness\n", "out": "a file"})),
    # scn_scale.noise: the inputs issue 16 names, then found by probing
    ("noise-shard-set-missing", [*NOISE, "--shards", "{tmp}/nosuch"], nothing),
    ("noise-corrupt-stats", NOISE, CORRUPT_STATS),
    ("noise-rate-out-of-range", [*NOISE, "--rate", "1.5"], shard_set),
    ("noise-out-is-a-directory", [*NOISE, "--out", "{tmp}/set"], shard_set),
    # scn_scale.evaluate: the inputs issue 16 names, then found by probing
    ("evaluate-shard-set-missing", [*EVALUATE, "--shards", "{tmp}/nosuch"], checkpoint),
    ("evaluate-not-a-checkpoint", [*EVALUATE, "--checkpoint", "{tmp}/empty"], both(shard_set, EMPTY_DIR)),
    ("evaluate-garbage-pt", [*EVALUATE, "--checkpoint", "{tmp}/garbage.pt"], both(shard_set, GARBAGE_PT)),
    ("evaluate-out-is-a-file", [*EVALUATE, "--out", "{tmp}/report"], both(checkpoint, files({"report": "a file"}))),
    ("evaluate-batch-size-zero", [*EVALUATE, "--batch-size", "0"], checkpoint),
    ("evaluate-device-unknown", [*EVALUATE, "--device", "abacus"], checkpoint),
    ("evaluate-label-overrides-missing", [*EVALUATE, "--label-overrides", "{tmp}/nosuch.parquet"], checkpoint),
    # scn_scale.predict
    ("predict-garbage-pt", [*PREDICT, "--checkpoint", "{tmp}/garbage.pt", "{tmp}/set"], both(shard_set, GARBAGE_PT)),
    ("predict-no-image-in-directory", [*PREDICT, "{tmp}/empty"], both(checkpoint, EMPTY_DIR)),
    ("predict-image-size-negative", [*PREDICT, "--image-size", "-1", "{tmp}/set"], checkpoint),
    # scn_scale.export: the inputs issue 16 names, then found by probing
    ("export-not-a-checkpoint", [*EXPORT, "--checkpoint", "{tmp}/empty"], EMPTY_DIR),
    ("export-garbage-pt", [*EXPORT, "--checkpoint", "{tmp}/garbage.pt"], GARBAGE_PT),
    ("export-onnx-out-is-a-directory", [*EXPORT, "--out", "{tmp}/set"], checkpoint),
    ("export-safetensors-out-is-a-file", [*EXPORT, "--format", "safetensors", "--out", "{tmp}/file"],
     both(checkpoint, files({"file": "a file"}))),
    # scn_scale.demo (its --out is checked when the demo starts; see the report)
    ("demo-config-yaml-syntax", ["scn_scale.demo", "--out", "{tmp}/demo", "--config", "{tmp}/c.yaml"],
     files({"c.yaml": "epochs: [1\n"})),
    ("demo-config-is-a-directory", ["scn_scale.demo", "--out", "{tmp}/demo", "--config", "{tmp}/conf.d"], config_dir),
    ("demo-scale-unknown", ["scn_scale.demo", "--out", "{tmp}/demo", "--scale", "huge"], nothing),
    # shards.verify: the input issue 16 names, then found by probing
    ("verify-corrupt-stats", ["shards.verify", "{tmp}/set"], CORRUPT_STATS),
    ("verify-set-missing", ["shards.verify", "{tmp}/nosuch"], nothing),
    ("verify-corrupt-manifest", ["shards.verify", "{tmp}/set"],
     files({"set/stats.json": '{"classes": ["neutral"]}', "set/sizes.json": "{}", "set/manifest.parquet": b"PAR1"})),
    # shards.split
    ("split-set-missing", [*SPLIT, "--out", "{tmp}/splits"], nothing),
    ("split-corrupt-stats", SPLIT, CORRUPT_STATS),
    ("split-fractions-bad", [*SPLIT, "--fractions", "train=0.8,val=0.5"], shard_set),
    ("split-out-is-a-file", SPLIT, both(shard_set, files({"splits": "a file"}))),
]


@pytest.mark.parametrize("argv, setup, in_subprocess", params(CASES, in_subprocess=("train-address-unreachable",)))
def test_bad_input_is_one_line_and_changes_nothing(argv: list[str], setup: Setup, in_subprocess: bool,
                                                   tmp_path: Path) -> None:
    assert_one_line_error(argv, setup, tmp_path, in_subprocess)


def test_debug_log_level_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: [1\n")
    done = subprocess.run([sys.executable, "-m", "scn_scale.train", "--config", str(tmp_path / "c.yaml"),
                           "--log-level", "DEBUG"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: {tmp_path / 'c.yaml'}: invalid YAML at line 2, column 1: "
                                            "expected ',' or ']', but got '<stream end>'")
