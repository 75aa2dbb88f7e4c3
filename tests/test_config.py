from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from scn_scale.config import (
    ConfigError,
    ModelConfig,
    SCNConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_released_recipe():
    cfg = load_config(TrainConfig, None, [])
    assert (cfg.epochs, cfg.batch_size, cfg.image_size, cfg.lr, cfg.weight_decay, cfg.lr_decay) == (70, 64, 224, 1e-3, 1e-4, 0.9)
    assert cfg.scn == SCNConfig(beta=0.7, delta1=0.07, delta2=0.2, gamma=0.5, relabel_epoch=10, relabel_scope="all", rank_scope="local")
    assert cfg.model == ModelConfig("resnet18", 0.0)


def test_yaml_then_overrides_with_nested_keys(tmp_path):
    path = write(tmp_path, "epochs: 5\nrun_name: demo\nscn:\n  delta1: 0.15\n  relabel_scope: low\nmodel:\n  backbone: resnet34\n")
    cfg = load_config(TrainConfig, path, ["epochs=7", "scn.delta1=0.1", "scn.rank_scope=global", "lr=0.01"])
    assert cfg.epochs == 7
    assert cfg.run_name == "demo"
    assert cfg.scn.delta1 == 0.1
    assert cfg.scn.relabel_scope == "low"  # from the file, untouched by the overrides
    assert cfg.scn.rank_scope == "global"
    assert cfg.scn.beta == 0.7  # nested defaults survive a partial section
    assert cfg.model.backbone == "resnet34"
    assert cfg.lr == 0.01


def test_override_values_are_typed():
    cfg = load_config(TrainConfig, None, ["lr=1", "use_gpu=true", "run_name=2024", "init=", 'deepspeed={"zero_optimization": {"stage": 2}}'])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.use_gpu is True
    assert cfg.run_name == "2024"  # a str field keeps the literal text
    assert cfg.init == ""
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}
    assert load_config(TrainConfig, None, ["deepspeed=cluster/ds.json"]).deepspeed == "cluster/ds.json"


def test_whole_section_override_merges():
    cfg = load_config(TrainConfig, None, ["scn={beta: 0.6}"])
    assert cfg.scn.beta == 0.6 and cfg.scn.delta2 == 0.2


@pytest.mark.parametrize(
    "override, where",
    [("epoch=3", "'epoch'"), ("scn.delt1=0.1", "'scn.delt1'"), ("model.depth=3", "'model.depth'"),
     ("eac.lambda=5", "'eac.lambda'")],
)
def test_unknown_override_lists_valid_keys(override, where):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [override])
    assert where in str(e.value)
    if override.startswith("scn."):
        assert "beta, delta1, delta2, gamma, relabel_epoch, warmup_epochs, relabel_confirm, relabel_scope, rank_scope" in str(e.value)
    elif override.startswith("eac."):
        assert "valid keys under 'eac': lam" in str(e.value)
    elif override.startswith("model."):
        assert "backbone, dropout" in str(e.value)
    else:
        assert "epochs" in str(e.value) and "train_shards" in str(e.value)


def test_unknown_yaml_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'scn\.betta'.*valid keys under 'scn': beta, delta1"):
        load_config(TrainConfig, write(tmp_path, "scn:\n  betta: 0.5\n"), [])


@pytest.mark.parametrize(
    "override, key",
    [
        ("epochs=abc", "'epochs' expects int"),
        ("epochs=1.5", "'epochs' expects int"),
        ("use_gpu=1", "'use_gpu' expects bool"),
        ("scn.beta=high", "'scn.beta' expects float"),
        ("method=sgd", r"'method' must be one of \['scn', 'baseline', 'eac'\]"),
        ("eac.lam=strong", "'eac.lam' expects float"),
        ("scn.relabel_scope=some", "'scn.relabel_scope' must be one of"),
        ("scn=3", "'scn' expects a mapping"),
        ("epochs.x=3", "'epochs' has no sub-keys"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TrainConfig, None, [override])


def test_yaml_type_error(tmp_path):
    with pytest.raises(ConfigError, match="'run_name' expects str"):
        load_config(TrainConfig, write(tmp_path, "run_name: 12\n"), [])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, write(tmp_path, "- 1\n"), [])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size must be >= 1"),
        ("scn.beta=1.0", "scn.beta must be in"),
        ("scn.gamma=1.5", "scn.gamma"),
        ("scn.relabel_epoch=0", "1-based"),
        ("model.backbone=vgg16", "model.backbone must be one of"),
        ("fail_at=epoch:1", "fail_at"),
        ("cpus_per_worker=0", "cpus_per_worker must be > 0"),
        ("eac.lam=-1", "eac.lam must be >= 0"),
    ],
)
def test_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_validate_checks_configs_built_in_code():
    with pytest.raises(ConfigError, match="'method' must be one of"):
        TrainConfig(method="sgd").validate()
    TrainConfig(fail_at="epoch=1,step=2,rank=1").validate()


def test_eac_is_a_method_with_its_own_section():
    cfg = load_config(TrainConfig, None, ["method=eac", "eac.lam=2"])
    assert cfg.method == "eac" and cfg.eac.lam == 2.0
    assert TrainConfig().eac.lam == 5.0  # the released code's weight


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(TrainConfig, None, ["epochs=3", "scn.delta1=0.15", 'deepspeed={"train_batch_size": 8}'])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(TrainConfig, str(path), []) == cfg
    assert config_to_dict(cfg)["scn"]["delta1"] == 0.15


def test_later_override_wins():
    assert parse_overrides(["a=1", "b.c=x=y", "a=2"]) == {"a": "2", "b.c": "x=y"}


@dataclass
class Inner:
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    names: dict[str, float] = field(default_factory=dict)
    mode: Optional[Literal["a", "b"]] = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    limit: Optional[int] = None


def test_generic_containers_and_optionals():
    cfg = load_config(Outer, None, ["inner.sizes=[3, 4]", "inner.names={x: 1}", "inner.mode=b", "limit=5"])
    assert cfg == Outer(Inner([3, 4], {"x": 1.0}, "b"), 5)
    assert load_config(Outer, None, ["limit=null"]).limit is None
    with pytest.raises(ConfigError, match=r"'inner.sizes\[1\]' expects int"):
        load_config(Outer, None, ["inner.sizes=[3, x]"])
    with pytest.raises(ConfigError, match="'inner.mode' expects"):
        load_config(Outer, None, ["inner.mode=c"])


def test_local_paths_become_absolute_and_urls_and_named_starts_stay(tmp_path, monkeypatch):
    # Ray runs the workers in working directories of their own: a relative path would name nothing there.
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(train_shards="data/web/train", val_shards="s3://bucket/val", out_dir="runs",
                      init="torchvision:resnet18", label_overrides="noise.parquet", deepspeed="ds.json")
    out = cfg.with_absolute_paths()
    assert (out.train_shards, out.val_shards, out.out_dir) == (str(tmp_path / "data/web/train"), "s3://bucket/val",
                                                               str(tmp_path / "runs"))
    assert (out.init, out.label_overrides, out.deepspeed) == ("torchvision:resnet18", str(tmp_path / "noise.parquet"),
                                                              str(tmp_path / "ds.json"))
    assert TrainConfig(deepspeed={"zero_optimization": {}}).with_absolute_paths().deepspeed == {"zero_optimization": {}}
    assert TrainConfig().with_absolute_paths().init == ""
