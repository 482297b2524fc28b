"""Checkpoints of a run folder: written atomically, resumed from the newest, with a clear error for an unusable or
foreign file."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from monai_pld import distributed

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["AtomicCheckpointSaver", "CheckpointError", "ResumeFromCheckpoint", "RunSettings", "latest_checkpoint"]

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


class RunSettings:
    """The settings a run's result depends on, saved in every checkpoint (key ``"run"``) so that a resume can check
    that the checkpoint is this run's: a seed sweep or another dataset written into the same folder is refused
    instead of silently continued. Learning rates and speed options are left out on purpose: resuming with a
    smaller learning rate is the remedy for a diverging run.

    Args:
        settings: JSON-serialisable values (nested dicts allowed).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = json.loads(json.dumps(settings, default=str))  # tuples -> lists, as they come back

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: :class:`ResumeFromCheckpoint` compares the settings before the run starts."""

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """``"key: checkpoint value (this run: value)"`` for every setting that differs (dotted keys)."""
        ours, theirs = _flatten(self.settings), _flatten(saved)
        return [
            f"{key} {theirs.get(key, 'absent')} (this run: {ours.get(key, 'absent')})"
            for key in sorted(set(ours) | set(theirs))
            if ours.get(key) != theirs.get(key)
        ]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` made safe against a crash while it writes.

    * Every file is written to a temporary file in the same folder and then renamed (ignite's ``DiskSaver`` with
      ``atomic=True``), so a checkpoint that exists is whole. MONAI's own saver writes in place.
    * ``n_saved`` (default 2) periodic files are kept: ignite deletes the oldest *before* writing the next, so with
      one a kill during the write would leave none.
    * The checkpoint written when an exception stops the run is skipped when no iteration finished in this run:
      then there is nothing new to keep, and the objects may hold a half-loaded checkpoint (a failed resume), which
      must not replace the good file it came from.

    Args:
        save_dir, save_dict, save_final, save_interval: as for ``CheckpointSaver`` (iteration level).
        n_saved: periodic checkpoints kept (at least 2).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict[str, Any],
        save_final: bool = True,
        save_interval: int = 0,
        n_saved: int = 2,
    ) -> None:
        if n_saved < 2:
            raise ValueError(
                f"'n_saved' must be at least 2 (the previous file is kept while the next is written), got {n_saved}"
            )
        super().__init__(
            save_dir=save_dir, save_dict=save_dict, save_final=save_final, save_interval=save_interval, n_saved=n_saved
        )
        for checkpoint in (self._final_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = DiskSaver(save_dir, require_empty=False, atomic=True)
        self._progressed = False

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._mark_progress)

    def _mark_progress(self, engine: Engine) -> None:
        self._progressed = True

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if not self._progressed:
            raise e
        super().exception_raised(engine, e)


class ResumeFromCheckpoint:
    """Load the newest checkpoint of ``checkpoint_dir`` into ``load_dict`` when the engine starts.

    A thin layer over MONAI's ``CheckpointLoader`` that finds the file and checks it first, so a corrupted or
    truncated checkpoint gives a message naming the file and the fix instead of a pickle traceback.

    An optimiser's state comes back from the checkpoint (Adam's moments, the step count), but its learning rates
    stay those of the resuming run: ``load_state_dict`` would otherwise bring back the checkpoint's rates, so a run
    resumed with a smaller ``lr_codes``/``lr_network`` (the remedy for a diverging one), or with ``auto`` rates that
    changed with ``iterations``, would silently keep the old ones. A change is logged as a warning.

    Before anything runs, the checkpoint is checked against this run: its :class:`RunSettings` (key ``"run"``,
    when both have one), the names and shapes of every module's tensors, the optimiser's kind and parameter groups,
    and its iteration against this run's length. A mismatch is a :class:`CheckpointError` naming the settings.

    With ``enabled=False`` (``--resume false``) a folder that already holds checkpoints has them moved into a
    subfolder ``earlier_<UTC time>``: the new run starts its own series, and a later ``--resume true`` cannot pick
    up the earlier run's files.

    Args:
        checkpoint_dir: the run's ``checkpoints`` folder.
        load_dict: objects to restore, as given to ``CheckpointSaver``.
        enabled: ``False``: start anew (the bundle's ``resume`` key).
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
            self._move_earlier_checkpoints()
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
        # "run" is optional: checkpoints written before it existed carry no settings to compare
        required = set(self.load_dict) - {"run"}
        missing = sorted(required - set(checkpoint) if isinstance(checkpoint, dict) else required)
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks {missing}; it was written by a different configuration. "
                "Use the same configuration to resume, or run with --resume false."
            )
        problems = self._mismatches(checkpoint, engine)
        if problems:
            raise CheckpointError(
                f"checkpoint {path} was written by a different run: {'; '.join(problems)}. Resume with the "
                "checkpoint's settings, or run with --resume false to start anew (the earlier checkpoints are then "
                "moved aside, not deleted)."
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

    def _mismatches(self, checkpoint: dict[str, Any], engine: Engine) -> list[str]:
        problems: list[str] = []
        settings = self.load_dict.get("run")
        if isinstance(settings, RunSettings) and isinstance(checkpoint.get("run"), dict):
            problems += settings.differences(checkpoint["run"])
        for key, obj in self.load_dict.items():
            saved = checkpoint.get(key)
            if isinstance(obj, torch.nn.Module) and isinstance(saved, dict):
                ours = obj.state_dict()
                for name in sorted(set(ours) | set(saved)):
                    if name not in ours or name not in saved:
                        where = "checkpoint" if name in saved else "run"
                        problems.append(f"{key}.{name} only in the {where}")
                    elif tuple(ours[name].shape) != tuple(saved[name].shape):
                        problems.append(
                            f"{key}.{name} is {tuple(saved[name].shape)} there, {tuple(ours[name].shape)} here"
                        )
            elif isinstance(obj, torch.optim.Optimizer) and isinstance(saved, dict):
                ours_groups = obj.state_dict()["param_groups"]
                saved_groups = saved.get("param_groups", [])
                if [len(g["params"]) for g in ours_groups] != [len(g["params"]) for g in saved_groups]:
                    problems.append(f"{key} has other parameter groups")
                elif ours_groups and set(ours_groups[0]) != set(saved_groups[0]):
                    problems.append(
                        f"{key} is another optimiser (settings {sorted(set(saved_groups[0]) - {'params'})})"
                    )
        state = checkpoint.get("trainer")
        if isinstance(state, dict) and engine.state.max_epochs is not None:
            done = int(state.get("iteration", 0))
            length = engine.state.max_epochs * (engine.state.epoch_length or 1)
            if done > length:
                problems.append(f"it is at iteration {done}, beyond this run's {length} (set 'iterations' >= {done})")
        return problems

    def _move_earlier_checkpoints(self) -> None:
        """``--resume false`` in a folder with checkpoints: move them aside (rank 0 only), keeping them."""
        found = sorted(self.checkpoint_dir.glob("*.pt")) if self.checkpoint_dir.is_dir() else []
        if not found or not distributed.is_main():
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        aside = self.checkpoint_dir / f"earlier_{stamp}"
        aside.mkdir()
        for path in found:
            path.replace(aside / path.name)
        self.logger.warning(
            f"--resume false: {len(found)} checkpoint(s) of an earlier run moved to {aside}; this run starts anew"
        )

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
