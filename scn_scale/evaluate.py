"""`python -m scn_scale.evaluate --checkpoint C --shards S --out DIR`: a checkpoint on a shard set, as a report.

C is a checkpoint directory (holding `model.pt`), a training run directory, meaning its
latest complete checkpoint (the highest `checkpoint_epoch_NNNN` whose files were all copied:
scn_scale.checkpoint.is_complete), or a model
file; a local path or a URL (s3://, gs://: where cluster runs keep their checkpoints). The model's classes and the set's
are matched by name; only classes both have are evaluated, and the report says so.

On several workers (WORLD_SIZE and RANK set, as under torchrun, or inside a Ray Train
worker whose process group exists) each rank reads its part of the set, predictions are
gathered by sample key and de-duplicated, so each sample counts exactly once; rank 0
writes. Outputs in DIR: `report.json`, `report.md` and its self-contained twin `report.html`,
`predictions.parquet` (one row per sample: the numbers can be recounted), the PNGs of
`scn_scale.report` and the galleries of `scn_scale.gallery` (confident errors per class, the
lowest-alpha samples); for a run, accuracy per epoch (best and last, with the selection
split named) and the relabel flow.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from scn_scale import gallery
from scn_scale import report as plots
from scn_scale.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    is_complete,
    latest_checkpoint,
    read_metrics,
)
from scn_scale.data import shard_loader
from scn_scale.model import SCNModel, SCNOutput
from scn_scale.noise import load_ground_truth
from scn_scale.predictions import Predictions, collect, summarize
from scn_scale.weights import WeightLoadError, load_model_file
from shards import ShardSet, index_map, open_shard_set
from shards.atomic import write_json, write_parquet
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.fs import is_file, join, local_dir, open_fs

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
CHECKPOINT_HELP = "checkpoint directory, run directory (its latest checkpoint) or model file"
IMAGE_SIZE_HELP = "input size (default: the size the checkpoint was trained at)"


@dataclass
class EvalConfig:
    checkpoint: str  # checkpoint directory, run directory (latest checkpoint) or model file
    shards: str
    out: str
    run: str = ""  # training run directory for per-epoch curves; "" = the checkpoint's own run, if any
    image_size: int = 0  # 0: the size the checkpoint was trained at
    batch_size: int = 64
    loader_workers: int = 2
    label_overrides: str = ""  # noise table (key, label, true_label): alpha of noisy vs clean samples
    device: str = ""  # "" = this rank's GPU when there is one, else CPU

    def validate(self) -> None:
        """The settings that need nothing loaded; ValueError naming the setting."""
        for name, least in (("image_size", 0), ("batch_size", 1), ("loader_workers", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if is_file(self.out):
            raise ValueError(f"out {self.out} exists and is not a directory")
        if self.device:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device {self.device!r}: {e}") from e


# -- checkpoints -----------------------------------------------------------------------


def find_model_file(path: str | Path) -> str:
    """The model file that `path` (a local path or a URL) means: itself, `path/model.pt`, or
    the model file of a run's latest checkpoint."""
    path = str(path).rstrip("/")
    fs, fs_path = open_fs(path)
    if fs.isfile(fs_path):
        return path
    if fs.isfile(join(fs_path, MODEL_FILE)):
        if fs.isfile(join(fs_path, STATE_FILE)) and not is_complete(path):
            raise CheckpointError(f"{path}: an incomplete checkpoint (its files were not all copied): "
                                  "evaluate an earlier one, or the run directory for its latest complete one")
        return join(path, MODEL_FILE)
    if not fs.isdir(fs_path):
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: holds no {MODEL_FILE} in a complete checkpoint (neither a checkpoint nor a run directory)")
    return join(latest, MODEL_FILE)


def _parent(path: str) -> str | None:
    """The directory above `path` (a local path or a URL), None at the top."""
    head = path.rsplit("/", 1)[0]
    return None if head == path or not head or head.endswith(":/") else head


def find_run_dir(model_file: str) -> str | None:
    """The run directory above a checkpoint: the nearest parent holding metrics.jsonl."""
    parent = _parent(model_file)
    while parent is not None:
        fs, fs_path = open_fs(join(parent, METRICS_FILE))
        if fs.isfile(fs_path):
            return parent
        parent = _parent(parent)
    return None


def load_checkpoint(path: str | Path) -> tuple[SCNModel, list[str], dict, str]:
    """(model in eval mode, its classes, its extra, the model file) for a checkpoint or run path."""
    model_file = find_model_file(path)
    model, classes, extra = load_model_file(model_file)
    return model.eval(), classes, extra, model_file


def trained_image_size(extra: dict) -> int:
    """The input size a model was trained at, as the trainer records it in the model file
    (the recipe's 224 for files that do not say)."""
    return int(extra.get("image_size", DEFAULT_IMAGE_SIZE))


# -- evaluation ------------------------------------------------------------------------


class SharedClasses(nn.Module):
    """The model restricted to the classes it shares with the evaluated set (logit columns by name)."""

    def __init__(self, model: SCNModel, columns: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.as_tensor(list(columns), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> SCNOutput:
        out = self.model(x)
        return SCNOutput(out.logits[:, self.columns], out.alpha, out.scaled_logits[:, self.columns])


@dataclass(frozen=True)
class Workers:
    rank: int
    world_size: int
    created_group: bool  # this call started the process group and must end it


def _workers() -> Workers:
    """This process's place among the evaluating workers: an existing process group
    (Ray Train, a caller), WORLD_SIZE/RANK from the environment (torchrun), or one process."""
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size(), False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Workers(0, 1, False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return Workers(dist.get_rank(), world_size, True)


def _device(cfg: EvalConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def predict_set(
    model: nn.Module, shard_set: ShardSet, cfg: EvalConfig, image_size: int, workers: Workers, device: torch.device
) -> Predictions:
    """Every sample of the set once: this rank's part, gathered from all ranks, de-duplicated by key.

    Rank 0 shows a bar over its batches when its stderr is a terminal (never in logs or under Ray).
    """
    loader = shard_loader(
        shard_set,
        train=False,
        image_size=image_size,
        batch_size=cfg.batch_size,
        rank=workers.rank,
        world_size=workers.world_size,
        loader_workers=cfg.loader_workers,
    )
    with tqdm(loader, desc="evaluate", unit="batch", disable=True if workers.rank else None, file=sys.stderr) as batches:
        mine = collect(model.to(device), batches, device)
    if workers.world_size == 1:
        return mine.dedupe()
    parts: list[Predictions | None] = [None] * workers.world_size
    dist.all_gather_object(parts, mine)
    return Predictions.concat(p for p in parts if p is not None).dedupe()


def evaluate(cfg: EvalConfig) -> dict | None:
    """Evaluate and write the report; returns the report on rank 0, None on the other ranks.

    Every input (settings, checkpoint, shard set, noise table) is read before the first
    prediction, so a bad one fails fast and the report directory is not touched.
    """
    cfg.validate()
    model, model_classes, extra, model_file = load_checkpoint(cfg.checkpoint)
    shard_set = open_shard_set(cfg.shards)
    set_classes = list(shard_set.classes)
    classes = [c for c in model_classes if c in set_classes]
    if not classes:
        raise ValueError(f"model classes {model_classes} and shard set classes {set_classes} share no class")
    notes = []
    if classes != model_classes or classes != set_classes:
        notes.append(
            f"evaluated on the {len(classes)} classes the model ({', '.join(model_classes)}) and the shard set "
            f"({', '.join(set_classes)}) share; predictions are the argmax over those classes only"
        )
    net: nn.Module = model
    if classes != model_classes:
        net = SharedClasses(model, [model_classes.index(c) for c in classes])
    image_size = cfg.image_size or trained_image_size(extra)
    noisy_keys = set(load_ground_truth(cfg.label_overrides)) if cfg.label_overrides else None
    log.info("evaluating %s (classes %s, epoch %s) on %s", model_file, model_classes, extra.get("epoch"), cfg.shards)

    workers = _workers()
    try:
        pred = predict_set(net, shard_set, cfg, image_size, workers, _device(cfg))
    finally:
        if workers.created_group:
            dist.destroy_process_group()
    if workers.rank != 0:
        return None

    pred, left_out = _to_shared_labels(pred, set_classes, classes)
    if left_out:
        notes.append(f"{left_out} samples of classes the model lacks were left out")
    if noisy_keys is not None:
        notes.append(f"alpha split by the noise table {cfg.label_overrides} ({len(noisy_keys)} noisy keys)")
    result = summarize(pred, classes, noisy_keys)
    result.update(
        checkpoint=str(model_file),
        epoch=extra.get("epoch"),
        shards=cfg.shards,
        model_classes=model_classes,
        set_classes=set_classes,
        image_size=image_size,
        world_size=workers.world_size,
        notes=notes,
        config=asdict(cfg),
    )
    write_report(result, pred, noisy_keys, model_file, cfg)
    return result


def write_report(
    result: dict, pred: Predictions, noisy_keys: set[str] | None, model_file: str, cfg: EvalConfig
) -> None:
    """predictions.parquet, the plots, then report.json and report.md (which name the plots) into cfg.out
    (a directory or an object-store URL)."""
    with local_dir(cfg.out) as out:
        _write_report(result, pred, noisy_keys, model_file, cfg, out)


def _write_report(
    result: dict, pred: Predictions, noisy_keys: set[str] | None, model_file: str, cfg: EvalConfig, out: Path
) -> None:
    classes = result["classes"]
    write_parquet(out / "predictions.parquet", pred.to_table(classes))
    result["plots"] = {"confusion": plots.CONFUSION_PNG, "alpha": plots.ALPHA_PNG}
    plots.plot_confusion(result["confusion_matrix"], classes, out / plots.CONFUSION_PNG,
                         f"{cfg.shards.rstrip('/').rsplit('/', 1)[-1]}: accuracy {result['accuracy']:.2%}")
    noisy_mask = None if noisy_keys is None else np.array([k in noisy_keys for k in pred.keys], dtype=bool)
    plots.plot_alpha(pred.alpha, out / plots.ALPHA_PNG, noisy_mask)

    run_dir = cfg.run or find_run_dir(model_file)
    if run_dir is not None:
        run = result["run"] = run_summary(run_dir, model_file, cfg.shards)
        plots.plot_epochs(run["epochs"], out / plots.EPOCHS_PNG, run["selection_split"], run["best"]["epoch"],
                          run["last"]["epoch"])
        result["plots"]["epochs"] = plots.EPOCHS_PNG
    relabel = plots.relabel_summary(_parent(model_file) or ".", result["model_classes"])
    if relabel is not None:
        result["relabel"] = relabel
        plots.plot_flow(relabel["flow"], relabel["classes"], out / plots.FLOW_PNG)
        result["plots"]["flow"] = plots.FLOW_PNG
    images = gallery.SampleImages(cfg.shards)
    plots.save_figure(gallery.confident_errors(images, pred.keys, pred.labels, pred.preds, pred.probs, classes),
                      out / plots.ERRORS_PNG)
    plots.save_figure(gallery.lowest_alpha(images, pred.keys, pred.alpha, pred.labels, classes, preds=pred.preds,
                                           title="Lowest-alpha test samples"), out / plots.LOWEST_ALPHA_PNG)
    result["galleries"] = {"confident_errors": plots.ERRORS_PNG, "lowest_alpha": plots.LOWEST_ALPHA_PNG}
    write_json(out / "report.json", result)
    plots.write_markdown(result, out / "report.md")


def _to_shared_labels(pred: Predictions, set_classes: list[str], classes: list[str]) -> tuple[Predictions, int]:
    """Labels re-indexed from the set's class list into the evaluated one; other samples left out."""
    mapping = index_map(set_classes, classes)
    keep = np.array([int(label) in mapping for label in pred.labels], dtype=bool)
    labels = np.array([mapping[int(label)] for label in pred.labels[keep]], dtype=np.int64)
    kept = Predictions(
        keys=[k for k, m in zip(pred.keys, keep) if m],
        labels=labels,
        preds=pred.preds[keep],
        probs=pred.probs[keep],
        alpha=pred.alpha[keep],
    )
    return kept, int((~keep).sum())


# -- training runs ---------------------------------------------------------------------


def run_summary(run_dir: str, model_file: str, shards: str) -> dict:
    """Validation accuracy per epoch from the run's metrics file; the best epoch (highest validation
    accuracy, the earliest on a tie) and the last, with the set the best was selected on named."""
    lines = read_metrics(run_dir)
    if not lines:
        raise CheckpointError(f"{run_dir}: {METRICS_FILE} holds no epoch")
    epochs = [
        {"epoch": m["epoch"], "accuracy": m["val_accuracy"], "mean_class_accuracy": m["val_mean_class_accuracy"]}
        for m in lines
    ]
    best = max(epochs, key=lambda e: (e["accuracy"], -e["epoch"]))
    fs, config = open_fs(join(_parent(model_file) or ".", CONFIG_FILE))
    val_shards = str(yaml.safe_load(fs.read_text(config))["val_shards"]) if fs.isfile(config) else ""
    return {
        "dir": run_dir,
        "selection_split": "validation set",
        "selection_shards": val_shards,
        # The released SCN code selected on its test set; when that is the case here, the report says so.
        "selected_on_evaluated_set": bool(val_shards) and _same_place(val_shards, shards),
        "best": best,
        "last": epochs[-1],
        "epochs": epochs,
    }


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m scn_scale.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--shards", required=True, help="shard set to evaluate on")
    parser.add_argument("--out", required=True, help="report directory or object-store URL (s3://..., gs://...)")
    parser.add_argument("--run", default="", help="training run directory for per-epoch curves (default: C's run)")
    parser.add_argument("--image-size", type=int, default=0, help=IMAGE_SIZE_HELP)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--label-overrides", default="", help="noise table (key,label,true_label): alpha noisy/clean")
    parser.add_argument("--device", default="")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k != "log_level"})
    try:
        result = evaluate(cfg)
    except (CheckpointError, WeightLoadError) as e:
        return bad_input(e, "--checkpoint")
    except (ValueError, OSError) as e:  # the other inputs, each named (ShardSetError is a ValueError)
        return bad_input(e)
    if result is not None:
        print(f"{result['samples']} samples: accuracy {result['accuracy']:.4f}, "
              f"mean class accuracy {result['mean_class_accuracy']:.4f} -> {join(cfg.out, 'report.md')}")
        for note in result["notes"]:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
