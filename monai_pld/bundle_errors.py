"""Readable errors for ``python -m monai.bundle run``: the project's own message is the last thing printed.

MONAI evaluates every ``$`` expression of a bundle inside ``ConfigExpression.evaluate``, which re-raises any error
as ``RuntimeError: Failed to evaluate ConfigExpression`` followed by the whole expression. A bad value (a
:class:`~monai_pld.utils.ConfigError` raised by the checks the bundles run first) would then end a traceback of
~70 lines with MONAI's wrapper instead of the message that names the key and the fix.

When ``monai_pld`` is imported by the ``monai.bundle`` command line, :func:`install` replaces ``sys.excepthook``:

* a ``ConfigError`` anywhere in the chain prints only its message (``ConfigError: 'ipc' must be ...``), the
  outermost one when there are several; ``MONAI_PLD_TRACEBACK=1`` prints the full traceback before it;
* any other error wrapped by MONAI prints the full traceback as usual, then the innermost error again as the last
  line.

Nothing changes for code that runs bundles in-process (``ConfigWorkflow``) or imports the package elsewhere.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["error_chain", "innermost_error", "install", "running_bundle_cli"]

_MARK = "_monai_pld_bundle_hook"


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors behind it, outermost first: ``__cause__``, or an unsuppressed ``__context__``."""
    chain = [error]
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)
        error = inner


def innermost_error(error: BaseException) -> BaseException:
    """The first error of ``error``'s chain (what MONAI's ``RuntimeError`` wrappers were raised from)."""
    return error_chain(error)[-1]


def running_bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"


def _hook(previous):
    def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        chain = error_chain(error)
        if len(chain) == 1:
            previous(kind, error, tb)
            return
        # the outermost ConfigError names the key (it may wrap the error that revealed the bad value); none can
        # have been raised when monai_pld.utils was never imported
        config_error = getattr(sys.modules.get("monai_pld.utils"), "ConfigError", None)
        bad_value = next((e for e in chain if config_error and isinstance(e, config_error)), None)
        if bad_value is not None and os.environ.get("MONAI_PLD_TRACEBACK", "") in ("", "0"):
            print(f"{type(bad_value).__name__}: {bad_value}", file=sys.stderr)
            return
        previous(kind, error, tb)
        last = bad_value if bad_value is not None else chain[-1]
        print(f"\n{type(last).__name__}: {last}", file=sys.stderr)

    setattr(excepthook, _MARK, True)
    return excepthook


def install(force: bool = False) -> bool:
    """Install the hook when running under the ``monai.bundle`` command line (or with ``force``); idempotent.

    Returns:
        whether the hook is installed.
    """
    if getattr(sys.excepthook, _MARK, False):
        return True
    if not (force or running_bundle_cli()):
        return False
    sys.excepthook = _hook(sys.excepthook)
    return True
