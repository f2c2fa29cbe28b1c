"""pcam: a reproducible PatchCamelyon pipeline. Stage scripts in stages/ call into this package.

Importing pcam pins the CPU numerics (pcam/numerics.py) before numpy or torch load: stage scripts
import pcam before anything else.
"""

from pcam import numerics as _numerics

_numerics.pin_environment()

__version__ = "0.1.0"
