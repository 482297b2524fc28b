"""``distribution.pt``: a learnt parameterisation of the synthetic set (``LatentCodes`` or ``SLFDistribution``).

A dictionary of plain tensors and Python values, loadable with ``torch.load(weights_only=True)``: ``format``,
``parameterization`` (class name), ``hyper_parameters`` (``kind`` and the settings to rebuild it), ``state_dict``,
``num_classes``, ``ipc`` and ``latent_shape``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_pld.parameterizations import LatentCodes, SLFDistribution
from monai_pld.utils import atomic_save_torch

__all__ = ["DISTILLED_FORMAT", "DISTRIBUTION_FILE", "load_distribution", "save_distribution"]

DISTILLED_FORMAT = 1
DISTRIBUTION_FILE = "distribution.pt"


def save_distribution(
    path: str | os.PathLike, parameterization: Any, num_classes: int, latent_shape: Sequence[int]
) -> Path:
    """Write ``parameterization`` (its class, ``hyper_parameters`` and CPU state) atomically to ``path``."""
    ipc = None if parameterization.ipc is None else int(parameterization.ipc)
    state = {k: v.detach().cpu() for k, v in parameterization.state_dict().items()}
    return atomic_save_torch(
        {
            "format": DISTILLED_FORMAT,
            "parameterization": type(parameterization).__name__,
            "hyper_parameters": dict(getattr(parameterization, "hyper_parameters", {}) or {}),
            "state_dict": state,
            "num_classes": int(num_classes),
            "ipc": ipc,
            "latent_shape": list(latent_shape),
        },
        path,
    )


def load_distribution(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the parameterisation saved in a ``distribution.pt`` (safe load: ``weights_only=True``).

    Render it with the generator recorded in the manifest: ``load_distribution(p).render(generator, "sample")``.

    Raises:
        ValueError: naming the file when it is unreadable or not a distilled distribution of a known kind.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a distilled distribution ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != DISTILLED_FORMAT or "state_dict" not in payload:
        raise ValueError(f"{path} is not a monai_pld distribution.pt (format {DISTILLED_FORMAT})")
    hyper = dict(payload.get("hyper_parameters") or {})
    state = payload["state_dict"]
    kind = hyper.pop("kind", None)
    codes, labels, num_classes = state["codes"], state["labels"], int(payload["num_classes"])
    if kind in ("latent", "pixel"):
        param: torch.nn.Module = LatentCodes(codes, labels, num_classes)
    elif kind == "slfd":
        slfd_kwargs = {k: v for k, v in hyper.items() if k not in ("ipc", "init", "seed", "latent_layer")}
        param = SLFDistribution(codes, labels, num_classes, **slfd_kwargs)
    else:
        raise ValueError(f"{path}: unknown parameterisation kind {kind!r}")
    param.load_state_dict(state)
    param.hyper_parameters = {"kind": kind, **hyper}
    return param
