"""Fine-tuning: the trainer starts from ImageNet- and MS-Celeb-layout files with the whole backbone loaded;
and end to end, an 8-class pretrained model file -> fine-tune on a RAF-DB-layout fixture -> evaluate, with a
report that recounts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from scn_scale import evaluate, loop
from scn_scale import train as train_mod
from scn_scale.config import TrainConfig, load_config
from scn_scale.importers.__main__ import main as import_main
from scn_scale.model import SCNModel
from scn_scale.weights import save_model_file
from shards import BASIC7, CANONICAL
from tests.conftest import write_shard_set
from tests.fixtures_benchmarks import make_rafdb
from tests.test_evaluate import check_report_against_predictions

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = str(REPO / "cluster" / "configs" / "cpu-small.yaml")
DEEPSPEED = str(REPO / "cluster" / "deepspeed" / "zero2-cpu.json")
SIZE = 32


def resnet18_file(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 with random weights saved in `layout`; returns its backbone tensors by model name."""
    torch.manual_seed(1234)
    state = torchvision.models.resnet18(weights=None).state_dict()
    if layout == "imagenet":
        torch.save(state, path)
    else:  # the SCN authors' MS-Celeb checkpoint: module.-prefixed names, extra face-recognition layers
        extra = {"module.feature.weight": torch.randn(256, 512), "module.feature.bias": torch.randn(256)}
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()} | extra, "epoch": 30}, path)
    return {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every LoadReport the trainer gets back from scn_scale.weights.load_weights (driver and worker paths)."""
    reports = []
    real = loop.load_weights

    def spy(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(loop, "load_weights", spy)
    monkeypatch.setattr(train_mod, "load_weights", spy)
    return reports


def small_sets(tmp_path: Path, classes=CANONICAL) -> tuple[Path, Path]:
    train, val = tmp_path / "train", tmp_path / "val"
    write_shard_set(train, [8, 8], classes=classes, size=SIZE, seed=0)
    write_shard_set(val, [6], classes=classes, size=SIZE, seed=1, split="val")
    return train, val


def config(train: Path, val: Path, out: Path, run_name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CPU_CONFIG, [
        f"train_shards={train}", f"val_shards={val}", f"out_dir={out}", f"run_name={run_name}", "num_workers=1",
        "loader_workers=0", f"image_size={SIZE}", "batch_size=8", "epochs=1", f"deepspeed={DEEPSPEED}", *overrides,
    ])


@pytest.mark.parametrize("layout", ["imagenet", "msceleb"])
def test_finetuning_starts_with_the_whole_backbone_loaded(
    tmp_path: Path, layout: str, loads: list, one_rank
) -> None:
    init = tmp_path / f"{layout}.pth"
    expected = resnet18_file(init, layout)
    train, val = small_sets(tmp_path, BASIC7)
    cfg = config(train, val, tmp_path / "runs", "ft", f"init={init}")
    ds_config, classes = train_mod.prepare(cfg)  # the driver's check loads the file once
    engine = loop.build_engine(loop.WorkerSpec(cfg=cfg, deepspeed=ds_config, classes=classes, storage="unused"),
                               torch.device("cpu"), init=True)  # the worker's start
    assert len(loads) == 2
    model_names = set(SCNModel(len(BASIC7)).state_dict())
    backbone = {n for n in model_names if n.startswith("backbone.")}
    for report in loads:
        assert report.layout == ("torchvision" if layout == "imagenet" else "msceleb")
        assert backbone <= set(report.loaded), sorted(backbone - set(report.loaded))
        assert set(report.missing) == model_names - backbone  # only the new heads: classifier and importance
        assert not report.mismatched
    heads = {"fc.weight", "fc.bias"}  # ImageNet's classifier; MS-Celeb adds its feature layer, all module.-prefixed
    if layout == "msceleb":
        heads = {f"module.{n}" for n in heads | {"feature.weight", "feature.bias"}}
    assert set(loads[0].unexpected) == heads
    state = engine.module.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_balanced_sampler_reaches_the_trainer(tmp_path: Path) -> None:
    """The setting passes the trainer's checks; the sampling itself is tested in test_shards."""
    train, val = small_sets(tmp_path)
    cfg = config(train, val, tmp_path / "runs", "affectnet-recipe", "balanced_sampler=true")
    assert cfg.balanced_sampler
    train_mod.prepare(cfg)


@pytest.mark.slow
def test_pretrain_finetune_on_rafdb_then_evaluate(tmp_path: Path, loads: list, local_ray: str) -> None:
    """The pretrained file is an 8-class model file as the trainer writes it (test_train checks that the
    trainer writes one; the demo's slow test fine-tunes from a real crawl pretraining)."""
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.pt"
    save_model_file(str(pretrained), SCNModel(len(CANONICAL)), CANONICAL)
    fixture = make_rafdb(tmp_path / "RAF-DB", per_class=(3, 2), size=100)
    rafdb = tmp_path / "rafdb"
    assert import_main(["rafdb", "--root", str(fixture.root), "--out", str(rafdb), "--shard-size", "6"]) == 0
    rafdb_train, rafdb_test = rafdb / "train", rafdb / "test"
    runs = tmp_path / "runs"
    finetune = train_mod.train(config(rafdb_train, rafdb_test, runs, "rafdb", f"init={pretrained}",
                                      "epochs=2", "scn.relabel_epoch=1"))
    # 8-class pretraining -> 7-class benchmark: the classifier rows came over by name.
    assert loads and loads[-1].layout == "scn-scale" and set(loads[-1].classifier_rows) == set(BASIC7)
    assert [m["epoch"] for m in finetune.metrics] == [1, 2]

    out = tmp_path / "report"
    assert evaluate.main(["--checkpoint", finetune.run_dir, "--shards", str(rafdb_test), "--out", str(out)]) == 0
    report = check_report_against_predictions(out, BASIC7)
    assert report["samples"] == sum(fixture.counts["test"].values())
    assert report["epoch"] == 2 and report["image_size"] == SIZE
    assert set(report["plots"]) == {"confusion", "alpha", "epochs", "flow"}
    run = report["run"]
    assert [e["accuracy"] for e in run["epochs"]] == [m["val_accuracy"] for m in finetune.metrics]
    assert run["last"]["epoch"] == 2 and run["best"]["accuracy"] == max(m["val_accuracy"] for m in finetune.metrics)
    assert run["selected_on_evaluated_set"]  # the fine-tune validated on the test split, and the report says so
    saved = json.loads((out / "report.json").read_text())
    assert saved["relabel"]["changed"] == finetune.metrics[-1]["relabels_total"]
    md = (out / "report.md").read_text()
    assert "| last | 2 |" in md and "| best (selected on validation set) |" in md and "best-on-test" in md
