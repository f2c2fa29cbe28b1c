"""Run a stage script and record which params it reads: `python -m tests.params_reads SCRIPT OUT`.

`pcam.params.load_params` is replaced by one whose result records, in a set, the dotted key of
every leaf field read on it (`params.train.lr` -> "train.lr"), whatever reads it: the stage, the
library, `dataclasses.replace` or `to_dict`. A copy made by `dataclasses.replace` records nothing
itself: making it read each field it kept from params.yaml; the others are no longer params.yaml's.
The script then runs as `python SCRIPT` would; the sorted keys go to OUT (JSON) when it ends.
"""

from __future__ import annotations

import pcam  # noqa: F401  (first: the CPU numerics are pinned as in a stage)

# isort: split
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pcam.params

_RECORD = "_params_reads"  # (reads, prefix) on the instances that record; absent on copies


def _recording_getattribute(self, name: str):
    value = object.__getattribute__(self, name)
    record = object.__getattribute__(self, "__dict__").get(_RECORD)
    if record and name in type(self).__dataclass_fields__ and not dataclasses.is_dataclass(value):
        reads, prefix = record
        reads.add(prefix + name)
    return value


def recording(params, reads: set[str], prefix: str = ""):
    """A copy of the frozen dataclass tree `params` that adds each leaf read to `reads`."""
    cls = type(params)
    # A subclass, so isinstance, dataclasses.fields/replace/asdict work as on the original.
    sub = type(cls.__name__, (cls,), {"__getattribute__": _recording_getattribute})
    values = {
        f.name: (recording(v, reads, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else v)
        for f in dataclasses.fields(params)
        for v in [object.__getattribute__(params, f.name)]
    }
    copy = sub(**values)
    object.__setattr__(copy, _RECORD, (reads, prefix))
    return copy


def main(script: str, out: str) -> None:
    reads: set[str] = set()
    load = pcam.params.load_params
    pcam.params.load_params = lambda *a, **k: recording(load(*a, **k), reads)
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        Path(out).write_text(json.dumps(sorted(reads), indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
