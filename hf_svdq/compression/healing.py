"""Healing (opt-in): a short distillation of a compressed model's low-rank factors against the dense model.

After compression, every low-rank factor pair (pure low-rank layers' ``L R``; residual layers' correction
``U Vh``, their quantized base frozen) becomes float and trainable for ``steps`` Adam steps that minimise
KL(dense || compressed) of the next-token distributions on calibration tokens; then the factors are
rounded back to INT8 per row, in place. Shapes, ranks, the on-disk format and the bytes do not change.
Only the factors train: the embedding, norms, head and quantized bases stay as they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.linalg import LowRankInt8, quantize_int8_rows
from ..nn.low_rank import SVDQLinear
from ..nn.residual import SVDQResidualLinear

logger = logging.getLogger(__name__)


@dataclass
class HealingResult:
    """KL to the dense model on the healing tokens before and after, and the time it took."""

    steps: int
    tokens: int
    layers: int
    kl_before: float
    kl_after: float
    seconds: float


class _FloatFactors(nn.Module):
    """A compressed layer's factors as float parameters (its base, if any, as a frozen float weight)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        p = layer._parameters
        if isinstance(layer, SVDQResidualLinear):
            left, left_scale = p["weight_u"], p["weight_u_scale"]
            self.register_buffer("base", layer.base_weight(torch.float32), persistent=False)
        else:
            left, left_scale = p["weight"], p["weight_scale"]
            self.base = None
        self.left = nn.Parameter(left.to(torch.float32) * left_scale.to(torch.float32)[:, None])  # type: ignore[union-attr]
        self.right = nn.Parameter(p["weight_vh"].to(torch.float32) * p["weight_vh_scale"].to(torch.float32)[:, None])  # type: ignore[union-attr]
        self.bias = None if p.get("bias") is None else p["bias"].detach().to(torch.float32)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        y = (h @ self.right.T) @ self.left.T
        if self.base is not None:
            y = y + h @ self.base.T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def write_back(self) -> nn.Module:
        """Round the trained factors to INT8 per row into the original layer and return it."""
        layer: Any = self.layer
        scale_dtype: torch.dtype = layer.weight_vh_scale.dtype
        factors = LowRankInt8(quantize_int8_rows(self.left, scale_dtype), quantize_int8_rows(self.right, scale_dtype))
        if isinstance(layer, SVDQResidualLinear):
            layer.weight_u = nn.Parameter(factors.left.codes, requires_grad=False)
            layer.weight_u_scale = nn.Parameter(factors.left.scale.to(scale_dtype), requires_grad=False)
            layer.weight_vh = nn.Parameter(factors.right.codes, requires_grad=False)
            layer.weight_vh_scale = nn.Parameter(factors.right.scale.to(scale_dtype), requires_grad=False)
        else:
            layer.load_factors(factors)
        return layer


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    teacher = F.log_softmax(teacher_logits.float(), -1)
    student = F.log_softmax(student_logits.float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _mean_kl(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            chunk = ids[start : start + batch_size]
            total += float(_kl(model(chunk).logits, teacher(chunk).logits)) * chunk.shape[0]
    return total / ids.shape[0]


def heal(
    model: nn.Module, teacher: nn.Module, ids: torch.Tensor, steps: int = 100, lr: float = 1e-4, batch_size: int = 4,
    seed: int = 0, progress: bool = True,
) -> HealingResult:
    """Distil ``model``'s low-rank factors towards ``teacher`` (the dense model) on ``ids``
    (``[n, seq_len]`` token ids, e.g. ``CalibrationConfig.token_ids``) for ``steps`` steps of
    ``batch_size`` sequences; factors are written back as INT8 in place. ``ValueError`` when the model
    has no low-rank factors or the arguments are out of range."""
    _check_arguments(steps, lr, ids)
    names = [n for n, m in model.named_modules()
             if isinstance(m, SVDQLinear) or (isinstance(m, SVDQResidualLinear) and m.rank > 0)]
    if not names:
        raise ValueError("healing needs low-rank factors: this model has no compressed layer with rank > 0")
    start = time.perf_counter()
    was_training = model.training
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    before = _mean_kl(model, teacher, ids, batch_size)
    wrappers = {}
    for name in names:
        wrappers[name] = _FloatFactors(model.get_submodule(name))
        model.set_submodule(name, wrappers[name])
    model.train()
    try:
        _distil(model, teacher, ids, [p for w in wrappers.values() for p in (w.left, w.right)], steps, lr, batch_size,
                seed, progress)
    finally:
        for name, wrapper in wrappers.items():
            with torch.no_grad():
                model.set_submodule(name, wrapper.write_back())
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, False))
    after = _mean_kl(model, teacher, ids, batch_size)
    result = HealingResult(steps, int(ids.numel()), len(names), before, after, time.perf_counter() - start)
    logger.info("hf_svdq: healed %d layers in %d steps: KL %.4f -> %.4f on %d tokens (%.0f s)", result.layers, steps,
                before, after, result.tokens, result.seconds)
    return result


def _check_arguments(steps: object, lr: float, ids: torch.Tensor) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"healing steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"healing lr must be positive, got {lr!r}")
    if ids.dim() != 2 or ids.shape[0] < 1:
        raise ValueError(f"healing ids must be [n_samples, seq_len], got shape {tuple(ids.shape)}")


def _distil(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, params: list[torch.Tensor], steps: int, lr: float,
            batch_size: int, seed: int, progress: bool) -> None:
    """``steps`` Adam steps on ``params`` minimising KL(teacher || model) on random batches of ``ids``."""
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="healing", disable=not progress):
        batch = ids[torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=generator)]
        with torch.no_grad():
            target = teacher(batch).logits
        loss = _kl(model(batch).logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def heal_with_config(model: Any, teacher: Any, tokenizer: Any, steps: int, lr: float = 1e-4) -> HealingResult:
    """:func:`heal` on the calibration tokens the model was compressed with (its config must still hold
    the calibration data, i.e. right after compression, not after a reload)."""
    calibration = model.config.quantization_config.calibration
    if calibration is None or not calibration.has_data:
        raise ValueError("healing needs calibration data: compress with calibration=... (it is not stored in checkpoints)")
    return heal(model, teacher, calibration.token_ids(tokenizer, teacher), steps, lr)
