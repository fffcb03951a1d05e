"""How much each Linear's output error costs the model: a diagonal empirical-Fisher estimate.

For a layer with outputs ``y_t`` (token ``t``) and gradients ``g_t = d NLL_t / d y_t`` of the next-token
loss, a small output error ``dy`` raises the loss by about ``1/2 sum_t,i F_ti dy_ti^2`` (second order;
the first-order term averages out around a trained model). If the error is spread evenly over the
output channels and tokens, a **relative** output error ``e`` (error energy over ``sum_t |y_t|^2``, what
:mod:`hf_svdq.algorithms.allocation` measures) costs

    kappa * e   nats per token,   kappa = 1/2 * mean_t |g_t|^2 * mean_t |y_t|^2 / out_features

which is the weight each layer's relative error gets in a mixed-precision budget, and the sum of
``kappa * e`` over layers predicts the perplexity ratio as ``exp(sum)`` (first order across layers).
One forward and backward pass per calibration batch on the dense model; no weight gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..calibration.statistics import hook_target


def output_sensitivity(model: nn.Module, names: Sequence[str], ids: torch.Tensor, batch_size: int = 4,
                       max_samples: int = 8) -> dict[str, float]:
    """``{layer name: kappa}`` (nats per token per unit of relative output error) on the first
    ``max_samples`` rows of ``ids``, for the Linear modules ``names`` of a dense causal LM."""
    sums: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}  # sum_t |g|^2, sum_t |y|^2
    widths: dict[str, int] = {}
    tokens = 0
    handles = []

    def watch(name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            y = output.detach().to(torch.float64)
            sums[name][1] += float(y.pow(2).sum())
            widths[name] = int(output.shape[-1])
            if output.requires_grad:
                output.register_hook(lambda g: sums[name].__setitem__(0, sums[name][0] + float(g.to(torch.float64).pow(2).sum())))
        return hook

    def grad_from_here(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    for name in names:  # an expert stack is scored by its experts module's output (shared by its stacks)
        module, _ = hook_target(model, name)
        handles.append(module.register_forward_hook(watch(name)))
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    handles.append(embeddings.register_forward_hook(grad_from_here))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        rows = ids[:max_samples]
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            with torch.enable_grad():
                logits = model(batch).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
            tokens += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    # y is counted for every position, g only where a next token is scored: normalise each by its own count
    positions = rows.numel()
    return {n: 0.5 * (g / max(tokens, 1)) * (y / max(positions, 1)) / widths.get(n, 1) for n, (g, y) in sums.items()}
