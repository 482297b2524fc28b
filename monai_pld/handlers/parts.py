"""Handlers that draw or export the distilled set read the run's parts from the engine they are attached to."""

from __future__ import annotations

from typing import Any

__all__ = ["take_run_parts"]


def take_run_parts(handler: Any, engine: Any, names: tuple[str, ...] = ("parameterization", "generator")) -> None:
    """Fill each of ``names`` that ``handler`` was not given (``None``) from the attribute of that name on
    ``engine`` (a :class:`~monai_pld.engines.DistillationTrainer` keeps its parameterisation, generator and
    matcher), so that a handler can be configured before the trainer that builds those parts exists."""
    for name in names:
        if getattr(handler, name, None) is None:
            part = getattr(engine, name, None)
            if part is None and name != "matcher":
                raise ValueError(
                    f"{type(handler).__name__} was given no {name} and the engine it is attached to has none"
                )
            setattr(handler, name, part)
