"""Periodic progress lines (iteration, losses, seconds per iteration, ETA) for long runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from ignite.engine import Engine, Events

from monai_pld.utils import format_duration

__all__ = ["ProgressLogger", "format_duration"]


class ProgressLogger:
    """Log ``iteration i/N``, the scalar outputs, s/it and the ETA every ``interval`` iterations.

    MONAI's ``StatsHandler`` prints losses but no throughput or remaining time, which is what a user watching a
    half-hour CPU run needs. The rate is measured since the run (or the resumed part of it) started.

    Args:
        interval: iterations between lines; the last iteration is always logged.
        name: logger name (the bundle's ``logging.conf`` prints ``INFO`` of every logger).
        prefix: word at the start of each line, e.g. ``distillation`` or ``generator``.
    """

    def __init__(self, interval: int = 50, name: str = "monai_pld", prefix: str = "iteration") -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.logger = logging.getLogger(name)
        self.prefix = prefix
        self._start_time = 0.0
        self._start_iteration = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self._start_time = time.perf_counter()
        self._start_iteration = engine.state.iteration
        total = self._total(engine)
        rates = self._learning_rates(engine)
        if self._start_iteration:
            self.logger.info(f"{self.prefix}: resuming at {self._start_iteration}/{total}{rates}")
        else:
            self.logger.info(f"{self.prefix}: starting, {total} iterations{rates}")

    @staticmethod
    def _learning_rates(engine: Engine) -> str:
        """``; Adam learning rates: codes 0.03, network 0.001`` for an engine with an ``optimizer`` whose groups
        are named (the distillation trainer's), so that what ``auto`` resolved to is on screen; else ``""``."""
        optimizer = getattr(engine, "optimizer", None)
        groups = [g for g in getattr(optimizer, "param_groups", []) if "name" in g]
        if not groups:
            return ""
        rates = ", ".join(f"{g['name']} {g['lr']:g}" for g in groups)
        return f"; {type(optimizer).__name__} learning rates: {rates}"

    def iteration_completed(self, engine: Engine) -> None:
        it, total = engine.state.iteration, self._total(engine)
        if it % self.interval and it != total:
            return
        done = it - self._start_iteration
        rate = (time.perf_counter() - self._start_time) / max(done, 1)
        output = engine.state.output
        if isinstance(output, list) and output and isinstance(output[0], Mapping):
            output = output[0]  # MONAI's decollated form: the scalars are repeated in every element
        values = ""
        if isinstance(output, Mapping):
            values = " ".join(f"{k} {float(v):.4g}" for k, v in output.items() if isinstance(v, (int, float)))
        self.logger.info(
            f"{self.prefix} {it}/{total} {values} | {rate:.3f} s/it | ETA {format_duration(rate * (total - it))}"
        )
        engine.state.seconds_per_iteration = rate

    def completed(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self._start_time
        self.logger.info(f"{self.prefix}: finished {engine.state.iteration} iterations in {format_duration(elapsed)}")

    @staticmethod
    def _total(engine: Engine) -> int:
        return int(engine.state.max_epochs or 0) * int(engine.state.epoch_length or 0)
