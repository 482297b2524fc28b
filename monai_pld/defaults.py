"""Default optimisation settings per parameterisation space and matcher, chosen on validation splits.

One Adam step of the same learning rate moves an image by very different amounts in pixel space, in a generator's
bottleneck latent and in an intermediate decoder feature map, so every space has its own learning rate (GLaD tunes
each space separately for the same reason). The values below are those chosen by
``benchmarks/select_learning_rates.py`` on the validation splits of RetinaMNIST and Fashion-MNIST (never a test
split); its output is committed as ``docs/tuning/learning_rates.json`` and a test checks that this table matches it.

One image per class is its own regime: with a single slot per class, SLFD's best step in a decoder feature map was
smaller than at ten (0.01 against 0.03) on both validation splits, while the deterministic codes disagreed between
them and keep the many-image value. ``IPC1_LEARNING_RATES`` holds the values chosen at IPC 1; there SLFD's network
keeps ``UNSELECTED_NETWORK_RATE``, the rate that selection ran with.

SLFD's network rate also depends on the length of the run: the more steps, the further a given rate carries the
slots' means and spread from their start. Its selection therefore ran per distillation budget (DM iterations), and
``lr_network: auto`` takes the rate selected at the largest budget not above the run's ``iterations`` (the smallest
budget's for shorter runs); see ``NETWORK_RATES_BY_ITERATIONS``.
"""

from __future__ import annotations

__all__ = [
    "OPTIMIZERS",
    "SPACES",
    "DEFAULT_LEARNING_RATES",
    "IPC1_LEARNING_RATES",
    "UNSELECTED_NETWORK_RATE",
    "SELECTION_ITERATIONS",
    "NETWORK_RATES_BY_ITERATIONS",
    "network_rate",
    "latent_space",
    "default_learning_rates",
]

OPTIMIZERS = ("adam", "sgd")
SPACES = ("pixel", "latent", "feature")

# space -> lr_codes for Adam. DC and MTT take DM's values: only DM was selected on this CPU.
_CODES_BY_SPACE: dict[str, float] = {"pixel": 0.01, "latent": 0.1, "feature": 0.03}
# SLFD's network rate wherever no selection chose one: DC, MTT, the bottleneck and IPC 1, whose tables and
# selections ran with it (RetinaMNIST's DC validation split showed no winner between it and 0.01).
UNSELECTED_NETWORK_RATE = 0.001
# The distillation budget (DM iterations) at which every table here was selected, unless it says otherwise.
SELECTION_ITERATIONS = 200
# (space, matcher) -> {iterations: lr_network} where SLFD's network rate was selected, one selection per budget. At
# 200 iterations 0.001 barely moves the network, so the slots' means and spread stay near their start, while 0.01 was
# better on both validation splits (0.03 let the variance run away to its clamp). At 600 iterations 0.01 has moved the
# means three times as far, and 0.001 was ahead on the validation splits.
NETWORK_RATES_BY_ITERATIONS: dict[tuple[str, str], dict[int, float]] = {("feature", "dm"): {200: 0.01, 600: 0.001}}
# (space, matcher) -> (lr_codes, lr_network) at SELECTION_ITERATIONS
DEFAULT_LEARNING_RATES: dict[tuple[str, str], tuple[float, float]] = {
    (space, matcher): (
        codes,
        NETWORK_RATES_BY_ITERATIONS.get((space, matcher), {}).get(SELECTION_ITERATIONS, UNSELECTED_NETWORK_RATE),
    )
    for space, codes in _CODES_BY_SPACE.items()
    for matcher in ("dm", "dc", "mtt")
}


# (parameterization, space, matcher) -> lr_codes at IPC 1, where the selection at IPC 1 differs from the table above
# (selected under DM; DC and MTT take DM's value, as in the table above)
IPC1_LEARNING_RATES: dict[tuple[str, str, str], float] = {
    ("slfd", "feature", matcher): 0.01 for matcher in ("dm", "dc", "mtt")
}


def latent_space(parameterization: str, latent_layer: int = 0) -> str:
    """``pixel`` for pixel distillation, ``latent`` for the generator's bottleneck, ``feature`` for an intermediate
    decoder feature map (``latent_layer > 0``)."""
    if parameterization == "pixel":
        return "pixel"
    return "feature" if latent_layer else "latent"


def network_rate(space: str, matcher: str, iterations: int | None = None) -> float:
    """SLFD's network rate selected for ``space`` and ``matcher`` at the largest budget not above ``iterations``
    (the smallest selected budget for shorter runs; ``None``: ``SELECTION_ITERATIONS``), or
    ``UNSELECTED_NETWORK_RATE`` where no selection ran."""
    by_budget = NETWORK_RATES_BY_ITERATIONS.get((space, matcher))
    if not by_budget:
        return UNSELECTED_NETWORK_RATE
    iterations = SELECTION_ITERATIONS if iterations is None else int(iterations)
    budgets = sorted(by_budget)
    return by_budget[max((b for b in budgets if b <= iterations), default=budgets[0])]


def default_learning_rates(
    parameterization: str, matcher: str, latent_layer: int = 0, ipc: int | None = None, iterations: int | None = None
) -> tuple[float, float]:
    """``(lr_codes, lr_network)`` that ``lr_codes: auto`` / ``lr_network: auto`` resolve to; ``ipc`` 1 takes the
    IPC 1 selection where there is one, and the network rate it was selected with (``None``: the many-image
    table); ``iterations`` picks the network rate of the run's budget (:func:`network_rate`; ``None``:
    ``SELECTION_ITERATIONS``)."""
    space = latent_space(parameterization, latent_layer)
    lr_codes = DEFAULT_LEARNING_RATES[(space, matcher)][0]
    lr_network = network_rate(space, matcher, iterations)
    if ipc == 1:
        lr_codes = IPC1_LEARNING_RATES.get((parameterization, space, matcher), lr_codes)
        lr_network = UNSELECTED_NETWORK_RATE  # the rate the IPC 1 selection ran with
    return lr_codes, lr_network
