"""The trainer's optimizer inside a real DeepSpeed engine (ZeRO 0-2, CPU) steps as plain PyTorch does,
for every optimizer, shipped DeepSpeed config and precision that the driver's checks let through.

The case that differed: a branch with no gradient. PyTorch's optimizers skip a parameter whose
gradient is None; DeepSpeed hands them flat gradient buffers with zeros there, so the weight
decay alone used to move SCN's importance branch during a warm-up (and all through a baseline run).
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scn_scale.config import ConfigError, TrainConfig, load_config
from scn_scale.loop import (Worker, WorkerSpec, autocast, build_engine, deepspeed_config, lr_at, make_optimizer,
                            schedule_epoch, training_loss)
from scn_scale.model import build_model
from scn_scale.train import prepare
from tests.cli_errors import REPO
from tests.conftest import write_shard_set

CLASSES = ("neutral", "happiness", "sadness", "surprise")
CONFIG = str(REPO / "cluster" / "configs" / "cpu-small.yaml")


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, len(CLASSES), (4,), generator=g)) for _ in range(n)]


def _importance(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.importance.parameters()]).clone()


def test_a_warm_up_holds_the_importance_branch_and_then_steps_as_plain_pytorch(one_rank) -> None:
    cfg = load_config(TrainConfig, CONFIG, ["num_workers=1", "batch_size=4", "scn.warmup_epochs=2",
                                            "scn.relabel_epoch=3", "weight_decay=0.01"])
    engine = build_engine(WorkerSpec(cfg=cfg, deepspeed=deepspeed_config(cfg), classes=CLASSES, storage="unused"),
                          torch.device("cpu"), init=False)
    torch.manual_seed(cfg.seed)  # as build_engine seeds: the same initial network
    reference = build_model(cfg.model, len(CLASSES))
    plain = make_optimizer(cfg, reference)
    start = _importance(reference)
    assert torch.equal(_importance(engine.module), start)

    for epoch in (1, 2, 3):
        schedule_epoch(engine.optimizer, cfg, epoch)
        for group in plain.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        for images, labels in _batches(3):
            parts, _, _ = training_loss(engine(images), labels, cfg, epoch)
            engine.backward(parts.total)
            engine.step()
            plain.zero_grad(set_to_none=True)
            training_loss(reference(images), labels, cfg, epoch)[0].total.backward()
            plain.step()
        if epoch <= cfg.scn.warmup_epochs:
            assert torch.equal(_importance(engine.module), start), f"epoch {epoch} of the warm-up moved the branch"

    assert not torch.equal(_importance(engine.module), start)  # SCN proper trains it
    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name


def test_a_baseline_run_never_moves_the_importance_branch(one_rank) -> None:
    cfg = load_config(TrainConfig, CONFIG, ["num_workers=1", "batch_size=4", "method=baseline", "weight_decay=0.01"])
    engine = build_engine(WorkerSpec(cfg=cfg, deepspeed=deepspeed_config(cfg), classes=CLASSES, storage="unused"),
                          torch.device("cpu"), init=False)
    start = _importance(engine.module)
    for epoch in (1, 2):
        schedule_epoch(engine.optimizer, cfg, epoch)
        for images, labels in _batches(2):
            engine.backward(training_loss(engine(images), labels, cfg, epoch)[0].total)
            engine.step()
    assert torch.equal(_importance(engine.module), start)


def test_an_eac_step_in_the_engine_is_the_plain_pytorch_step_and_relabels_nothing(one_rank) -> None:
    """Worker._forward_backward with method=eac: two forward passes (the batch, its mirror) into one DeepSpeed step."""
    cfg = load_config(TrainConfig, CONFIG, ["num_workers=1", "batch_size=4", "method=eac", "eac.lam=5"])
    engine = build_engine(WorkerSpec(cfg=cfg, deepspeed=deepspeed_config(cfg), classes=CLASSES, storage="unused"),
                          torch.device("cpu"), init=False)
    torch.manual_seed(cfg.seed)
    reference = build_model(cfg.model, len(CLASSES))
    plain = make_optimizer(cfg, reference)
    start, trunk = _importance(engine.module), engine.module.backbone.conv1.weight.detach().clone()
    schedule_epoch(engine.optimizer, cfg, 1)
    worker = SimpleNamespace(engine=engine, cfg=cfg, device=torch.device("cpu"))  # what the method reads of a Worker
    for images, labels in _batches(2):
        out, parts, proposals = Worker._forward_backward(worker, images, labels, ["k"] * len(labels), 1)
        assert proposals is None and float(parts.rr) == 0.0
        assert out.cam.shape == (4, len(CLASSES), 1, 1)
        assert float(parts.total) > float(parts.wce) > 0.0  # the consistency term is in the loss
        plain.zero_grad(set_to_none=True)
        mirror = reference(images.flip(-1), cam=True)
        training_loss(reference(images, cam=True), labels, cfg, 1, mirror)[0].total.backward()
        plain.step()
    assert torch.equal(_importance(engine.module), start)  # no importance weight in EAC
    assert not torch.equal(engine.module.backbone.conv1.weight, trunk)
    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), name


#: Every DeepSpeed config the project ships, and none (DeepSpeed's defaults: ZeRO stage 0).
SHIPPED_DEEPSPEED = ["", *sorted(str(p.relative_to(REPO)) for p in (REPO / "cluster" / "deepspeed").glob("*.json"))]
OPTIMIZERS = typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"])
PRECISIONS = typing.get_args(typing.get_type_hints(TrainConfig)["precision"])


def _enables_bf16(deepspeed: str) -> bool:
    return bool(deepspeed) and json.loads((REPO / deepspeed).read_text()).get("bf16", {}).get("enabled", False)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    write_shard_set(root / "set", [4], classes=CLASSES)
    return str(root / "set")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("deepspeed", SHIPPED_DEEPSPEED, ids=lambda d: d.rsplit("/", 1)[-1] or "none")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_deepspeed_config_and_precision_is_refused_before_ray_or_steps(
    one_rank, tiny_set: str, tmp_path: Path, monkeypatch, optimizer: str, deepspeed: str, precision: str
) -> None:
    """Each combination the docs offer is refused by the driver's checks (`prepare`, before Ray starts) or
    takes an optimizer step in a real engine equal to plain PyTorch's on the same batch."""
    monkeypatch.chdir(REPO)  # the shipped paths are relative to the repository, as in the training configs
    cfg = load_config(TrainConfig, CONFIG, [
        "num_workers=1", "loader_workers=0", "batch_size=4", f"optimizer={optimizer}", f"deepspeed={deepspeed}",
        f"precision={precision}", f"train_shards={tiny_set}", f"val_shards={tiny_set}", f"out_dir={tmp_path}"])
    if _enables_bf16(deepspeed) and precision == "fp32":
        with pytest.raises(ConfigError, match="enables bf16 but precision is fp32"):
            prepare(cfg)
        return
    ds, classes = prepare(cfg)
    engine = build_engine(WorkerSpec(cfg=cfg, deepspeed=ds, classes=classes, storage="unused"), torch.device("cpu"), init=False)
    torch.manual_seed(cfg.seed)  # as build_engine seeds: the same initial network
    reference = build_model(cfg.model, len(classes))
    plain = make_optimizer(cfg, reference)
    start = reference.classifier.weight.detach().clone()
    start_all = {n: p.detach().clone() for n, p in reference.named_parameters()}
    (images, labels), = _batches(1)
    for model in (engine, reference):
        with autocast(cfg, torch.device("cpu")):
            out = model(images)
        parts, _, _ = training_loss(out, labels, cfg, epoch=1)
        if model is engine:
            engine.backward(parts.total)
            engine.step()
        else:
            parts.total.backward()
            plain.step()
    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        assert ours.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (
            name, float((ours - theirs).abs().max()), float((ours - start_all[name]).abs().max()))
    assert not torch.equal(engine.module.classifier.weight, start)  # it stepped
