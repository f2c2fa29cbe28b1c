"""pcam: a reproducible PatchCamelyon pipeline. Stage scripts in stages/ call into this package."""

__version__ = "0.1.0"
