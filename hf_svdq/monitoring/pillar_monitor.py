"""Watch chosen layers during stock ``generate()``; raise an alarm at a loop's onset; optionally intervene.

:class:`PillarMonitor` is a ``LogitsProcessor`` (it returns the scores unchanged) plus forward hooks:
the hooks read the newest position of each watched module's output, ``__call__`` turns one step's
values into a per-row alarm (:class:`~hf_svdq.monitoring.statistics.AlarmRule`) and tracks the
token loop detector on the generated ids. With ``intervention="noise"`` the watched modules' outputs
of an alarmed row get Gaussian noise (``noise_scale`` times the output's RMS) from the next step on:
the study's local intervention, in the watched layers only, instead of a global penalty.

    with PillarMonitor.from_policy(model, "policy.json") as monitor:
        model.generate(**inputs, logits_processor=[monitor])
    monitor.summary()   # per row: first alarm step, step the loop became visible, lead

Works on any causal LM, compressed or dense, at any batch size (left padding, as ``generate`` needs).
A new generation is recognised by an empty KV cache (the hooks reset the state themselves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from ..evaluation.degeneration import detect_loop
from .statistics import STATISTICS, AlarmRule, AlarmState, activation_rms, logits_entropy

INTERVENTIONS = (None, "noise")
TRIGGERS = ("statistic", "tokens")


@dataclass
class MonitorTrace:
    """One generation's per-step record, every tensor ``[steps, batch, ...]``.

    Step ``t`` is the forward that produced generated token ``t`` (step 0: the prompt's last position).
    """

    modules: list[str]
    values: torch.Tensor  # [steps, batch, modules]: the statistic of each watched module
    score: torch.Tensor  # [steps, batch]: the largest z-score among the modules
    alarm: torch.Tensor  # [steps, batch] bool, latched
    loop: torch.Tensor  # [steps, batch] bool: the token loop detector sees a loop ending at this token
    logits_entropy: torch.Tensor  # [steps, batch]: entropy of the next-token distribution (nats)
    active: torch.Tensor  # [steps, batch] bool: the row was still generating (no end-of-sequence yet)


def _newest(output: Any) -> torch.Tensor:
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        raise TypeError(f"a watched module must return a [batch, ..., features] tensor, got {type(tensor).__name__}")
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])[:, -1]


class PillarMonitor(LogitsProcessor):
    """Per-step statistics of watched modules, a latched loop-onset alarm per row, optional noise.

    Args:
        model: the model that will generate (hooks are attached now; :meth:`remove` detaches them).
        modules: names of the modules to watch (``model.get_submodule`` names), e.g. a policy's pillars.
        statistic: ``"rms"`` or ``"entropy"`` of the output at the newest position (see ``STATISTICS``).
        rule: when the statistic counts as a loop's onset.
        trigger: what raises the alarm: ``"statistic"`` (the rule over the watched statistic) or
            ``"tokens"`` (the token loop detector; the statistics are still recorded).
        intervention: ``None`` (watch only) or ``"noise"``.
        noise_scale: noise standard deviation relative to the output's RMS (``"noise"`` only).
        seed: seeds the noise; equal seeds give equal generations.
        eos_token_id: ids that end a row (default: the model's generation config); later steps of a
            finished row are not scored.
        loop_max_period, loop_min_repeats, loop_min_span: the token loop detector's settings (see
            ``detect_loop``).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[str],
        *,
        statistic: str = "rms",
        rule: AlarmRule | None = None,
        trigger: str = "statistic",
        intervention: str | None = None,
        noise_scale: float = 1.0,
        seed: int = 0,
        eos_token_id: int | Iterable[int] | None = None,
        loop_max_period: int = 20,
        loop_min_repeats: float = 2.5,
        loop_min_span: int = 6,
    ) -> None:
        if isinstance(modules, str) or not modules:
            raise ValueError("PillarMonitor needs a non-empty list of module names to watch")
        if statistic not in STATISTICS:
            raise ValueError(f"PillarMonitor statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
        if trigger not in TRIGGERS:
            raise ValueError(f"PillarMonitor trigger must be one of {TRIGGERS}, got {trigger!r}")
        if intervention not in INTERVENTIONS:
            raise ValueError(f"PillarMonitor intervention must be one of {INTERVENTIONS}, got {intervention!r}")
        if not isinstance(noise_scale, (int, float)) or isinstance(noise_scale, bool) or noise_scale < 0:
            raise ValueError(f"PillarMonitor noise_scale must be a number >= 0, got {noise_scale!r}")
        self.modules = list(modules)
        self.statistic = statistic
        self.rule = rule if rule is not None else AlarmRule()
        self.trigger = trigger
        self.intervention = intervention
        self.noise_scale = float(noise_scale)
        self.seed = seed
        self.loop_max_period = loop_max_period
        self.loop_min_repeats = loop_min_repeats
        self.loop_min_span = loop_min_span
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_token_ids = torch.tensor(ids, dtype=torch.long)
        self._handles: list[Any] = []
        targets = []
        for name in self.modules:
            try:
                targets.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(f"PillarMonitor: the model has no module named {name!r}") from None
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for index, module in enumerate(targets):
            self._handles.append(module.register_forward_hook(self._make_hook(index)))
        self._new_sequence = True
        self._pending: dict[int, torch.Tensor] = {}
        self.reset()

    @classmethod
    def from_policy(cls, model: nn.Module, policy: str | Path | Mapping[str, Any], **kwargs: Any) -> PillarMonitor:
        """Watch the layers a policy (``hf-svdq analyze``'s ``policy.json``) classified as pillars."""
        from ..integration.peft_lora import pillar_modules

        pillars = pillar_modules(policy)
        if not pillars:
            raise ValueError("the policy classifies no layer as a pillar: pass the modules to watch instead")
        return cls(model, pillars, **kwargs)

    # lifecycle -----------------------------------------------------------------------------------
    def reset(self, batch: int = 0, prompt_len: int = 0) -> None:
        """Forget the current generation (done by itself when a new one starts)."""
        self._state = AlarmState(self.rule, batch, len(self.modules))
        self._prompt_len = prompt_len
        self._generated: list[list[int]] = [[] for _ in range(batch)]
        self._finished = torch.zeros(batch, dtype=torch.bool)
        self._intervene = torch.zeros(batch, dtype=torch.bool)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._records: list[tuple[torch.Tensor, ...]] = []

    def remove(self) -> None:
        """Detach every hook; the model runs exactly as before the monitor existed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PillarMonitor:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # hooks ---------------------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = next((v for v in kwargs.values() if hasattr(v, "get_seq_length")), None)
        if cache is None or int(cache.get_seq_length()) == 0:
            self._new_sequence = True
            self._pending.clear()

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            newest = _newest(output)
            self._pending[index] = STATISTICS[self.statistic](newest.detach()).cpu()
            if self._new_sequence or self.intervention is None or not bool(self._intervene.any()):
                return None
            if self._intervene.shape[0] != newest.shape[0]:
                return None
            rows = self._intervene.to(newest.device)
            rms = activation_rms(newest.detach())[:, None]
            noise = torch.randn(newest.shape, generator=self._generator).to(newest.device)
            delta = (self.noise_scale * rms * noise * rows[:, None]).to(newest.dtype)
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            tensor = tensor.clone()
            flat = tensor.view(tensor.shape[0], -1, tensor.shape[-1])
            flat[:, -1] += delta
            if isinstance(output, tuple):
                return (tensor, *output[1:])
            if isinstance(output, list):
                return [tensor, *output[1:]]
            return tensor

        return hook

    # the logits processor ------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if self._new_sequence or self._state.alarm.shape[0] != batch:
            self.reset(batch, input_ids.shape[1])
            self._new_sequence = False
        missing = [self.modules[i] for i in range(len(self.modules)) if i not in self._pending]
        if missing:
            raise RuntimeError(f"PillarMonitor: watched module {missing[0]!r} did not run in this forward pass")
        ids = input_ids[:, self._prompt_len :].cpu()
        if ids.shape[1]:  # the token chosen at the previous step
            newest = ids[:, -1]
            for row in range(batch):
                if not self._finished[row]:
                    self._generated[row].append(int(newest[row]))
            if self.eos_token_ids.numel():
                self._finished |= torch.isin(newest, self.eos_token_ids)
        active = ~self._finished
        values = torch.stack([self._pending[i] for i in range(len(self.modules))], dim=-1).float()
        self._pending.clear()
        score, alarm = self._state.update(values, active)
        loop = torch.tensor([
            bool(active[r])
            and detect_loop(self._generated[r], self.loop_max_period, self.loop_min_repeats, self.loop_min_span) is not None
            for r in range(batch)
        ])
        if self.trigger == "tokens":
            self._state.alarm |= loop
            alarm = self._state.alarm.clone()
        self._intervene = alarm & active
        self._records.append((values, score.float(), alarm, loop, logits_entropy(scores).cpu(), active))
        return scores

    # results -------------------------------------------------------------------------------------
    def trace(self) -> MonitorTrace:
        """The current (or last) generation's record."""
        if not self._records:
            raise RuntimeError("PillarMonitor has no record: it has not seen a generation step yet")
        columns = [torch.stack(c) for c in zip(*self._records, strict=True)]
        return MonitorTrace(self.modules, *columns)

    def summary(self) -> list[dict[str, int | None]]:
        """Per row: ``alarm_step`` (first alarm), ``loop_step`` (first step the token detector saw a
        loop; the loop is in the tokens generated up to it) and ``lead`` (``loop_step - alarm_step``)."""
        trace = self.trace()
        rows = []
        for r in range(trace.alarm.shape[1]):
            alarm = trace.alarm[:, r].nonzero()
            loop = trace.loop[:, r].nonzero()
            a = int(alarm[0]) if len(alarm) else None
            lp = int(loop[0]) if len(loop) else None
            rows.append({"alarm_step": a, "loop_step": lp, "lead": lp - a if a is not None and lp is not None else None})
        return rows
