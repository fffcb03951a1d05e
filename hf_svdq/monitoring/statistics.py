"""Per-step statistics of a watched layer's output and the alarm rule over them: pure tensor code.

A statistic maps the output at the newest position, ``[batch, features]``, to one number per row.
:class:`AlarmState` turns a stream of such numbers (``[batch, modules]`` per generated token) into a
latched alarm per row: the newest value's z-score against the row's own earlier values (those
not past the threshold), past a threshold for ``patience`` consecutive steps once ``warmup`` steps have been seen. The same code runs
inside :class:`~hf_svdq.monitoring.pillar_monitor.PillarMonitor` and when a recorded trace is replayed
offline (``benchmarks/pillar_monitor.py``), so a rule chosen offline behaves identically online.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DIRECTIONS = ("up", "down", "both")


def activation_rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row: ``[batch, features] -> [batch]``."""
    return x.float().pow(2).mean(-1).sqrt()


def activation_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's energy distribution ``x_i^2 / sum x^2``, divided by ``log(features)``:
    1.0 when the energy is spread evenly over the features, near 0 when one feature holds it."""
    energy = x.float().pow(2)
    p = energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)
    return -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(max(x.shape[-1], 2))


def logits_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution of each row, ``[batch, vocab] -> [batch]``."""
    logp = torch.log_softmax(scores.float(), -1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rms": activation_rms,
    "entropy": activation_entropy,
}
"""The layer statistics a monitor can watch, by name."""


@dataclass(frozen=True)
class AlarmRule:
    """When a watched statistic counts as the onset of a loop.

    * ``threshold``: z-score of the newest value against the mean and standard deviation of the row's
      earlier values (the first value is the prompt's last position).
    * ``direction``: ``"up"`` (a rise alarms), ``"down"`` or ``"both"`` (the absolute z-score).
    * ``warmup``: values seen before any alarm (the running statistics need a few).
    * ``patience``: consecutive steps past the threshold that raise the alarm.
    * ``min_std``: the deviation is floored at ``min_std * |mean|`` so a flat history cannot blow up.

    With several watched modules the row's score is the largest z-score among them. The defaults are a
    starting point, not a measured detector: on SmolLM2 no rule over layer statistics beat the token
    loop detector (README, "Runtime pillar monitoring").
    """

    threshold: float = 4.0
    direction: str = "up"
    warmup: int = 8
    patience: int = 2
    min_std: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or self.threshold <= 0:
            raise ValueError(f"AlarmRule.threshold must be a positive number, got {self.threshold!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"AlarmRule.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("warmup", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AlarmRule.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.min_std, (int, float)) or isinstance(self.min_std, bool) or self.min_std < 0:
            raise ValueError(f"AlarmRule.min_std must be a number >= 0, got {self.min_std!r}")


class AlarmState:
    """Running statistics of one batch under an :class:`AlarmRule` (Welford's update, float64)."""

    def __init__(self, rule: AlarmRule, batch: int, modules: int) -> None:
        self.rule = rule
        self.count = 0  # steps seen
        self.seen = torch.zeros(batch, dtype=torch.float64)  # values in each row's baseline
        self.mean = torch.zeros(batch, modules, dtype=torch.float64)
        self.m2 = torch.zeros(batch, modules, dtype=torch.float64)
        self.streak = torch.zeros(batch, dtype=torch.long)
        self.alarm = torch.zeros(batch, dtype=torch.bool)

    def update(self, values: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Take one step's ``[batch, modules]`` values; return the rows' scores and latched alarms.

        ``active`` (``[batch]`` bool) freezes the rows that are no longer generating (their alarm and
        statistics stay as they were).
        """
        x = values.double()
        if active is None:
            active = torch.ones(x.shape[0], dtype=torch.bool)
        score = torch.zeros(x.shape[0], dtype=torch.float64)
        if self.count >= 1:
            std = (self.m2 / (self.seen - 1).clamp_min(1)[:, None]).sqrt()
            std = torch.maximum(std, self.rule.min_std * self.mean.abs()).clamp_min(1e-12)
            z = (x - self.mean) / std
            if self.rule.direction == "down":
                z = -z
            elif self.rule.direction == "both":
                z = z.abs()
            score = z.max(-1).values
        over = torch.zeros_like(active)
        if self.count >= self.rule.warmup:
            over = (score > self.rule.threshold) & active
            self.streak = torch.where(over, self.streak + 1, torch.where(active, 0, self.streak))
            self.alarm |= self.streak >= self.rule.patience
        # Welford's update, for the rows still generating whose value is not past the threshold (an
        # outlier must not widen the baseline it is judged against, or patience > 1 could never fire)
        keep = active & ~over
        n = self.seen + keep.double()
        delta = x - self.mean
        mean = self.mean + delta / n.clamp_min(1)[:, None]
        m2 = self.m2 + delta * (x - mean)
        self.mean = torch.where(keep[:, None], mean, self.mean)
        self.m2 = torch.where(keep[:, None], m2, self.m2)
        self.seen = n
        self.count += 1
        return score, self.alarm.clone()


def replay(values: torch.Tensor, rule: AlarmRule, active: torch.Tensor | None = None) -> torch.Tensor:
    """The first alarm step of each row of a recorded ``[steps, batch, modules]`` trace (``-1``: none)."""
    steps, batch, modules = values.shape
    state = AlarmState(rule, batch, modules)
    first = torch.full((batch,), -1, dtype=torch.long)
    for t in range(steps):
        _, alarm = state.update(values[t], None if active is None else active[t])
        first = torch.where(alarm & (first < 0), t, first)
    return first
