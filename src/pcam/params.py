"""Strict, typed parameters: params.yaml is the only configuration (its comments explain the keys).

`load_params("params.yaml")` returns a frozen `Params`. Every key must be known, present and of the
right type and range; otherwise a ParamsError names the key, the value and the file (and, for a
typo, the closest valid key). The dataclasses carry no defaults on purpose: a value that
params.yaml lacks cannot silently come from code.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pcam.errors import PcamError


class ParamsError(PcamError):
    pass


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """Field with an allowed range, checked at load time: `lo <= v <= hi` (`lo < v` if lo_open)."""
    return field(metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class DefectParams:
    # Known defects in the synthetic splits, so validate-data has ground truth to be measured
    # against (indices in data/raw/synthetic_defects.json; no stage reads it).
    duplicate_rate: float = _range(0.0, 0.1)
    cross_split_rate: float = _range(0.0, 0.1)
    blank_rate: float = _range(0.0, 0.1)
    black_rate: float = _range(0.0, 0.1)
    trigger_rate: float = _range(0.0, 0.1)
    trigger_px: int = _range(2, 16)


@dataclass(frozen=True)
class SyntheticParams:
    seed: int = _range(0)
    n_train: int = _range(2)
    n_valid: int = _range(2)
    n_test: int = _range(2)
    slides_train: int = _range(1)
    slides_valid: int = _range(1)
    slides_test: int = _range(1)
    hard_negative_fraction: float = _range(0.0, 1.0)
    defects: DefectParams


@dataclass(frozen=True)
class PcamSourceParams:
    base_url: str
    # Only accepts or refuses the downloaded files, never changes them.
    checksums: str
    timeout_s: float = _range(0.0, lo_open=True)
    retries: int = _range(0)


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "pcam"]
    synthetic: SyntheticParams
    pcam: PcamSourceParams
    memory_budget_gb: float = _range(0.0, lo_open=True)


# Why validate-data flags a patch, in priority order; `validate.exclude` picks the exclusions.
ExclusionReason = Literal[
    "cross_split_duplicate", "duplicate", "trigger", "black", "white", "background", "uniform"
]
_Action = Literal["error", "warn"]


@dataclass(frozen=True)
class LabelChecks:
    one_class: _Action
    class_balance: _Action
    meta_agreement: _Action


@dataclass(frozen=True)
class ValidateParams:
    chunk_rows: int = _range(1)  # bounds memory whatever the split size
    threads: int = _range(1)
    # Floats only if every value is an integer 0..255 (a lossless uint8 copy): rounding
    # [0, 1]-scaled floats back would change pixels.
    allow_float_images: bool
    allow_wide_labels: bool
    exclude: tuple[ExclusionReason, ...] = field(metadata={"may_be_empty": True})
    background_max_saturation: float = _range(0.0, 1.0)
    white_min: int = _range(0, 255)
    black_max: int = _range(0, 255)
    blank_pixel_fraction: float = _range(0.0, 1.0, lo_open=True)
    uniform_max_std: float = _range(0.0)
    trigger_block_px: int = _range(2, 16)
    trigger_dark_max: int = _range(0, 255)
    trigger_bright_min: int = _range(0, 255)
    max_cross_split_duplicates: int = _range(0)
    max_excluded_fraction: float = _range(0.0, 1.0)
    min_positive_fraction: float = _range(0.0, 1.0)
    max_positive_fraction: float = _range(0.0, 1.0)
    max_meta_label_mismatch_fraction: float = _range(0.0, 1.0)
    label_checks: LabelChecks


@dataclass(frozen=True)
class StatsParams:
    chunk_rows: int = _range(1)


@dataclass(frozen=True)
class AugmentParams:
    flips: bool
    rot90: bool
    color_jitter: float = _range(0.0, 0.5)  # 0 = off; 0.1 scales brightness by [0.9, 1.1]


@dataclass(frozen=True)
class TrainParams:
    seed: int = _range(0)
    model: Literal["mlp", "cnn", "resnet"]
    width: int = _range(1)
    hidden_units: int = _range(1)
    epochs: int = _range(1)
    batch_size: int = _range(1)
    optimizer: Literal["adamw", "sgd"]
    lr: float = _range(0.0, lo_open=True)
    momentum: float = _range(0.0, 1.0)
    weight_decay: float = _range(0.0)
    scheduler: Literal["none", "plateau", "cosine", "onecycle"]
    plateau_patience: int = _range(0)
    plateau_factor: float = _range(0.0, 1.0, lo_open=True)
    grad_clip_norm: float = _range(0.0)
    early_stopping_patience: int = _range(0)
    sampler: Literal["shuffle", "weighted"]
    use_exclusions: bool
    augment: AugmentParams
    device: Literal["auto", "cpu", "cuda"]
    # Under torchrun/srun (WORLD_SIZE set) the launcher's world size is used instead.
    devices: int = _range(1)
    precision: Literal["fp32", "bf16"]
    channels_last: bool
    compile: bool
    threads: int = _range(1)  # fixed so runs are comparable and recorded


@dataclass(frozen=True)
class EvaluateParams:
    threshold: str | float
    batch_size: int = _range(1)
    bootstrap_resamples: int = _range(2)
    bootstrap_seed: int = _range(0)
    calibration_bins: int = _range(2)


@dataclass(frozen=True)
class SliceParams:
    dark_fraction: float = _range(0.0, 1.0, lo_open=True)
    bright_fraction: float = _range(0.0, 1.0, lo_open=True)
    low_contrast_fraction: float = _range(0.0, 1.0, lo_open=True)
    high_saturation_fraction: float = _range(0.0, 1.0, lo_open=True)
    background_saturation: float = _range(0.0, 1.0)
    max_tissue_fraction: float = _range(0.0, 1.0)
    min_size: int = _range(1)
    min_per_class: int = _range(1)  # ROC-AUC/sensitivity/specificity need both classes
    max_f2_gap: float = _range(0.0, 1.0)
    bootstrap_resamples: int = _range(2)
    gallery_size: int = _range(1)


@dataclass(frozen=True)
class BenchmarkParams:
    profile: Literal["quick", "full"]
    batch_sizes: tuple[int, ...]
    train_batch_sizes: tuple[int, ...]
    warmup: int = _range(0)
    repeats: int = _range(1)
    threads: int = _range(1)
    loader_patches: int = _range(1)
    loader_workers: int = _range(1)
    train_loop_patches: int = _range(1)


@dataclass(frozen=True)
class DriftParams:
    reference_patches: int = _range(100)
    bins: int = _range(2, 100)
    feature_shift_max: float = _range(0.0, lo_open=True)
    prediction_psi_max: float = _range(0.0, lo_open=True)
    prediction_ks_max: float = _range(0.0, 1.0, lo_open=True)
    min_patches: int = _range(1)


@dataclass(frozen=True)
class Params:
    data: DataParams
    validate: ValidateParams
    stats: StatsParams
    train: TrainParams
    evaluate: EvaluateParams
    slice: SliceParams
    benchmark: BenchmarkParams
    drift: DriftParams


def _check_threshold(value: str | float) -> str | None:
    if isinstance(value, float):
        return None if 0.0 <= value <= 1.0 else "must be within [0, 1]"
    if value in ("f2", "f1", "youden") or re.match(r"^sensitivity@(0(\.\d+)?|1(\.0+)?)$", value):
        return None
    return "must be one of f2, f1, youden, sensitivity@<0..1> or a number in [0, 1]"


def _check_checksums(value: str) -> str | None:
    if value == "official" or value.endswith(".json"):
        return None
    return "must be 'official' or the path of a .json file {file name: md5}"


def _check_positive_fraction_range(v: dict) -> str | None:
    if v["min_positive_fraction"] <= v["max_positive_fraction"]:
        return None
    return (
        f"validate.min_positive_fraction = {v['min_positive_fraction']} is above "
        f"validate.max_positive_fraction = {v['max_positive_fraction']}"
    )


# Checks that do not fit a type + range, by dotted key: value -> error message or None.
_CUSTOM_CHECKS = {"evaluate.threshold": _check_threshold, "data.pcam.checksums": _check_checksums}
# Checks across the keys of one section, once it is built (so in file order): values -> message.
_SECTION_CHECKS = {ValidateParams: _check_positive_fraction_range}
# type -> (accepts a YAML value, what it must be); bool is an int to Python, so refused by hand.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        "a finite number",
    ),
    str: (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`; people write `1e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; syntax errors name line, column and cause, duplicate keys are refused."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ParamsError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})"
        ) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        cause = " ".join((err.problem or "syntax error").split())
        if err.context:
            started = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
            cause += f" ({' '.join(err.context.split())}{started})"
        raise ParamsError(f"{where}: not valid YAML: {cause}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "") -> None:
    """PyYAML keeps the last of two equal keys without a word; a repeated key or section is
    almost always an edit that went to the wrong place, so it is an error here (DVC refuses the
    same file too)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix.rstrip('.')}[{i}].")
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = prefix + str(key_node.value), key_node.start_mark.line + 1
        if key in first_line:
            kind = "section" if isinstance(value_node, yaml.MappingNode) else "key"
            raise ParamsError(
                f"{path}:{line}: duplicate {kind} '{key}' (first at line {first_line[key]}); "
                "merge the two, PyYAML would silently keep only the last"
            )
        first_line[key] = line
        _refuse_duplicate_keys(value_node, path, key + ".")


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load and validate params.yaml into frozen dataclasses (see module docstring)."""
    return _convert(Params, read_yaml(path), "", Path(path))


def _build(cls: type, raw: Any, prefix: str, path: Path) -> Any:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "<top level>"
        raise ParamsError(f"{path}: {where} must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in raw]
    for key in raw:
        if key not in names:
            # A similar name first; failing that, a renamed key is usually the one that is missing.
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            close = close or (missing if len(missing) == 1 else [])
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ParamsError(f"{path}: unknown key '{prefix}{key}'{hint}")
    values = {}
    for f in dataclasses.fields(cls):
        key, meta = prefix + f.name, f.metadata
        if f.name not in raw:
            raise ParamsError(f"{path}: missing key '{key}'")
        # `[]` is meaningful only where meant (exclude nothing); other lists must be non-empty.
        empty_ok = raw[f.name] == [] and meta.get("may_be_empty")
        value = () if empty_ok else _convert(hints[f.name], raw[f.name], key, path)
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (value <= lo if meta["lo_open"] else value < lo):
            op = ">" if meta["lo_open"] else ">="
            raise ParamsError(f"{path}: {key} = {value} out of range: must be {op} {lo}")
        if hi is not None and value > hi:
            raise ParamsError(f"{path}: {key} = {value} out of range: must be <= {hi}")
        if (check := _CUSTOM_CHECKS.get(key)) and (msg := check(value)):
            raise ParamsError(f"{path}: {key} = {_show(raw[f.name])} {msg}")
        values[f.name] = value
    if (check := _SECTION_CHECKS.get(cls)) and (msg := check(values)):
        raise ParamsError(f"{path}: {msg}")
    return cls(**values)


def _convert(tp: Any, value: Any, key: str, path: Path) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + "." if key else "", path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParamsError(f"{path}: {key} = {_show(value)} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{path}: {key} = {_show(value)} must be a non-empty list")
        return tuple(_convert(args[0], v, f"{key}[{i}]", path) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in args:  # the first type that accepts the value wins
            try:
                return _convert(option, value, key, path)
            except ParamsError:
                continue
        raise ParamsError(f"{path}: {key} = {_show(value)} must be one of {tp}")
    accepts, need = _SCALARS[tp]
    if not accepts(value):
        raise ParamsError(f"{path}: {key} = {_show(value)} must be {need}")
    return float(value) if tp is float else value


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict | list) else type(value).__name__


def declared_params(
    stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml", path: str | os.PathLike = "params.yaml"
) -> dict[str, Any]:
    """{dotted key: value} of the params dvc.yaml declares for `stage`, as params.yaml has them:
    what dvc.lock records for it. The only params a stage may write into its outputs: one it
    does not declare would change them while DVC calls the stage up to date."""
    if not Path(dvc_yaml).is_file():
        raise ParamsError(f"{dvc_yaml}: not found (stages run from the repository's root)")
    stages = (read_yaml(dvc_yaml) or {}).get("stages") or {}
    if stage not in stages:
        raise ParamsError(f"{dvc_yaml}: no stage '{stage}'")
    values = read_yaml(path)
    out = {}
    for key in stages[stage].get("params") or []:
        node = values
        for part in str(key).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{dvc_yaml}: stage '{stage}' declares {key}, not in {path}")
            node = node[part]
        out[key] = node
    return out


def to_dict(params: Any) -> dict:
    """Plain nested dict (tuples as lists), e.g. for JSON. Not for what a stage records of its
    params: that is `declared_params`, which holds no key DVC does not track for the stage."""
    # The JSON round trip turns tuples into lists, and nothing else changes.
    return json.loads(json.dumps(dataclasses.asdict(params)))
