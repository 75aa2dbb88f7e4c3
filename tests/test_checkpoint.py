"""Checkpoint round trip with a real DeepSpeed engine (ZeRO-2, CPU, gloo on 127.0.0.1): every piece of state comes back."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from scn_scale import checkpoint
from scn_scale.config import TrainConfig, load_config
from scn_scale.evaluate import find_model_file
from scn_scale.loop import WorkerSpec, autocast, build_engine, deepspeed_config
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


def test_bf16_keeps_batchnorm_statistics_in_fp32_tracking_an_fp32_run(one_rank, tmp_path: Path) -> None:
    """precision=bf16 with a shipped bf16 DeepSpeed config: an fp32 engine under bf16 autocast, so BatchNorm's
    running statistics stay fp32 and follow an fp32 run's over the same batches (bf16 buffers would round
    every momentum update below 1/256 of the statistic away); the model file holds them as trained."""
    runs = {
        "fp32": TrainConfig(batch_size=4, deepspeed=str(REPO / "cluster" / "deepspeed" / "zero2-cpu.json")),
        "bf16": TrainConfig(batch_size=4, precision="bf16", deepspeed=str(REPO / "cluster" / "deepspeed" / "zero2-bf16.json")),
    }
    engines = {name: _engine(cfg) for name, cfg in runs.items()}
    assert not engines["bf16"].bfloat16_enabled() and engines["bf16"].communication_data_type == torch.float32
    # Training forwards without optimizer steps: the statistics' own precision, not two diverging trainings.
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(4, 3, 32, 32, generator=g)
        for name, engine in engines.items():
            with torch.no_grad(), autocast(runs[name], torch.device("cpu")):  # as the loop runs the forward
                engine(images)
    fp32, bf16 = (dict(engines[name].module.named_buffers()) for name in ("fp32", "bf16"))
    for name, value in bf16.items():
        if not value.is_floating_point():
            assert torch.equal(value, fp32[name]), name  # batches counted
            continue
        # Relative to the statistic's size: at most 0.016 measured (layer4), from bf16 activations' 8-bit mantissa.
        off = float((value - fp32[name]).norm() / fp32[name].norm())
        assert value.dtype == torch.float32 and off < 0.03, (name, off)
        assert not torch.equal(value, value.bfloat16().float()), name  # it holds what bf16 cannot
    cfg = runs["bf16"]
    checkpoint.save(str(tmp_path), engines["bf16"], epoch=1, table=RelabelTable(), cfg=cfg, classes=CLASSES, rank=0, world_size=1)
    model, _, _ = load_model_file(str(tmp_path / checkpoint.MODEL_FILE))
    module = engines["bf16"].module.state_dict()
    assert all(torch.equal(value, module[name]) for name, value in model.state_dict().items())


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


def test_every_setting_is_either_fixed_or_free_on_resume() -> None:
    """A new setting must be classified: refused on resume, or allowed (and why, in RESUME_FREE's comment)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(checkpoint.RESUME_FIXED).isdisjoint(checkpoint.RESUME_FREE)
    assert set(checkpoint.RESUME_FIXED) | set(checkpoint.RESUME_FREE) == names


def test_resume_refuses_what_it_cannot_continue_and_allows_the_rest(saved, tmp_path: Path) -> None:
    cfg, _, _, directory, _ = saved
    run = tmp_path / "run"
    shutil.copytree(directory, run / checkpoint.checkpoint_dir_name(3))
    checkpoint.mark_complete(str(run / checkpoint.checkpoint_dir_name(3)))
    stage = 2  # the saved run's ZeRO stage
    checkpoint.check_resume(cfg, str(run), stage)  # the same settings
    refused = {
        "optimizer=sgd": "optimizer='adam'",
        "scn.warmup_epochs=2": "scn.warmup_epochs=0",
        "scn.relabel_scope=low": "scn.relabel_scope='all'",
        "model.backbone=resnet34": "model.backbone='resnet18'",
        "seed=1": "seed=0",
    }
    for setting, was in refused.items():
        with pytest.raises(checkpoint.CheckpointError, match=f"trained with {re.escape(was)}; this start asks for"):
            checkpoint.check_resume(load_config(TrainConfig, None, _settings(cfg, setting)), str(run), stage)
    with pytest.raises(checkpoint.CheckpointError, match="trained with zero_stage=2; this start asks for zero_stage=1"):
        checkpoint.check_resume(cfg, str(run), 1)
    for setting in ("precision=bf16", "epochs=100", "lr=0.01", "keep_checkpoints=0"):
        checkpoint.check_resume(load_config(TrainConfig, None, _settings(cfg, setting)), str(run), stage)


def _settings(cfg: TrainConfig, *changes: str) -> list[str]:
    """`cfg` as key=value settings (the ones the tests set), with `changes` applied last."""
    return [f"batch_size={cfg.batch_size}", f"run_name={cfg.run_name}", f"deepspeed={json.dumps(cfg.deepspeed)}", *changes]


def test_a_checkpoint_resumes_in_the_other_precision(saved) -> None:
    """bf16 is autocast around the same fp32 engine, so an fp32 run's checkpoint loads into a bf16 run's engine exactly."""
    cfg, _, table, directory, at_save = saved
    other = _engine(dataclasses.replace(cfg, precision="bf16", deepspeed=str(REPO / "cluster" / "deepspeed" / "zero2-bf16.json")))
    restored = checkpoint.load(str(directory), other, world_size=1)
    assert restored.epoch == 3 and restored.table == table
    assert all(torch.equal(at_save[k], v) for k, v in _params(other).items())


def test_only_complete_checkpoints_are_picked(saved, tmp_path: Path) -> None:
    """A kill while Ray copies a checkpoint into the run leaves some of its files: one with a state.json and no
    completion mark, one whose model.pt is cut short. latest_checkpoint (a new start's checks, reports) and
    evaluate pass over both; a checkpoint from before the mark existed still counts when its state.json is there."""
    _, _, _, directory, _ = saved
    run = tmp_path / "run"
    dirs = {epoch: run / checkpoint.checkpoint_dir_name(epoch) for epoch in (1, 2, 3)}
    for path in dirs.values():
        shutil.copytree(directory, path)
    checkpoint.mark_complete(str(dirs[1]))
    checkpoint.mark_complete(str(dirs[2]))
    model = dirs[2] / checkpoint.MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # cut short after the mark (a torn copy)
    assert json.loads((dirs[1] / checkpoint.COMPLETE_FILE).read_text())["files"][checkpoint.MODEL_FILE] > 0
    assert not (dirs[3] / checkpoint.COMPLETE_FILE).exists() and (dirs[3] / checkpoint.STATE_FILE).exists()

    assert checkpoint.latest_checkpoint(str(run)) == str(dirs[1])
    assert find_model_file(str(run)) == str(dirs[1] / checkpoint.MODEL_FILE)
    for torn in (dirs[2], dirs[3]):
        with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint"):
            find_model_file(str(torn))

    legacy = run / checkpoint.checkpoint_dir_name(4)  # written before completion marks: state.json last
    shutil.copytree(directory, legacy)
    state = json.loads((legacy / checkpoint.STATE_FILE).read_text())
    (legacy / checkpoint.STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "layout"}))
    assert checkpoint.latest_checkpoint(str(run)) == str(legacy)
    assert checkpoint.latest_checkpoint(str(tmp_path / "nothing-here")) is None



def test_a_mid_epoch_checkpoint_holds_each_ranks_epoch_state_and_sorts_inside_its_epoch(saved, tmp_path: Path) -> None:
    cfg, engine, table, _, _ = saved
    at_save = _params(engine)  # other tests step the shared engine
    directory = tmp_path / checkpoint.checkpoint_dir_name(4, step=6)
    partial = {"stats": {"samples": 24, "loss": 1.5}, "sums": torch.arange(6, dtype=torch.float64),
               "random": torch.get_rng_state(), "device_random": None}
    checkpoint.save(str(directory), engine, epoch=4, step=6, partial=partial, table=table, cfg=cfg, classes=CLASSES,
                    rank=0, world_size=1)
    assert not (directory / checkpoint.MODEL_FILE).exists()  # no validated model mid-epoch
    other = _engine(dataclasses.replace(cfg, seed=1))
    restored = checkpoint.load(str(directory), other, world_size=1)  # the partial file loads with weights_only=True
    assert (restored.epoch, restored.step, restored.next_position) == (4, 6, (4, 6))
    assert restored.partial["stats"] == partial["stats"] and torch.equal(restored.partial["sums"], partial["sums"])
    assert all(torch.equal(at_save[k], v) for k, v in _params(other).items())
    state = json.loads((directory / checkpoint.STATE_FILE).read_text())
    (directory / checkpoint.STATE_FILE).write_text(json.dumps({**state, "world_size": 2, "zero_stage": 0}))
    with pytest.raises(checkpoint.CheckpointError, match="written mid-epoch by 2 ranks.*num_workers=2"):
        checkpoint.load(str(directory), other, world_size=1)

    names = [checkpoint.checkpoint_dir_name(*p) for p in ((4, None), (3, None), (4, 2), (3, 12), (10, 1))]
    assert sorted(names, key=checkpoint.position) == [
        "checkpoint_epoch_0003_step_000012", "checkpoint_epoch_0003", "checkpoint_epoch_0004_step_000002",
        "checkpoint_epoch_0004", "checkpoint_epoch_0010_step_000001"]
    assert checkpoint.position("checkpoint_epoch_0004.tmp") is None


def test_a_resume_starts_from_the_latest_complete_checkpoint_and_clears_what_came_after(saved, tmp_path: Path) -> None:
    """Latest complete of any kind; Ray's registered one counts as complete (Ray took in every rank's report,
    so its files were copied); a later half-copied directory is removed, an earlier one is left."""
    _, _, _, directory, _ = saved
    run = tmp_path / "run"
    names = {p: checkpoint.checkpoint_dir_name(*p) for p in ((2, None), (3, 4), (3, None), (4, 2))}
    for name in names.values():
        shutil.copytree(directory, run / name)
    checkpoint.mark_complete(str(run / names[2, None]))
    checkpoint.mark_complete(str(run / names[3, 4]))
    # (3, None) has every file but no mark: Ray registered it, the kill came before rank 0 marked it.
    (run / names[4, 2] / checkpoint.MODEL_FILE).write_bytes(b"cut")  # half copied
    assert checkpoint.latest_checkpoint(str(run), mid_epoch=True) == str(run / names[3, 4])
    assert checkpoint.latest_checkpoint(str(run)) == str(run / names[2, None])

    assert checkpoint.resume_point(str(run), registered=names[3, None]) == str(run / names[3, None])
    assert checkpoint.is_complete(str(run / names[3, None]))
    assert sorted(p.name for p in run.iterdir()) == sorted(names[p] for p in ((2, None), (3, 4), (3, None)))
    assert checkpoint.resume_point(str(run), registered=names[2, None]) == str(run / names[3, None])  # the run's own is newer
    assert checkpoint.resume_point(str(tmp_path / "new"), registered=None) is None
