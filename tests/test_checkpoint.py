"""Checkpoint round trip with a real DeepSpeed engine (ZeRO-2, CPU, gloo on 127.0.0.1): every piece of state comes back."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from scn_scale import checkpoint
from scn_scale.config import TrainConfig, load_config
from scn_scale.loop import WorkerSpec, build_engine, deepspeed_config
from scn_scale.loss import scn_loss
from scn_scale.relabel import Proposal
from scn_scale.relabel_table import RelabelTable
from scn_scale.weights import load_model_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("neutral", "happiness", "sadness")


def _engine(cfg: TrainConfig):
    spec = WorkerSpec(cfg=cfg, deepspeed=deepspeed_config(cfg), classes=CLASSES, storage="unused")
    return build_engine(spec, torch.device("cpu"), init=False)


def _step(engine, cfg: TrainConfig, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, len(CLASSES), (4,), generator=g)
    engine.backward(scn_loss(engine(images), labels, cfg.scn).total)
    engine.step()


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.fixture(scope="module")
def saved(one_rank, tmp_path_factory: pytest.TempPathFactory):
    cfg = TrainConfig(batch_size=4, run_name="round-trip", deepspeed={"zero_optimization": {"stage": 2}})
    engine = _engine(cfg)
    for seed in range(2):
        _step(engine, cfg, seed)
    table = RelabelTable()
    table.merge([Proposal("k1", 0, 2, 0.5, 2), Proposal("k2", 1, 0, 0.7, 2)])
    directory = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(str(directory), engine, epoch=3, table=table, cfg=cfg, classes=CLASSES, rank=0, world_size=1)
    return cfg, engine, table, directory, _params(engine)


def test_round_trip_restores_model_optimizer_epoch_table_config_classes(saved) -> None:
    cfg, engine, table, directory, at_save = saved
    other = _engine(dataclasses.replace(cfg, seed=1))  # different initial weights
    restored = checkpoint.load(str(directory), other, world_size=1)

    assert restored.epoch == 3 and restored.table == table and restored.classes == list(CLASSES)
    assert all(torch.equal(at_save[k], v) for k, v in _params(other).items())
    # Optimizer state (Adam moments, step count, lr) came back: the same next step gives the same weights.
    _step(engine, cfg, seed=7)
    _step(other, cfg, seed=7)
    after = _params(engine)
    assert all(torch.equal(after[k], v) for k, v in _params(other).items())
    assert any(not torch.equal(at_save[k], after[k]) for k in at_save)

    assert load_config(TrainConfig, str(directory / checkpoint.CONFIG_FILE), []) == cfg
    state = json.loads((directory / checkpoint.STATE_FILE).read_text())
    assert state["epoch"] == 3 and state["table_digest"] == table.digest() and state["world_size"] == 1


def test_plain_model_file_loads_without_deepspeed(saved) -> None:
    _, _, table, directory, at_save = saved
    model, classes, extra = load_model_file(str(directory / checkpoint.MODEL_FILE))  # weights_only=True inside
    assert classes == list(CLASSES) and extra["epoch"] == 3 and extra["table_digest"] == table.digest()
    assert model.state_dict().keys() == at_save.keys()
    assert all(torch.equal(v, at_save[k]) for k, v in model.state_dict().items())
    assert torch.load(directory / checkpoint.MODEL_FILE, weights_only=True)["format"] == "scn-scale-model"


def test_a_tampered_table_or_tag_is_refused(saved, tmp_path: Path) -> None:
    _, engine, _, directory, _ = saved  # the errors come before anything is loaded into it, or do not matter
    bad = Path(shutil.copytree(directory, tmp_path / "copy"))
    other_table = RelabelTable()
    other_table.merge([Proposal("k1", 0, 1, 0.5, 2)])
    other_table.save(str(bad / checkpoint.TABLE_FILE))
    with pytest.raises(checkpoint.CheckpointError, match="digest does not match"):
        checkpoint.load(str(bad), engine, world_size=1)

    state = json.loads((bad / checkpoint.STATE_FILE).read_text())
    (bad / checkpoint.STATE_FILE).write_text(json.dumps({**state, "tag": "epoch_0099"}))
    with pytest.raises(checkpoint.CheckpointError, match="no DeepSpeed checkpoint with tag 'epoch_0099'"):
        checkpoint.load(str(bad), engine, world_size=1)

    (bad / checkpoint.STATE_FILE).write_text(json.dumps({**state, "world_size": 4}))
    with pytest.raises(checkpoint.CheckpointError, match="resume it with num_workers=4"):
        checkpoint.load(str(bad), engine, world_size=1)

    older = {k: v for k, v in state.items() if k != "optimizer_groups"}  # written before the groups were recorded
    (bad / checkpoint.STATE_FILE).write_text(json.dumps(older))
    with pytest.raises(checkpoint.CheckpointError, match="1 parameter group.*optimizer 2, so it cannot resume.*init="):
        checkpoint.load(str(bad), engine, world_size=1)

    (bad / checkpoint.STATE_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load(str(bad), engine, world_size=1)


def test_metrics_file_keeps_only_epochs_the_checkpoint_covers(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    first = checkpoint.MetricsFile(run, first_epoch=1)
    for epoch in (1, 2, 3):
        first.append({"epoch": epoch, "attempt": 1})
    resumed = checkpoint.MetricsFile(run, first_epoch=3)  # resumed from epoch 2's checkpoint
    resumed.append({"epoch": 3, "attempt": 2})
    assert checkpoint.read_metrics(run) == [{"epoch": 1, "attempt": 1}, {"epoch": 2, "attempt": 1}, {"epoch": 3, "attempt": 2}]
    assert not [p for p in Path(run).iterdir() if p.name.endswith(".tmp")]


def test_bf16_engine_with_batchnorm_trains_and_saves_a_model_file(one_rank, tmp_path: Path) -> None:
    """The BatchNorm trap of bf16 engines (buffers left in fp32) is handled by the trainer's DeepSpeed config."""
    cfg = TrainConfig(batch_size=4, precision="bf16", deepspeed=str(REPO / "cluster" / "deepspeed" / "zero1-bf16.json"))
    engine = _engine(cfg)
    assert engine.bfloat16_enabled() and engine.module.backbone.bn1.running_mean.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop runs a bf16 forward
        _step(engine, cfg, seed=0)
    checkpoint.save(str(tmp_path), engine, epoch=1, table=RelabelTable(), cfg=cfg, classes=CLASSES, rank=0, world_size=1)
    # The model file holds the fp32 master weights the optimizer updates, not the module's bf16 copy.
    masters = checkpoint.master_weights(engine)
    assert masters.keys() == dict(engine.module.named_parameters()).keys()
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # finer than bf16
    obj = torch.load(tmp_path / checkpoint.MODEL_FILE, weights_only=True)
    assert all(v.dtype == torch.float32 for v in obj["state_dict"].values() if v.is_floating_point())
    model, _, _ = load_model_file(str(tmp_path / checkpoint.MODEL_FILE))
    module = engine.module.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, masters[name] if name in masters else module[name].to(value.dtype)), name


class _Planted:
    """Unpickling this creates a file: the proof that a load ran code from the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_deepspeed_files_load_with_weights_only(saved, tmp_path: Path) -> None:
    _, engine, _, directory, _ = saved
    bad = Path(shutil.copytree(directory, tmp_path / "copy"))
    planted = tmp_path / "code-ran"
    optim = next((bad / checkpoint.DEEPSPEED_DIR).glob("*/*optim_states.pt"))
    state = torch.load(optim, weights_only=False)  # our own file, as written a moment ago
    torch.save({**state, "extra": _Planted(planted)}, optim)
    with pytest.raises(checkpoint.CheckpointError, match="holds a Python object"):
        checkpoint.load(str(bad), engine, world_size=1)
    assert not planted.exists()


def test_temp_files_a_kill_left_anywhere_in_a_run_are_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / checkpoint.checkpoint_dir_name(1) / checkpoint.DEEPSPEED_DIR).mkdir(parents=True)
    left = [run / ".metrics.jsonl.x1.tmp", run / checkpoint.checkpoint_dir_name(1) / ".state.json.x2.tmp",
            run / checkpoint.checkpoint_dir_name(1) / checkpoint.DEEPSPEED_DIR / ".latest.x3.tmp"]
    kept = [run / checkpoint.METRICS_FILE, run / checkpoint.checkpoint_dir_name(1) / checkpoint.STATE_FILE]
    for path in left + kept:
        path.write_text("x")
    assert sorted(checkpoint.remove_temp_files(str(run))) == sorted(map(str, left))
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert checkpoint.remove_temp_files(str(tmp_path / "no-run-yet")) == []
