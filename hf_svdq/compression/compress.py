"""Compressing a loaded (dense) model in place: the data-dependent paths.

Used for calibrated (whitened) compression, the low-rank + quantized-residual modes and the
energy / budget rank policies: every decision that needs the weights or activations first. The
plain fixed-rank path runs during loading instead (:class:`hf_svdq.integration.quantizer.SVDQuantizeOp`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.allocation import option_ranks, relative_error_curves
from ..algorithms.budget import allocate_ranks, choose_options
from ..algorithms.groupquant import CLIP_GRID, quantize_gptq, quantize_rtn
from ..algorithms.linalg import LowRankInt8, energy_rank, low_rank_int8, quantize_int8_rows
from ..algorithms.whitening import Whitener, refit_left, whitened_low_rank, whitened_spectrum
from ..calibration.statistics import block_grams, block_inputs, dense_grams, find_blocks, input_groups, run_block
from ..integration.config import SVDQuantConfig
from ..nn.low_rank import SVDQLinear, dense_weight_of
from ..nn.residual import SVDQResidualLinear
from .fisher import output_sensitivity
from .memory import release_free_memory
from .plan import LayerDecision, LinearSpec, layer_bytes

logger = logging.getLogger(__name__)


def _low_rank(target: torch.Tensor, rank: int, gram: torch.Tensor | None, whitener: Whitener | None, scale_dtype: torch.dtype) -> LowRankInt8:
    """INT8 factors of the best rank-``rank`` approximation of ``target``. Calibrated: in the output
    norm, with the right factor quantized first and the left one refitted to it; data-free: the same
    :func:`~hf_svdq.algorithms.linalg.low_rank_int8` the quantize-on-load path uses."""
    if whitener is None or gram is None:
        return low_rank_int8(target, rank, scale_dtype)
    left, right, _ = whitened_low_rank(target, whitener, rank)
    right_q = quantize_int8_rows(right, scale_dtype)
    left = refit_left(target, right_q.dequantize(), gram)
    return LowRankInt8(quantize_int8_rows(left, scale_dtype), right_q)


def _spectrum(target: torch.Tensor, whitener: Whitener | None) -> torch.Tensor:
    return whitened_spectrum(target, whitener) if whitener is not None else torch.linalg.svdvals(target.to(torch.float64))


def base_quantization(weight: torch.Tensor, gram: torch.Tensor | None, config: SVDQuantConfig, bits: int) -> Any:
    """The residual mode's base: ``weight`` (float32 ``[out, in]``) group-quantized at ``bits`` by the
    config's method (GPTQ when calibrated, else round-to-nearest)."""
    group = config.group_size or weight.shape[1]
    if gram is not None and config.residual_method == "gptq":
        return quantize_gptq(weight, gram, bits, group, damp=config.damp)
    importance = gram.diagonal() if gram is not None else None
    clips = CLIP_GRID if config.residual_method == "mse" else (1.0,)
    return quantize_rtn(weight, bits, group, importance, clips)


def compress_layer(
    module: nn.Module, spec: LinearSpec, rank: int | None, config: SVDQuantConfig, gram: torch.Tensor | None,
    base: Any = None, whitener: Whitener | None = None,
) -> tuple[SVDQLinear | SVDQResidualLinear | None, int]:
    """A compressed replacement of ``module`` and its rank; ``(None, rank)`` when the break-even
    guard keeps it dense. ``rank=None`` means: choose it from the spectrum (``config.energy``).
    ``base``: a :func:`base_quantization` of this weight at this layer's bits, and ``whitener``:
    ``Whitener.from_gram(gram, config.damp)``, both reused when probes build several options of one layer."""
    weight, transposed = dense_weight_of(module)
    dtype = weight.dtype
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{spec.name}.weight has {bad} non-finite value(s) (NaN/Inf): refusing to compress it")
    bias = getattr(module, "bias", None)
    if whitener is None and gram is not None:
        whitener = Whitener.from_gram(gram, config.damp)
    bits = config.bits_for(spec.name)
    if base is None and bits is not None:
        base = base_quantization(w, gram, config, bits)
    target = w - base.dequantize() if base is not None else w
    if rank is None:
        if config.energy is None:
            raise ValueError("compress_layer: rank is undecided and no energy threshold is set")
        rank = energy_rank(_spectrum(target, whitener), config.energy)
    rank = min(rank, spec.in_features - 1 if base is None else spec.in_features, spec.out_features)
    dense_bytes = spec.out_features * spec.in_features * weight.element_size()
    if layer_bytes(spec, rank, config, weight.element_size()) >= dense_bytes:
        return None, rank
    if base is None:
        if rank < 1:
            return None, rank
        low = SVDQLinear(spec.in_features, spec.out_features, rank, bias is not None, dtype=dtype, transposed=transposed)
        low.load_factors(_low_rank(target, rank, gram, whitener, dtype))
        if bias is not None:
            low.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        new: SVDQLinear | SVDQResidualLinear = low
    else:
        group = config.group_size or spec.in_features
        residual = SVDQResidualLinear(spec.in_features, spec.out_features, rank, base.bits, group, bias is not None,
                                      dtype=dtype, transposed=transposed)
        correction = _low_rank(target, rank, gram, whitener, dtype) if rank else None
        for _ in range(config.refine_steps if correction is not None else 0):
            assert correction is not None
            # alternate: re-quantize what the correction does not explain, then refit the correction
            base = base_quantization(w - correction.dequantize(), gram, config, base.bits)
            correction = _low_rank(w - base.dequantize(), rank, gram, whitener, dtype)
        residual.load(base, correction, bias)
        new = residual
    for tensor_name, tensor in new.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{spec.name}.{tensor_name}: compression produced non-finite values; please report it")
    return new.to(weight.device), rank


def truncation_spectrum(weight: torch.Tensor, config: SVDQuantConfig, gram: torch.Tensor | None) -> torch.Tensor:
    """Singular values whose squared tail is the truncation loss of ``weight`` under ``config``:
    of the whitened weight when calibrated, of the (round-to-nearest) quantization error in residual mode."""
    w = weight.detach().to(torch.float32)
    whitener = Whitener.from_gram(gram, config.damp) if gram is not None else None
    target = w - quantize_rtn(w, config.residual_bits, config.group_size or w.shape[1]).dequantize() if config.residual_bits else w
    return _spectrum(target, whitener)


def budget_ranks(model: nn.Module, targets: Sequence[LayerDecision], config: SVDQuantConfig,
                 grams: dict[str, torch.Tensor], spectra: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Ranks of ``targets`` under the config's global budget (``target_bits_per_weight`` or
    ``target_param_ratio``), allocated by measured truncation loss. ``spectra`` (name ->
    :func:`truncation_spectrum`) is used where given and filled in where missing."""
    spectra = {} if spectra is None else spectra
    specs = {}
    scale_bytes = 4
    for d in targets:
        weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
        scale_bytes = weight.element_size()
        if d.spec.name not in spectra:
            spectra[d.spec.name] = truncation_spectrum(weight, config, grams.get(d.spec.name))
        specs[d.spec.name] = d.spec
    numbers = sum(s.out_features * s.in_features for s in specs.values())
    if config.target_param_ratio is not None:
        budget = config.target_param_ratio * numbers
        def cost(name: str, r: int) -> float:
            s = specs[name]
            return r * (s.out_features + s.in_features)
    else:
        assert config.target_bits_per_weight is not None
        budget = config.target_bits_per_weight * numbers / 8
        def cost(name: str, r: int) -> float:
            return layer_bytes(specs[name], r, config, scale_bytes)
    limits = {n: min(s.out_features, s.in_features - (0 if config.residual_bits else 1)) for n, s in specs.items()}
    ranks = allocate_ranks(spectra, cost, budget, floor=config.rank_floor, max_rank=limits)
    logger.info("hf_svdq: budget allocated ranks %s", ranks)
    return ranks


def mixed_budget(model: nn.Module, targets: Sequence[LayerDecision], config: SVDQuantConfig,
                 grams: dict[str, torch.Tensor], ids: torch.Tensor | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(ranks, layer_bits)`` for ``config.bit_choices`` under ``target_bits_per_weight``: one
    (bits, rank) option per layer minimising the summed relative output error (:mod:`hf_svdq.algorithms.allocation`),
    each layer's weighted by its Fisher sensitivity when calibrated (:mod:`hf_svdq.compression.fisher`; the weighted
    sum predicts the perplexity ratio, left in ``config.prediction``); ``layer_bits`` lists the layers
    whose bits differ from ``residual_bits``."""
    assert config.bit_choices is not None and config.target_bits_per_weight is not None
    names = [d.spec.name for d in targets]
    batch = config.calibration.batch_size if config.calibration is not None else 4
    kappa = output_sensitivity(model, names, ids, batch) if ids is not None else dict.fromkeys(names, 1.0)
    options: dict[str, list[tuple[object, float, float]]] = {}
    numbers = 0
    for d in tqdm(targets, desc="scoring bit/rank options", disable=len(targets) < 8):
        weight, _ = dense_weight_of(model.get_submodule(d.spec.name))
        curves = relative_error_curves(weight, grams.get(d.spec.name), config.bit_choices, config.group_size, config.damp)
        limit = min(d.spec.out_features, d.spec.in_features)
        weight_of = kappa[d.spec.name]
        options[d.spec.name] = [((bits, r), float(layer_bytes(d.spec, r, config, weight.element_size(), bits)),
                                 weight_of * float(curve[r])) for bits, curve in curves.items() for r in option_ranks(limit)]
        numbers += d.spec.out_features * d.spec.in_features
    budget = config.target_bits_per_weight * numbers / 8
    try:
        chosen = choose_options(options, budget=budget)
    except ValueError as err:
        raise ValueError(f"target_bits_per_weight {config.target_bits_per_weight} cannot be met with bit_choices "
                         f"{config.bit_choices} ({err})") from None
    keys = {n: o[0] for n, o in chosen.items()}
    ranks = {n: int(k[1]) for n, k in keys.items()}  # type: ignore[index]
    layer_bits = {n: int(k[0]) for n, k in keys.items() if k[0] != config.residual_bits}  # type: ignore[index]
    total = sum(o[2] for o in chosen.values())
    config.prediction = {"weighted": ids is not None, "objective": total,
                         "perplexity_ratio": math.exp(total) if ids is not None else None}
    logger.info("hf_svdq: mixed budget: %d of %d layers at other bits than %d; objective %.4g%s", len(layer_bits), len(keys),
                config.residual_bits, total, f" (predicted perplexity ratio {math.exp(total):.4f})" if ids is not None else "")
    return ranks, layer_bits


def compress_model(
    model: nn.Module, config: SVDQuantConfig, decisions: Sequence[LayerDecision], ids: torch.Tensor | None,
    progress: bool = True,
) -> list[LayerDecision]:
    """Replace every layer with a rank decision (``rank`` int, or -1 = from data) in place.

    Returns the final decisions (ranks resolved; layers the break-even guard kept dense marked so).
    """
    targets = [d for d in decisions if d.rank is not None]
    calibration = config.calibration
    batch = calibration.batch_size if calibration is not None else 8
    sequential = ids is not None and calibration is not None and calibration.sequential
    grams: dict[str, torch.Tensor] = {}
    budgeted = config.target_bits_per_weight is not None or config.target_param_ratio is not None
    if ids is not None and (not sequential or budgeted):
        grams = dense_grams(model, [d.spec.name for d in targets], ids, batch,
                            calibration.stats_cache if calibration else None, progress)
    fixed: dict[str, int | None] = {d.spec.name: (d.rank if d.rank is not None and d.rank >= 0 else None) for d in targets}
    if budgeted and config.bit_choices:
        ranks, config.layer_bits = mixed_budget(model, targets, config, grams, ids)
        fixed.update(ranks)
    elif budgeted:
        fixed.update(budget_ranks(model, targets, config, grams))

    results: dict[str, tuple[nn.Module | None, int]] = {}
    by_name = {d.spec.name: d for d in targets}

    def do(name: str, gram: torch.Tensor | None) -> None:
        module = model.get_submodule(name)
        new, rank = compress_layer(module, by_name[name].spec, fixed[name], config, gram)
        results[name] = (new, rank)
        if new is not None:
            model.set_submodule(name, new)
        release_free_memory()

    if sequential:
        assert ids is not None
        prefix, blocks = find_blocks(model)
        hidden, kwargs = block_inputs(model, blocks, ids, batch)
        done: set[str] = set()
        for index, block in enumerate(tqdm(blocks, desc="calibrated compression", disable=not progress)):
            block_prefix = f"{prefix}.{index}."
            names = [n[len(block_prefix):] for n in by_name if n.startswith(block_prefix)]
            for group in input_groups(block, names, hidden[0], kwargs[index]) if names else []:
                group_grams = block_grams(block, group, hidden, kwargs[index])
                for local in group:
                    do(block_prefix + local, group_grams[local])
                    done.add(block_prefix + local)
            with torch.no_grad():
                hidden = [run_block(block, h, kwargs[index]) for h in hidden]
        rest = [n for n in by_name if n not in done]
        if rest:
            extra = dense_grams(model, rest, ids, batch, None, progress)
            for name in rest:
                do(name, extra.get(name))
    else:
        for name in tqdm(list(by_name), desc="compressing", disable=not progress):
            do(name, grams.get(name))

    final = []
    for d in decisions:
        if d.rank is None:
            final.append(d)
            continue
        new, rank = results[d.spec.name]
        if new is None:
            final.append(LayerDecision(d.spec, None, f"break-even: rank {rank} is not smaller than dense"))
        else:
            final.append(LayerDecision(d.spec, rank, d.reason))
    return final
