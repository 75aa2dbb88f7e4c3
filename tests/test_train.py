"""The distributed trainer: configuration errors before Ray starts, then real runs on CPU.

Runs use an in-process Ray cluster on 127.0.0.1 (2 CPUs, 2 workers), DeepSpeed ZeRO-2 over
gloo, and real shard sets written here, entering through `scn_scale.train.main`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from PIL import Image

from scn_scale import checkpoint, report, tracking
from scn_scale.config import ConfigError, SCNConfig, TrainConfig, load_config
from scn_scale.evaluate import EvalConfig, evaluate
from scn_scale.faults import MARKER_NAME
from scn_scale.loop import MID_EPOCH_SCORE, deepspeed_config, training_loss
from scn_scale.loss import scn_loss
from scn_scale.model import SCNModel
from scn_scale.noise import make_noise, save_overrides
from scn_scale.predictions import epoch_predictions_url
from scn_scale.relabel_table import RelabelTable
from scn_scale.train import checkpoint_config, main, parser, prepare
from scn_scale.weights import load_model_file, save_model_file
from shards import Sample, ShardWriter, key_from_bytes, read_manifest
from shards.cli import set_flags
from tests.conftest import write_shard_set

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "cluster" / "configs" / "cpu-small.yaml")
CLASSES = ("neutral", "happiness", "sadness", "surprise")


def face_like_jpeg(rng: np.random.Generator, label: int, size: int = 32) -> bytes:
    """A learnable image (its colour says its class) with a low-frequency pattern of its own, as a face has.

    SCN's alpha can only single out a mislabeled sample if the network can tell that image
    apart from its class-mates; per-pixel noise alone is averaged away by global pooling.
    """
    tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=float)
    pattern = np.kron(rng.normal(0.0, 40.0, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
    pixels = 0.75 * tint + 32 + pattern + rng.integers(0, 16, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_face_like_set(out: Path, shard_sizes: list[int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for n in shard_sizes:
        with ShardWriter(out, CLASSES, max_samples=n) as writer:
            for _ in range(n):
                label = int(rng.integers(len(CLASSES)))
                data = face_like_jpeg(rng, label)
                sample = Sample(key=key_from_bytes(data), image=data, label=label, meta={"provider": "test"})
                writer.write(sample)
                keys.append(sample.key)
    return keys


def corrupt_image(tar_path: Path, key: str) -> None:
    """Replace one sample's image bytes in place: the shard stays readable, the image does not decode."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            data = b"not a jpeg" if member.name == f"{key}.jpg" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@dataclass
class Data:
    train: str
    val: str
    noise: str
    corrupt_key: str
    train_samples: int


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("data")
    keys = write_face_like_set(root / "train", [160], seed=1)  # one shard: split by sample across ranks
    write_face_like_set(root / "val", [16] * 2, seed=2)
    corrupt_image(root / "train" / "shard-000000.tar", keys[3])
    manifest = read_manifest(str(root / "train"), columns=["key", "label"]).to_pydict()
    save_overrides(make_noise(manifest["key"], manifest["label"], len(CLASSES), rate=0.3, seed=0), str(root / "noise.parquet"))
    return Data(str(root / "train"), str(root / "val"), str(root / "noise.parquet"), keys[3], len(keys))


def _args(data: Data, out: Path, run_name: str, *extra: str) -> list[str]:
    """The small CPU config, at test size: 2 ranks x 5 steps of 16 images an epoch; every epoch's
    checkpoint kept (keep_checkpoints=0), as the tests read each epoch's table; the running sums
    read every 2 steps (progress lines, per-step TensorBoard scalars)."""
    return ["--config", CONFIG, *set_flags([
        f"train_shards={data.train}", f"val_shards={data.val}", f"label_overrides={data.noise}",
        f"out_dir={out}", f"run_name={run_name}", "image_size=32", "batch_size=16", "epochs=4",
        # A warm-up epoch of cross-entropy first: without it, relabel precision over these 4 epochs
        # ranged 0.46-0.73 across seeds and data orders; with it 0.84 (scn.warmup_epochs). Proposals
        # from epoch 2, so that with relabel_confirm 2 the table changes from epoch 3 on, and the
        # resume after epoch 3 carries waiting proposals as well as entries.
        "scn.relabel_epoch=2", "scn.warmup_epochs=1", "keep_checkpoints=0", "log_every_steps=2", *extra,
    ])]


# Configuration errors: each is a clear message from the CLI, before any Ray process starts.


@pytest.fixture
def small_set(tmp_path: Path) -> str:
    write_shard_set(tmp_path / "set", [4] * 4, classes=CLASSES)
    return str(tmp_path / "set")


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    connected = ray.is_initialized()  # the session's cluster may be up already
    assert main(argv) == 2
    assert ray.is_initialized() == connected  # refused before connecting to or starting one
    return capsys.readouterr().err


def test_missing_shard_directory(capsys, small_set: str, tmp_path: Path) -> None:
    err = _error(capsys, ["--config", CONFIG, "--set", f"train_shards={tmp_path / 'nowhere'}",
                          "--set", f"val_shards={small_set}"])
    assert f"train_shards: shard set {tmp_path / 'nowhere'}: no such directory" in err


def test_fewer_samples_than_ranks_times_loader_workers(capsys, small_set: str) -> None:
    err = _error(capsys, ["--config", CONFIG,
                          *set_flags([f"train_shards={small_set}", f"val_shards={small_set}", "loader_workers=9"])])
    assert "train_shards: shard set" in err and "holds 16 samples, fewer than the 18 readers (2 ranks x 9 loader workers)" in err


def test_unknown_config_key(capsys, small_set: str, tmp_path: Path) -> None:
    err = _error(capsys, ["--config", CONFIG, "--set", "scn.delta3=0.1"])
    assert "unknown config key 'scn.delta3'; valid keys under 'scn': beta, delta1, delta2" in err
    (tmp_path / "bad.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    assert "unknown config key 'learning_rate'" in _error(capsys, ["--config", str(tmp_path / "bad.yaml")])


def test_old_spellings_of_the_command_line_still_work(capsys, small_set: str) -> None:
    """--address and positional key=value, the spellings before --ray-address and --set; either form may stand
    anywhere, and the --set ones are applied last."""
    assert parser().parse_intermixed_args(["--config", CONFIG, "--address", "auto"]).address == "auto"
    err = _error(capsys, ["--config", CONFIG, f"train_shards={small_set}", "loader_workers=1", "--set",
                          "loader_workers=9", f"val_shards={small_set}"])
    assert "holds 16 samples, fewer than the 18 readers (2 ranks x 9 loader workers)" in err


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, "sets train_micro_batch_size_per_gpu=8, but batch_size=32"),
        ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps=4"),
        ({"optimizer": {"type": "AdamW"}}, "has a 'optimizer' section"),
        ({"bf16": {"enabled": True}}, "enables bf16 but precision is fp32"),
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
        ("missing.json", "cannot read 'missing.json'"),
    ],
)
def test_deepspeed_config_contradictions(capsys, small_set: str, deepspeed, message: str) -> None:
    cfg = load_config(TrainConfig, CONFIG, [f"train_shards={small_set}", f"val_shards={small_set}"])
    cfg.deepspeed = deepspeed
    with pytest.raises(ConfigError, match="deepspeed"):
        prepare(cfg)
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg)
    assert message in str(e.value)


def test_deepspeed_config_is_filled_from_the_trainer() -> None:
    cfg = load_config(TrainConfig, CONFIG, ["grad_accum=2", "precision=bf16", "deepspeed=" + str(REPO / "cluster/deepspeed/zero2-bf16.json")])
    ds = deepspeed_config(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (32, 2, 128)
    assert ds["zero_optimization"]["stage"] == 2
    # An fp32 engine under bf16 autocast (scn_scale.loop.autocast): BatchNorm's statistics stay fp32.
    assert "bf16" not in ds and "data_types" not in ds
    with pytest.raises(ConfigError, match="buffer_dtype='bf16'.*must stay fp32"):
        deepspeed_config(dataclasses.replace(cfg, deepspeed={"data_types": {"buffer_dtype": "bf16"}}))
    # The released code does not clip; DeepSpeed would at norm 1.0 where a config does not say.
    assert ds["gradient_clipping"] == 0.0
    unsaid = load_config(TrainConfig, CONFIG, ["deepspeed={}"])
    assert deepspeed_config(unsaid)["gradient_clipping"] == 0.0
    said = load_config(TrainConfig, CONFIG, ['deepspeed={"gradient_clipping": 5.0}'])
    assert deepspeed_config(said)["gradient_clipping"] == 5.0


@pytest.mark.parametrize("path", sorted((REPO / "cluster" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_load_and_agree_with_their_deepspeed_config(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # their DeepSpeed paths are relative to the job's working directory
    cfg = load_config(TrainConfig, str(path), [])
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.batch_size
    given = cfg.deepspeed if isinstance(cfg.deepspeed, dict) else json.loads(Path(cfg.deepspeed).read_text())
    assert given.get("bf16", {}).get("enabled", False) == (cfg.precision == "bf16")
    assert "data_types" not in given  # BatchNorm's buffers stay fp32


def test_fail_at_and_init_are_checked(capsys, small_set: str, tmp_path: Path) -> None:
    sets = [f"train_shards={small_set}", f"val_shards={small_set}"]
    base = ["--config", CONFIG, *set_flags(sets)]
    assert "fail_at needs epoch, step, rank" in _error(capsys, [*base, "--set", "fail_at=epoch=1,step=2"])
    assert "rank must be in [0, 2)" in _error(capsys, [*base, "--set", "fail_at=epoch=1,step=2,rank=2"])
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pt")
    assert "init: " in _error(capsys, [*base, "--set", f"init={tmp_path / 'partial.pt'}"])
    save_model_file(str(tmp_path / "model.pt"), SCNModel(len(CLASSES)), CLASSES)
    cfg = load_config(TrainConfig, CONFIG, [*sets, f"init={tmp_path / 'model.pt'}"])
    assert prepare(cfg)[1] == CLASSES


def test_baseline_is_plain_cross_entropy_and_scn_ranks_alpha() -> None:
    torch.manual_seed(0)
    model, images, labels = SCNModel(len(CLASSES)), torch.randn(8, 3, 32, 32), torch.randint(0, len(CLASSES), (8,))
    cfg = TrainConfig(method="baseline")
    out = model(images)
    parts, ranked, _ = training_loss(out, labels, cfg, epoch=1)
    assert ranked is None and float(parts.rr) == 0.0
    assert torch.allclose(parts.total, torch.nn.functional.cross_entropy(out.logits, labels))
    parts.total.backward()
    assert model.importance.weight.grad is None  # no weighting: the importance branch is not trained

    cfg = TrainConfig(scn=SCNConfig(rank_scope="global", delta1=1.0))
    out = model(images)
    parts, ranked, offset = training_loss(out, labels, cfg, epoch=1)  # one process: the global batch is the local one
    assert offset == 0 and torch.equal(ranked, out.alpha) and float(parts.rr.detach()) > 0.0
    assert torch.allclose(parts.total, scn_loss(out, labels, cfg.scn).total)


def test_scn_warm_up_is_cross_entropy_then_scn_and_relabels_after_it() -> None:
    torch.manual_seed(0)
    model, images, labels = SCNModel(len(CLASSES)), torch.randn(8, 3, 32, 32), torch.randint(0, len(CLASSES), (8,))
    cfg = TrainConfig(scn=SCNConfig(warmup_epochs=2, relabel_epoch=3, delta1=1.0))
    out = model(images)
    parts, ranked, _ = training_loss(out, labels, cfg, epoch=2)  # the warm-up's last epoch
    assert ranked is None and float(parts.rr) == 0.0
    assert torch.allclose(parts.total, torch.nn.functional.cross_entropy(out.logits, labels))
    parts.total.backward()
    assert model.importance.weight.grad is None  # alpha held: the importance branch is not trained
    out = model(images)
    parts, _, _ = training_loss(out, labels, cfg, epoch=3)
    assert float(parts.rr.detach()) > 0.0 and torch.allclose(parts.total, scn_loss(out, labels, cfg.scn).total)
    with pytest.raises(ConfigError, match=r"relabel_epoch \(2\) must come after the warm-up's 2 epochs"):
        load_config(TrainConfig, None, ["scn.warmup_epochs=2", "scn.relabel_epoch=2"])


def test_retention_is_rays_k_best_by_val_accuracy_and_the_latest() -> None:
    """Ranked by the reported checkpoint_score: an epoch's val_accuracy, below any for a mid-epoch checkpoint."""
    config = checkpoint_config(TrainConfig(keep_checkpoints=2))
    assert (config.num_to_keep, config.checkpoint_score_attribute, config.checkpoint_score_order) == (
        2, "checkpoint_score", "max")
    assert MID_EPOCH_SCORE < 0.0
    assert checkpoint_config(TrainConfig(keep_checkpoints=0)).num_to_keep is None  # keep all


# Real runs on the session's Ray cluster; every run has its own name (a repeated name resumes).


#: Temporary files as a kill leaves them in a run's directory; the next start of the run removes them.
KILL_LEFTOVERS = (".metrics.jsonl.k1ll3d.tmp", f"{checkpoint.checkpoint_dir_name(3)}/.model.pt.k1ll3d.tmp")


#: The faults of run "failing": rank 1 SIGKILLed right after epoch 3's checkpoint, rank 0 right after the
#: mid-epoch checkpoint at step 2 of epoch 4 (no wait for Ray Train to take the reports in).
FAULTS = ("epoch=3,step=5,rank=1", "epoch=4,step=2,rank=0")


#: What run "a"'s restart finds half copied (`_half_copied`).
TORN = checkpoint.checkpoint_dir_name(5, step=2)


def _half_copied(run: Path) -> None:
    """What a kill while Ray copies a mid-epoch checkpoint leaves: epoch 4's files under a later name, its
    state.json saying so, model.pt cut short, and no completion mark."""
    torn = run / TORN
    shutil.copytree(run / checkpoint.checkpoint_dir_name(4), torn)
    (torn / checkpoint.COMPLETE_FILE).unlink()
    state = json.loads((torn / checkpoint.STATE_FILE).read_text())
    (torn / checkpoint.STATE_FILE).write_text(json.dumps({**state, "epoch": 5, "step": 2}))
    (torn / checkpoint.MODEL_FILE).write_bytes((torn / checkpoint.MODEL_FILE).read_bytes()[:1000])


@pytest.fixture(scope="module")
def runs(local_ray: str, data: Data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs with the same seed and data, all but the first at the same time:
    - "quiet", first and alone: 2 epochs through the CLI on a local cluster of its own beside the
      session's (another Ray instance), a mid-epoch checkpoint every 2 steps, keeping the best
      checkpoint and the latest. Alone, because under the load of the others Ray Train's own
      controller logs a traceback of a 5 s timeout it calls safe to ignore ("CPU being overloaded");
    - "a": through `main` in this process, 4 epochs uninterrupted, then started again for a 5th over
      the temporary files and a half-copied checkpoint a kill would have left;
    - "failing": 4 epochs through the CLI in a second process attached with --ray-address, a
      mid-epoch checkpoint every 2 steps, and the two SIGKILLs of FAULTS (no exception, no goodbye
      to Ray)."""
    out = tmp_path_factory.mktemp("runs")
    attached = [sys.executable, "-m", "scn_scale.train", "--ray-address", local_ray]
    every = ("checkpoint_every_steps=2", "keep_checkpoints=1")
    commands = {
        "failing": [*attached, *_args(data, out, "failing", *every, "max_failures=2",
                                      "fail_at=" + ";".join(f + ",how=kill" for f in FAULTS))],
    }
    with open(out / "quiet.log", "w") as f:
        quiet = [sys.executable, "-m", "scn_scale.train", *_args(data, out, "quiet", "epochs=2", *every)]
        assert subprocess.run(quiet, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=900).returncode == 0, (
            (out / "quiet.log").read_text()[-5000:])
    procs = {}
    for name, cmd in commands.items():
        with open(out / f"{name}.log", "w") as f:
            procs[name] = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        assert main(_args(data, out, "a")) == 0
        for name in KILL_LEFTOVERS:
            (out / "a" / name).write_bytes(b"half a file")
        _half_copied(out / "a")
        assert main(_args(data, out, "a", "epochs=5")) == 0  # the same run again, one epoch longer: it resumes
        for name, proc in procs.items():
            assert proc.wait(timeout=900) == 0, (out / f"{name}.log").read_text()[-5000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


@pytest.fixture(scope="module")
def run_a(runs: Path) -> list[dict]:
    return checkpoint.read_metrics(str(runs / "a"))


@pytest.fixture(scope="module")
def run_failing(runs: Path) -> list[dict]:
    return checkpoint.read_metrics(str(runs / "failing"))


@pytest.fixture(scope="module")
def run_quiet(runs: Path) -> list[dict]:
    return checkpoint.read_metrics(str(runs / "quiet"))


def _table(run: Path, epoch: int) -> RelabelTable:
    return RelabelTable.load(str(run / checkpoint.checkpoint_dir_name(epoch) / checkpoint.TABLE_FILE))


@pytest.mark.slow
def test_every_rank_holds_the_same_table_every_epoch(run_a: list[dict], runs: Path) -> None:
    assert [m["epoch"] for m in run_a] == [1, 2, 3, 4, 5]
    for line in run_a:
        assert line["table_digests"] == [line["table_digest"]] * 2
        assert _table(runs / "a", line["epoch"]).digest() == line["table_digest"]
    assert run_a[1]["table_size"] == 0 and run_a[-1]["table_size"] > 0  # relabels applied from epoch 3
    final = runs / "a" / checkpoint.checkpoint_dir_name(5)
    assert sorted(p.name for p in final.glob("*relabel*.parquet")) == [checkpoint.TABLE_FILE]
    model, classes, extra = load_model_file(str(final / checkpoint.MODEL_FILE))
    assert classes == list(CLASSES) and extra["table_digest"] == run_a[-1]["table_digest"]
    assert model.eval()(torch.zeros(1, 3, 32, 32)).logits.shape == (1, len(CLASSES))


@pytest.mark.slow
def test_each_epochs_validation_predictions_are_kept_and_give_its_accuracy(run_a: list[dict], runs: Path) -> None:
    for line in run_a:
        table = pq.read_table(epoch_predictions_url(str(runs / "a"), line["epoch"])).to_pydict()
        assert len(set(table["key"])) == len(table["key"]) == line["val"]["samples"]
        correct = np.array(table["pred"]) == np.array(table["label"])
        assert correct.mean() == pytest.approx(line["val_accuracy"])


@pytest.mark.slow
def test_validation_is_the_saved_model_on_each_sample_once(run_a: list[dict], runs: Path, data: Data, tmp_path: Path) -> None:
    """Every rank holds the same weights and BatchNorm statistics when it validates (its digest), and the
    last epoch's val_accuracy is what `scn_scale.evaluate` finds for that epoch's model.pt on the same set."""
    for line in run_a:
        assert len(line["model_digests"]) == 2 and len(set(line["model_digests"])) == 1, line["epoch"]
        assert line["val"]["samples"] == 32  # two shards of 16, each sample once
    final = runs / "a" / checkpoint.checkpoint_dir_name(5)
    result = evaluate(EvalConfig(checkpoint=str(final), shards=data.val, out=str(tmp_path), batch_size=16, loader_workers=0))
    assert result["samples"] == 32
    assert result["accuracy"] == run_a[-1]["val_accuracy"]
    assert result["confusion_matrix"] == run_a[-1]["val"]["confusion_matrix"]


@pytest.mark.slow
def test_corrupt_sample_is_skipped_counted_and_the_run_goes_on(run_a: list[dict]) -> None:
    # Counted when the reader reaches it: an epoch's shuffle buffer may leave it unread.
    assert sum(line["skipped"] for line in run_a) >= 1
    assert all(line["skipped"] <= 1 for line in run_a)  # one corrupt sample, however often it was met
    assert [line["epoch"] for line in run_a] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_scn_relabels_noisy_labels_and_gives_them_lower_alpha(run_a: list[dict]) -> None:
    audit = run_a[-1]["audit"]
    alpha = run_a[-1]["alpha"]
    print(f"relabel audit: precision {audit['precision']:.2f}, recall {audit['recall']:.2f} "
          f"({audit['restored']} of {audit['noisy']} noisy restored, {audit['corrupted']} clean corrupted); "
          f"alpha noisy {alpha['noisy']['mean']:.3f} vs clean {alpha['clean']['mean']:.3f}")
    assert audit["noisy"] == round(0.3 * 160) and audit["changed"] > 0
    assert audit["precision"] >= 0.6
    assert alpha["noisy"]["mean"] < alpha["clean"]["mean"]


@pytest.mark.slow
def test_workers_sigkilled_right_after_a_checkpoint_resume_from_it(run_failing: list[dict], runs: Path) -> None:
    """Each kill came right after a checkpoint was reported (Ray Train polls its workers every 2 s, so it
    had mostly not taken the reports in): the restarts resumed from those checkpoints, epoch 3's and the
    one mid-way through epoch 4, not from an earlier one, so no step was trained twice."""
    assert sorted(p.name for p in (runs / "failing" / MARKER_NAME).iterdir()) == sorted(FAULTS)
    assert [m["epoch"] for m in run_failing] == [1, 2, 3, 4]
    assert not any("resumed_from" in line for line in run_failing[:3])  # epoch 4's attempt after the first kill died
    assert run_failing[3]["resumed_from"] == {"epoch": 4, "step": 2, "table_digest": run_failing[2]["table_digest"]}
    assert all(line["table_digests"] == [line["table_digest"]] * 2 for line in run_failing)
    assert "resumed at epoch 4 step 0" in (log := (runs / "failing.log").read_text()) and "resumed at epoch 4 step 2" in log
    # No mid-epoch checkpoint is left (Ray removes those it registered, the run those it resumed from
    # before Ray had), the latest is kept, and besides it at most the best and an unregistered epoch 3.
    kept = sorted(p.name for p in (runs / "failing").glob("checkpoint_epoch_*"))
    assert checkpoint.checkpoint_dir_name(4) in kept and not any("_step_" in name for name in kept)
    best = max(run_failing, key=lambda line: (line["val_accuracy"], line["epoch"]))["epoch"]
    assert set(kept) <= {checkpoint.checkpoint_dir_name(e) for e in (best, 3, 4)}


@pytest.mark.slow
def test_retention_keeps_the_best_epoch_and_the_latest_and_no_mid_epoch_checkpoint(run_quiet: list[dict], runs: Path) -> None:
    best = max(run_quiet, key=lambda line: (line["val_accuracy"], line["epoch"]))["epoch"]
    kept = sorted(p.name for p in (runs / "quiet").glob("checkpoint_epoch_*"))
    assert kept == sorted({checkpoint.checkpoint_dir_name(best), checkpoint.checkpoint_dir_name(2)})


#: What differs between two runs of the same training: time, and where it resumed.
UNTIMED = ("images_per_s", "images_per_s_per_worker", "data_time_s", "compute_time_s", "resumed_from")


def _close(got: object, want: object, where: str) -> None:
    """Equal, floats and tensors within 1e-6, recursively; AssertionError naming where they differ."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(got), sorted(want))
        for key in want:
            _close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _close(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, where
        assert torch.allclose(got.double(), want.double(), rtol=0, atol=1e-6), (where, float((got.double() - want.double()).abs().max()))
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=0, abs=1e-6), (where, got, want)
    elif hasattr(want, "__dict__"):  # DeepSpeed's state objects (its loss scaler) compare by identity
        assert type(got) is type(want), where
        _close(vars(got), vars(want), where)
    else:
        assert got == want, (where, got, want)


def _deepspeed_state(run: Path) -> dict[str, object]:
    """Every file of the final checkpoint's DeepSpeed state (model states, each rank's ZeRO optimizer partition)."""
    files = sorted((run / checkpoint.checkpoint_dir_name(4) / checkpoint.DEEPSPEED_DIR / checkpoint.deepspeed_tag(4)).glob("*.pt"))
    assert len(files) >= 3, files  # model states and two optimizer partitions
    return {f.name: checkpoint.load_weights_only(str(f)) for f in files}


@pytest.mark.slow
def test_a_run_killed_twice_ends_exactly_as_the_uninterrupted_one(runs: Path, run_a: list[dict], run_failing: list[dict]) -> None:
    """"failing" (SIGKILLs at an epoch end and mid-epoch, resumed each time) against "a"'s first 4 epochs
    (uninterrupted): weights, BatchNorm statistics, optimizer state (every rank's), relabel table and every
    metric but time equal within 1e-6. The resumes restored everything and read every remaining sample
    once; "failing" also checkpointed every 2 steps, "a" at epoch ends only: saving changes nothing."""
    _close([{k: v for k, v in line.items() if k not in UNTIMED} for line in run_failing],
           [{k: v for k, v in line.items() if k not in UNTIMED} for line in run_a[:4]], "metrics")
    final = checkpoint.checkpoint_dir_name(4)
    model, _, extra = load_model_file(str(runs / "failing" / final / checkpoint.MODEL_FILE))
    uninterrupted, _, uninterrupted_extra = load_model_file(str(runs / "a" / final / checkpoint.MODEL_FILE))
    _close(dict(model.state_dict()), dict(uninterrupted.state_dict()), "model.pt")
    assert extra["table_digest"] == uninterrupted_extra["table_digest"] == run_a[3]["table_digest"]
    _close(_deepspeed_state(runs / "failing"), _deepspeed_state(runs / "a"), "deepspeed")


@pytest.mark.slow
def test_starting_a_run_again_removes_the_temporary_files_a_kill_left(run_a: list[dict], runs: Path) -> None:
    assert [m["epoch"] for m in run_a] == [1, 2, 3, 4, 5]
    assert not any((runs / "a" / name).exists() for name in KILL_LEFTOVERS)


@pytest.mark.slow
def test_starting_the_same_run_again_resumes_it(run_a: list[dict], runs: Path) -> None:
    assert not any("resumed_from" in line for line in run_a[:4])
    assert run_a[4]["resumed_from"] == {"epoch": 4, "table_digest": _table(runs / "a", 4).digest()}


@pytest.mark.slow
def test_a_run_does_not_resume_under_another_data_order(capsys, run_a: list[dict], runs: Path, data: Data) -> None:
    err = _error(capsys, _args(data, runs, "a", "epochs=6", "seed=1", "batch_size=8"))
    assert f"run {runs / 'a'} resumes from" in err and checkpoint.checkpoint_dir_name(5) in err
    assert "trained with seed=0, batch_size=16; this start asks for seed=1, batch_size=8" in err
    assert [m["epoch"] for m in checkpoint.read_metrics(str(runs / "a"))] == [1, 2, 3, 4, 5]  # nothing was touched


@pytest.mark.slow
def test_a_half_copied_checkpoint_is_passed_over_and_cleared(run_a: list[dict], runs: Path) -> None:
    assert run_a[4]["resumed_from"]["epoch"] == 4 and "step" not in run_a[4]["resumed_from"]
    assert not (runs / "a" / TORN).exists()


def _events(run: Path, axis: str) -> EventAccumulator:
    """A run's TensorBoard event files of one axis (steps, epochs), through TensorBoard's own reader."""
    events = EventAccumulator(str(run / tracking.TENSORBOARD_DIR / axis))
    events.Reload()
    return events


def _logged_steps(epochs: int) -> list[int]:
    """Global steps of the interval reads (every 2 steps) and epoch ends (5 steps an epoch)."""
    return [e * 5 + s for e in range(epochs) for s in (2, 4, 5)]


@pytest.mark.slow
def test_a_run_leaves_tensorboard_event_files_with_per_step_and_per_epoch_scalars(run_a: list[dict], runs: Path) -> None:
    steps = _events(runs / "a", tracking.STEPS_DIR)
    expected = {"step/loss", "step/wce", "step/rr", "step/lr", "step/alpha_mean", "step/alpha_std", "step/images_per_s"}
    assert expected <= set(steps.Tags()["scalars"])
    assert [e.step for e in steps.Scalars("step/loss")] == _logged_steps(5)  # across the resume after epoch 4
    assert all(e.value > 0 for e in steps.Scalars("step/images_per_s"))
    epochs = _events(runs / "a", tracking.EPOCHS_DIR)
    for tag, key in (("epoch/val_accuracy", "val_accuracy"), ("epoch/train_accuracy", "train_accuracy"),
                     ("epoch/val_mean_class_accuracy", "val_mean_class_accuracy"), ("epoch/relabels_total", "relabels_total")):
        assert [(e.step, e.value) for e in epochs.Scalars(tag)] == [(m["epoch"], pytest.approx(m[key])) for m in run_a]
    noisy = [e.value for e in epochs.Scalars("epoch/alpha_noisy_mean")]
    assert noisy == pytest.approx([m["alpha"]["noisy"]["mean"] for m in run_a])
    # Relabels applied from epoch 3 (proposed from 2, confirmed an epoch later): precision is defined from then on.
    assert [e.step for e in epochs.Scalars("epoch/relabel_precision")] == [3, 4, 5]


@pytest.mark.slow
def test_a_failed_attempts_steps_are_purged_and_the_logs_suit_ray(runs: Path) -> None:
    """The attempt killed in epoch 4 logged steps after the checkpoint it resumes from (step 2); TensorBoard
    drops them for the restarted attempt's. Its job log (not a terminal) has a progress line per interval and none of
    Ray Train's "Failed to query" warnings (the session's cluster serves the state API)."""
    assert [e.step for e in _events(runs / "failing", tracking.STEPS_DIR).Scalars("step/loss")] == _logged_steps(4)
    log = (runs / "failing.log").read_text()
    assert "Failed to query Ray Train Controller actor state" not in log
    assert "scn_scale.progress: epoch 1 step 2/5: loss" in log and "scn_scale.progress: epoch 4 step 4/5: loss" in log
    assert "it/s]" not in log  # no tqdm bar in a log


@pytest.mark.slow
def test_a_successful_run_beside_another_ray_instance_is_quiet(runs: Path) -> None:
    """No traceback (Ray Train's placement-group cleaner used to fail with "Found multiple active Ray
    instances"), none of Ray Train's per-report lines, and at most a few lines an epoch besides progress."""
    log = (runs / "quiet.log").read_text()
    assert [m["epoch"] for m in checkpoint.read_metrics(str(runs / "quiet"))] == [1, 2]
    for noise in ("Traceback", "Found multiple active Ray instances", "Reporting training result",
                  "Checkpoint successfully created", "Failed to query Ray Train Controller actor state"):
        assert noise not in log, noise
    lines = log.splitlines()
    ends = [i for i, line in enumerate(lines) if "scn_scale.loop: epoch " in line]
    assert len(ends) == 2 and "scn_scale.progress: epoch 2 step 4/5: loss" in log
    between = [line for line in lines[ends[0] + 1 : ends[1]] if "scn_scale.progress" not in line]
    assert len(between) <= 4, between


@pytest.mark.slow
def test_the_run_report_draws_the_curves(runs: Path, tmp_path: Path) -> None:
    assert report.main([str(runs / "a"), "--out", str(tmp_path), "--samples", "4"]) == 0
    text = (tmp_path / report.REPORT_MD).read_text()
    for png in (report.STEP_CURVES_PNG, report.EPOCH_CURVES_PNG):
        assert f"]({png})" in text and (tmp_path / png).stat().st_size > 0
