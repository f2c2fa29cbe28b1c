"""pcam: a reproducible PatchCamelyon pipeline. Stage scripts in stages/ call into this package.

Importing pcam pins the CPU numerics (pcam/numerics.py) before numpy or torch load, so stage
scripts import pcam before anything else; under DVC it also ties the stage's life to dvc's.
"""

import os

from pcam import numerics as _numerics

_numerics.pin_environment()

__version__ = "0.1.0"

# Imported in every run, so that a stage's provenance (the md5 of each pcam module it loaded) is
# the same under dvc and run by hand.
from pcam import lifetime as _lifetime  # noqa: E402

if os.environ.get("DVC_STAGE"):  # run by `dvc repro`/`dvc exp run`: end when dvc ends
    _lifetime.die_with_dvc()
