"""Resume from the newest checkpoint of a run folder, with a clear error for an unusable file."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ResumeFromCheckpoint", "latest_checkpoint", "CheckpointError"]

_NUMBER = re.compile(r"=(\d+)\.pt$")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used."""


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest iteration number in ``checkpoint_dir`` (``None`` if there is none).

    ``CheckpointSaver`` names files ``..._epoch=N.pt`` during a run and ``..._final_iteration=N.pt`` at the end or
    on an exception; with one iteration per epoch both numbers count iterations. A final file wins a tie.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("*.pt"):
        match = _NUMBER.search(path.name)
        if match:
            found.append((int(match.group(1)), "final" in path.name, path))
    return max(found)[2] if found else None


class ResumeFromCheckpoint:
    """Load the newest checkpoint of ``checkpoint_dir`` into ``load_dict`` when the engine starts.

    A thin layer over MONAI's ``CheckpointLoader`` that finds the file and checks it first, so a corrupted or
    truncated checkpoint gives a message naming the file and the fix instead of a pickle traceback.

    An optimiser's state comes back from the checkpoint (Adam's moments, the step count), but its learning rates
    stay those of the resuming run: ``load_state_dict`` would otherwise bring back the checkpoint's rates, so a run
    resumed with a smaller ``lr_codes``/``lr_network`` (the remedy for a diverging one), or with ``auto`` rates that
    changed with ``iterations``, would silently keep the old ones. A change is logged as a warning.

    Args:
        checkpoint_dir: the run's ``checkpoints`` folder.
        load_dict: objects to restore, as given to ``CheckpointSaver``.
        enabled: ``False`` makes the handler do nothing (the bundle's ``resume`` key).
        map_location: device for loaded tensors.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: dict[str, Any],
        enabled: bool = True,
        map_location: str | torch.device | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.load_dict = load_dict
        self.enabled = enabled
        self.map_location = map_location
        self.logger = logging.getLogger("monai_pld")
        self.loaded_path: Path | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            self.logger.warning(f"resume requested but {self.checkpoint_dir} holds no checkpoint: starting anew")
            return
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(e).__name__}: {_first_line(e)}); it is corrupted or "
                "truncated. Delete it to resume from the previous one, or run with --resume false to start anew."
            ) from e
        missing = sorted(set(self.load_dict) - set(checkpoint) if isinstance(checkpoint, dict) else self.load_dict)
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks {missing}; it was written by a different configuration. "
                "Use the same configuration to resume, or run with --resume false."
            )
        self.loaded_path = path
        self.logger.info(f"resuming from {path}")
        configured = {
            key: [group["lr"] for group in obj.param_groups]
            for key, obj in self.load_dict.items()
            if isinstance(obj, torch.optim.Optimizer)
        }
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location).attach(engine)
        engine.add_event_handler(Events.STARTED, self._keep_learning_rates, configured)  # after the loader's

    def _keep_learning_rates(self, engine: Engine, configured: dict[str, list[float]]) -> None:
        for key, rates in configured.items():
            groups = self.load_dict[key].param_groups
            changes = [
                f"{group.get('name', i)} {group['lr']:g} -> {lr:g}"
                for i, (group, lr) in enumerate(zip(groups, rates, strict=True))
                if group["lr"] != lr
            ]
            for group, lr in zip(groups, rates, strict=True):
                group["lr"] = lr
            if changes:
                self.logger.warning(
                    f"resuming with this run's learning rates, not the checkpoint's: {', '.join(changes)}"
                )
