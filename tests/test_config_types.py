"""Config fields are checked against their declared types (and floats for being finite), for every
field of every SDK and training config, and errors name the field, the value and the file."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_sdk import config as sdk_config
from sf_sdk.checkpoint.folder import CheckpointError, read_index, resolve_model_path
from sf_sdk.config import (
    DiTConfig,
    StreamingConfig,
    TextEncoderConfig,
    VAEConfig,
    check_fields,
    check_value,
    from_dict,
)
from training.data.shapes import ShapesConfig
from training.utils import config as train_config


def _configs(module) -> list[type]:
    """Every config dataclass a module defines (new ones are covered without editing this test)."""
    return [v for v in vars(module).values()
            if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == module.__name__]


SDK_CONFIGS = _configs(sdk_config)
TRAIN_CONFIGS = [c for c in _configs(train_config) if c is not train_config.TrainConfig] + [ShapesConfig]
assert {DiTConfig, StreamingConfig, VAEConfig, TextEncoderConfig} <= set(SDK_CONFIGS)


def _wrong_values(tp: typing.Any) -> list[typing.Any]:
    """Values of the wrong type for annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return ["no", 1, None]
    if tp is int:
        return ["6", 6.5, None, True]
    if tp is float:
        return ["0.5", None, math.nan, math.inf, False]
    if tp is str:
        return [1, None]
    if origin is typing.Literal:
        return ["not-an-option", None]
    if origin is tuple:
        return ["1,2", None]
    return []


def _fields(cls: type) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", SDK_CONFIGS + TRAIN_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_rejects_values_of_the_wrong_type(cls: type) -> None:
    checked = 0
    for name, tp in _fields(cls):
        for bad in _wrong_values(tp):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}\b.*must be .*got {re.escape(repr(bad)[:8])}"):
                cls(**{name: bad})
            checked += 1
    assert checked >= len(dataclasses.fields(cls))  # every field had at least one wrong value


def test_accepted_forms_are_normalized() -> None:
    st = StreamingConfig(denoising_step_list=[1000, 500], timestep_shift=5)
    assert st.denoising_step_list == (1000.0, 500.0) and isinstance(st.denoising_step_list[1], float)
    assert isinstance(st.timestep_shift, float)
    assert DiTConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)
    assert VAEConfig(dim=8, temperal_downsample=[False, True, True]).temperal_downsample == (False, True, True)
    assert from_dict(StreamingConfig, {"local_attn_size": 6}).local_attn_size == 6


def test_tuple_lengths_and_items_are_checked() -> None:
    with pytest.raises(ValueError, match=r"patch_size must be a list of 3 values"):
        DiTConfig(patch_size=(1, 2))
    with pytest.raises(ValueError, match=r"patch_size\[1\] must be an int, got 2.5"):
        DiTConfig(patch_size=(1, 2.5, 2))
    with pytest.raises(ValueError, match=r"temperal_downsample\[0\] must be a bool"):
        VAEConfig(temperal_downsample=(0, 1, 1))


def test_check_value_rules() -> None:
    assert check_value(int | None, None, "x") is None
    assert check_value(int | None, 3, "x") == 3
    with pytest.raises(ValueError, match=r"x must be an int, got '3'"):
        check_value(int | None, "3", "x")
    assert check_value(float, 2, "x") == 2.0 and isinstance(check_value(float, 2, "x"), float)
    with pytest.raises(ValueError, match="x must be an int, got True"):
        check_value(int, True, "x")
    assert check_value(tuple[int, ...], [], "x") == ()
    assert check_value(typing.Literal["a", "b"], "b", "x") == "b"


def test_a_new_field_is_covered_without_new_code() -> None:
    @dataclass(frozen=True)
    class Extended:
        steps: int = 1
        scale: float = 1.0
        name: str | None = None

        def __post_init__(self) -> None:
            check_fields(self)

    assert Extended(scale=2).scale == 2.0
    with pytest.raises(ValueError, match=r"Extended\.steps must be an int, got '6'"):
        Extended(steps="6")
    with pytest.raises(ValueError, match=r"Extended\.name must be a string"):
        Extended(name=3)


def test_model_index_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(resolve_model_path("shapes-tiny"), folder)
    index = folder / "model_index.json"
    data = json.loads(index.read_text())
    data["streaming"]["timestep_shift"] = "5"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model_index\.json.*StreamingConfig\.timestep_shift must be a number, "
                                              r"got '5'"):
        read_index(folder)
    data["streaming"]["timestep_shift"] = math.nan  # json writes NaN
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model_index\.json.*timestep_shift must be a finite number, got nan"):
        read_index(folder)


@pytest.mark.parametrize("override, message", [
    ("teacher.steps=6.5", r"teacher\.steps must be an int, got 6\.5"),
    ("teacher.steps='6'", r"teacher\.steps must be an int, got '6'"),
    ("fsdp=no", r"fsdp must be a bool \(true or false\), got 'no'"),
    ("stream.timestep_shift=nan", r"stream\.timestep_shift must be a finite number, got nan"),
    ("data.height=32.5", r"data\.height must be an int, got 32\.5"),
    ("vae.betas=[0.9]", r"vae\.betas must be a list of 2 values"),
    ("precision=fp64", r"precision must be one of \['fp32', 'bf16'\]"),
])
def test_training_config_errors_name_the_yaml_and_the_key(tmp_path: Path, override: str, message: str) -> None:
    from training.train import compose

    with pytest.raises(ValueError, match=r"training/configs/smoke\.yaml with overrides .*: " + message):
        compose("smoke", [f"run_dir={tmp_path}", override])


def test_training_config_from_python_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.stream must be a StreamingConfig"):
        train_config.TrainConfig(run_dir=str(tmp_path), stream={"local_attn_size": 6})
    cfg = train_config.build_config(train_config.TrainConfig, {"run_dir": str(tmp_path), "stages": ["vae"]})
    assert cfg.stages == ("vae",)


def test_from_dict_names_its_source_file() -> None:
    with pytest.raises(ValueError, match=r"^artifacts/export\.json: StreamingConfig\.num_frame_per_block must be an int, "
                                         r"got '3'"):
        from_dict(StreamingConfig, {"num_frame_per_block": "3"}, source="artifacts/export.json")
    with pytest.raises(ValueError, match=r"^dit_config\.json: unknown DiTConfig keys \['depth'\]"):
        from_dict(DiTConfig, {"depth": 3}, source="dit_config.json")


def _accepts(tp: typing.Any, v: typing.Any) -> bool:
    """Reference: the values a field of annotation ``tp`` takes."""
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    if tp == int | None:
        return v is None or _accepts(int, v)
    if tp == tuple[int, ...]:
        return isinstance(v, (list, tuple)) and all(_accepts(int, x) for x in v)
    if tp == tuple[float, float]:
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(_accepts(float, x) for x in v)
    if tp == typing.Literal["a", "b"]:
        return isinstance(v, str) and v in ("a", "b")
    raise AssertionError(tp)


_scalars = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from(["a", "b", "6", ""]), st.none())


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.sampled_from([bool, int, float, str, int | None, tuple[int, ...], tuple[float, float],
                        typing.Literal["a", "b"]]),
       st.one_of(_scalars, st.lists(_scalars, max_size=3), st.tuples(_scalars, _scalars)))
def test_check_value_matches_the_reference(tp: typing.Any, value: typing.Any) -> None:
    if _accepts(tp, value):
        got = check_value(tp, value, "f")
        assert got == value or (isinstance(value, list) and got == tuple(value))
        if tp is float:
            assert type(got) is float
        if typing.get_origin(tp) is tuple:
            assert type(got) is tuple
    else:
        with pytest.raises(ValueError, match=r"^f(\[\d\])? must be "):
            check_value(tp, value, "f")
