"""The config reference: every setting described beside its field, docs/config.md generated from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scn_scale import config_reference
from scn_scale.config import TrainConfig
from scn_scale.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_has_a_description() -> None:
    assert config_reference.undocumented() == [], "describe these in scn_scale/config.py (metadata={'doc': ...})"


@dataclasses.dataclass
class Inner:
    plain: int = 1
    told: int = dataclasses.field(default=2, metadata={"doc": "described"})


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_undocumented_settings_are_found_in_nested_sections() -> None:
    assert config_reference.undocumented(Outer) == ["inner", "inner.plain"]


def test_docs_config_md_is_what_the_generator_writes() -> None:
    page = (REPO / "docs" / "config.md").read_text()
    assert page == config_reference.reference(), "run: python -m scn_scale.config_reference"


def test_reference_lists_every_key_with_type_and_default() -> None:
    page = config_reference.reference()
    keys = config_reference.setting_names()
    assert "scn.delta1" in keys and "eac.lam" in keys and "model.backbone" in keys and "reader.interleave" in keys
    sections = {"scn", "eac", "model", "reader"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - sections <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in page
    assert '| `scn.relabel_scope` | `"all" \\| "low"` | `"all"` |' in page
    assert "| `epochs` | `int` | `70` |" in page


def test_generator_cli_writes_the_page(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    assert config_reference.main(["--out", str(out)]) == 0
    assert out.read_text() == config_reference.reference()


def test_train_help_lists_the_keys_and_points_to_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "docs/config.md" in text
    for key in config_reference.setting_names():
        assert key in text
