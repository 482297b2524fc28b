"""monai_pld: dataset distillation with probabilistic latent features, as a MONAI plugin."""

__version__ = "0.1.0"
