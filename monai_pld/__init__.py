"""monai_pld: dataset distillation with probabilistic latent features, as a MONAI plugin."""

from monai_pld import bundle_errors as _bundle_errors

__version__ = "0.1.0"

# under `python -m monai.bundle run`, a bad bundle value ends with the project's message, not MONAI's wrapper
_bundle_errors.install()
