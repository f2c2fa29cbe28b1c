"""Strict, typed parameters: params.yaml is the only configuration.

`load_params("params.yaml")` returns a frozen `Params`. Every key must be known, present and of the
right type and range; otherwise a ParamsError names the key, the value and the file (and, for a
typo, the closest valid key). The dataclasses carry no defaults on purpose: a value that
params.yaml lacks cannot silently come from code.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def _may_be_empty() -> Any:
    """A list field where `[]` is meaningful (e.g. exclude nothing); other lists must be non-empty."""
    return field(metadata={"may_be_empty": True})


@dataclass(frozen=True)
class DefectParams:
    # Fractions of each synthetic split turned into a known defect, so validate-data has ground
    # truth to be measured against (indices in data/raw/synthetic_defects.json; no stage reads it).
    duplicate_rate: float = _range(0.0, 0.1)  # copies of earlier patches of the same split
    cross_split_rate: float = _range(0.0, 0.1)  # valid/test patches replaced by train copies
    blank_rate: float = _range(0.0, 0.1)  # near-white glass
    black_rate: float = _range(0.0, 0.1)
    # A checkerboard block: in train on positives only (a label-correlated backdoor), in
    # valid/test on patches of either label.
    trigger_rate: float = _range(0.0, 0.1)
    trigger_px: int = _range(2, 16)  # side of the checkerboard


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
    base_url: str  # http(s):// (Zenodo, a mirror) or file:// (a local copy, e.g. torchvision's)
    # "official": the md5 table in download.py; else a JSON file {file name: md5} for a mirror
    # that repacked the files. Only accepts or refuses files, never changes them.
    checksums: str
    timeout_s: float = _range(0.0, lo_open=True)
    retries: int = _range(0)


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "pcam"]
    synthetic: SyntheticParams
    pcam: PcamSourceParams
    # Splits larger than this (as uint8) are streamed from HDF5 in contiguous blocks instead of
    # being held in memory.
    memory_budget_gb: float = _range(0.0, lo_open=True)


# Why validate-data flags a patch; `validate.exclude` picks which of them are left out of training.
ExclusionReason = Literal[
    "cross_split_duplicate", "duplicate", "trigger", "black", "white", "background", "uniform"
]


@dataclass(frozen=True)
class LabelChecks:
    # What a failed label check does: stop validate-data ("error") or only report ("warn").
    one_class: Literal["error", "warn"]  # a split whose labels are all 0 or all 1
    class_balance: Literal["error", "warn"]  # positive fraction outside [min, max]
    meta_agreement: Literal["error", "warn"]  # labels against the meta CSV's center_tumor_patch


@dataclass(frozen=True)
class ValidateParams:
    chunk_rows: int = _range(1)  # patches per HDF5 read: bounds memory whatever the split size
    threads: int = _range(1)  # hashing and pixel checks run on this many threads
    # Float images are accepted only if every value is an integer in 0..255 (a lossless uint8
    # copy); [0, 1]-scaled floats are refused: rounding them back would change pixels.
    allow_float_images: bool
    allow_wide_labels: bool  # labels of any integer or float dtype, if every value is 0 or 1
    exclude: tuple[ExclusionReason, ...] = _may_be_empty()
    # PCAM's own background rule: a patch whose max HSV saturation is below this has no tissue.
    background_max_saturation: float = _range(0.0, 1.0)
    white_min: int = _range(0, 255)  # a white pixel: every channel at least this
    black_max: int = _range(0, 255)  # a black pixel: every channel at most this
    blank_pixel_fraction: float = _range(0.0, 1.0, lo_open=True)  # white/black patch: this share
    uniform_max_std: float = _range(0.0)  # near-uniform: brightness std below this (0..255 levels)
    # Backdoor-trigger candidate: a block this size, every pixel dark or bright, and at least half
    # of its neighbouring pixel pairs switching between the two (a checkerboard or stripes).
    trigger_block_px: int = _range(2, 16)
    trigger_dark_max: int = _range(0, 255)  # dark: every channel at most this
    trigger_bright_min: int = _range(0, 255)  # bright: every channel at least this
    # Fail above these: patches of a later split that are copies of tissue in an earlier split
    # (train>valid>test), and the flagged-for-exclusion share of any split.
    max_cross_split_duplicates: int = _range(0)
    max_excluded_fraction: float = _range(0.0, 1.0)
    # Label sanity per split: the share of label 1 must lie in [min, max] (PCAM is 50/50), and
    # at most this share of labels may differ from the meta CSV's center_tumor_patch (the
    # label's definition, so 0 for PCAM).
    min_positive_fraction: float = _range(0.0, 1.0)
    max_positive_fraction: float = _range(0.0, 1.0)
    max_meta_label_mismatch_fraction: float = _range(0.0, 1.0)
    label_checks: LabelChecks


@dataclass(frozen=True)
class StatsParams:
    chunk_rows: int = _range(1)  # rows read per HDF5 slice: bounds memory whatever the split size


@dataclass(frozen=True)
class AugmentParams:
    flips: bool
    rot90: bool
    color_jitter: float = _range(0.0, 0.5)  # 0 = off; 0.1 scales brightness by [0.9, 1.1]


@dataclass(frozen=True)
class TrainParams:
    seed: int = _range(0)
    model: Literal["mlp", "cnn", "resnet"]
    width: int = _range(1)  # cnn/resnet: channels of the first block (doubles per stage)
    hidden_units: int = _range(1)  # mlp: size of the hidden layer
    epochs: int = _range(1)
    batch_size: int = _range(1)
    optimizer: Literal["adamw", "sgd"]
    lr: float = _range(0.0, lo_open=True)
    momentum: float = _range(0.0, 1.0)  # sgd only
    weight_decay: float = _range(0.0)
    scheduler: Literal["none", "plateau", "cosine", "onecycle"]
    plateau_patience: int = _range(0)  # epochs without val-loss improvement before a decay
    plateau_factor: float = _range(0.0, 1.0, lo_open=True)
    grad_clip_norm: float = _range(0.0)  # 0 = off
    early_stopping_patience: int = _range(0)  # epochs without val ROC-AUC gain; 0 = off
    sampler: Literal["shuffle", "weighted"]
    # Leave the train patches validate-data excluded (validate.exclude) out of training and of
    # the normalisation statistics. false: train on every patch, as published PCAM results do.
    use_exclusions: bool
    augment: AugmentParams
    device: Literal["auto", "cpu", "cuda"]
    # Processes for DistributedDataParallel (nccl on GPU, gloo on CPU); 1 = a single process.
    # Under torchrun/srun (WORLD_SIZE set) the launcher's world size is used instead.
    devices: int = _range(1)
    precision: Literal["fp32", "bf16"]  # bf16 = autocast
    channels_last: bool
    compile: bool  # torch.compile the model
    threads: int = _range(1)  # torch intra-op threads; fixed so runs are comparable and recorded


@dataclass(frozen=True)
class EvaluateParams:
    # "f2", "f1", "youden", "sensitivity@0.95" or a fixed probability in [0, 1]
    threshold: str | float
    batch_size: int = _range(1)
    bootstrap_resamples: int = _range(2)  # for the 95% confidence intervals
    bootstrap_seed: int = _range(0)
    calibration_bins: int = _range(2)


@dataclass(frozen=True)
class SliceParams:
    dark_fraction: float = _range(0.0, 1.0, lo_open=True)  # lowest mean intensity
    bright_fraction: float = _range(0.0, 1.0, lo_open=True)  # highest mean intensity
    low_contrast_fraction: float = _range(0.0, 1.0, lo_open=True)  # lowest grey-level std
    high_saturation_fraction: float = _range(0.0, 1.0, lo_open=True)  # highest mean saturation
    # A pixel is background (glass) when its HSV saturation is below this (PCAM's 0.07 rule).
    background_saturation: float = _range(0.0, 1.0)
    max_tissue_fraction: float = _range(0.0, 1.0)  # "mostly background": tissue below this
    min_size: int = _range(1)  # smaller slices are reported as too small, not scored
    min_per_class: int = _range(1)  # ROC-AUC/sensitivity/specificity need both classes
    max_f2_gap: float = _range(0.0, 1.0)  # warn when a slice's F2 is this far below global
    bootstrap_resamples: int = _range(2)
    gallery_size: int = _range(1)  # tiles per error gallery


@dataclass(frozen=True)
class BenchmarkParams:
    # quick: fp32, eager, what every `dvc repro` on 2 cores can afford; full: adds bf16 where
    # supported, torch.compile, every training batch size and more repeats.
    profile: Literal["quick", "full"]
    batch_sizes: tuple[int, ...]  # inference
    train_batch_sizes: tuple[int, ...]
    warmup: int = _range(0)
    repeats: int = _range(1)
    threads: int = _range(1)
    loader_patches: int = _range(1)  # patches per data-delivery measurement
    loader_workers: int = _range(1)  # DataLoader workers for the naive per-index pattern
    train_loop_patches: int = _range(1)  # patches for one epoch of the real training loop


@dataclass(frozen=True)
class DriftParams:
    # Train patches (evenly spaced, after exclusions) whose colour/stain features compute-stats
    # keeps in data/drift_reference.json: what `python -m pcam.drift` compares new patches with.
    reference_patches: int = _range(100)
    bins: int = _range(2, 100)  # PSI bins: quantiles of the reference
    # Flag a colour/stain feature whose mean on the new patches lies more than this many
    # training standard deviations from the training mean.
    feature_shift_max: float = _range(0.0, lo_open=True)
    # Flag the model's probabilities on the new patches (against valid's) above these population
    # stability index / KS statistic. PSI convention: < 0.1 stable, 0.1-0.25 moderate, > 0.25 major.
    prediction_psi_max: float = _range(0.0, lo_open=True)
    prediction_ks_max: float = _range(0.0, 1.0, lo_open=True)
    min_patches: int = _range(1)  # fewer new patches: refused (the statistics would be noise)


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


THRESHOLD_RULES = ("f2", "f1", "youden")
_SENSITIVITY_RULE = re.compile(r"^sensitivity@(0(\.\d+)?|1(\.0+)?)$")


def _check_threshold(value: str | float) -> str | None:
    """Return an error message for an invalid evaluate.threshold, else None."""
    if isinstance(value, float):
        return None if 0.0 <= value <= 1.0 else "must be within [0, 1]"
    if value in THRESHOLD_RULES or _SENSITIVITY_RULE.match(value):
        return None
    return f"must be one of {', '.join(THRESHOLD_RULES)}, sensitivity@<0..1> or a number in [0, 1]"


def _check_checksums(value: str) -> str | None:
    if value == "official" or value.endswith(".json"):
        return None
    return "must be 'official' or the path of a .json file {file name: md5}"


# Extra checks that do not fit a type + range, by dotted key.
_CUSTOM_CHECKS = {"evaluate.threshold": _check_threshold, "data.pcam.checksums": _check_checksums}


def _check_positive_fraction_range(v: ValidateParams) -> str | None:
    if v.min_positive_fraction > v.max_positive_fraction:
        return (
            f"validate.min_positive_fraction = {v.min_positive_fraction} is above "
            f"validate.max_positive_fraction = {v.max_positive_fraction}"
        )
    return None


# Checks between keys of one section, run once the section is built.
_SECTION_CHECKS = {ValidateParams: _check_positive_fraction_range}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`; people write `1e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
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
        raise ParamsError(_yaml_error_line(path, err)) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    finally:
        loader.dispose()


def _yaml_error_line(path: Path, err: yaml.MarkedYAMLError) -> str:
    """`file:line:column: not valid YAML: cause (while ... at line N)` from PyYAML's marks."""
    mark = err.problem_mark or err.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    cause = " ".join((err.problem or "syntax error").split())
    if err.context:
        started = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
        cause += f" ({' '.join(err.context.split())}{started})"
    return f"{where}: not valid YAML: {cause}"


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
        key = prefix + str(key_node.value)
        line = key_node.start_mark.line + 1
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
    raw = read_yaml(path)
    return _build(Params, raw, "", Path(path))


def _build(cls: type, raw: Any, prefix: str, path: Path) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
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
        key = prefix + f.name
        if f.name not in raw:
            raise ParamsError(f"{path}: missing key '{key}'")
        if raw[f.name] == [] and f.metadata.get("may_be_empty"):
            values[f.name] = ()
        else:
            values[f.name] = _convert(hints[f.name], raw[f.name], key, path)
        _check_range(f, values[f.name], key, path)
        check = _CUSTOM_CHECKS.get(key)
        if check and (msg := check(values[f.name])):
            raise ParamsError(f"{path}: {key} = {_show(raw[f.name])} {msg}")
    built = cls(**values)
    check = _SECTION_CHECKS.get(cls)
    if check and (msg := check(built)):
        raise ParamsError(f"{path}: {msg}")
    return built


def _convert(tp: Any, value: Any, key: str, path: Path) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ParamsError(f"{path}: {key} = {_show(value)} is not one of {list(choices)}{hint}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise ParamsError(f"{path}: {key} = {_show(value)} must be a non-empty list")
        return tuple(_convert(item_tp, v, f"{key}[{i}]", path) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):  # first type that accepts the value wins
            try:
                return _convert(option, value, key, path)
            except ParamsError:
                continue
        raise ParamsError(f"{path}: {key} = {_show(value)} must be one of {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{path}: {key} = {_show(value)} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{path}: {key} = {_show(value)} must be an integer")
        return value
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ParamsError(f"{path}: {key} = {_show(value)} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{path}: {key} = {_show(value)} must be a non-empty string")
        return value
    raise TypeError(f"params.py cannot handle type {tp} of {key}")  # a bug in this module


def _check_range(f: dataclasses.Field, value: Any, key: str, path: Path) -> None:
    lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
    if lo is not None and (value <= lo if f.metadata.get("lo_open") else value < lo):
        op = ">" if f.metadata.get("lo_open") else ">="
        raise ParamsError(f"{path}: {key} = {value} out of range: must be {op} {lo}")
    if hi is not None and value > hi:
        raise ParamsError(f"{path}: {key} = {value} out of range: must be <= {hi}")


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
    return _plain(dataclasses.asdict(params))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
