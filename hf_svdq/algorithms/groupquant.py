"""Asymmetric group quantization of a weight matrix (INT4/INT8 codes), round-to-nearest and GPTQ.

A group is ``group_size`` consecutive input columns of one output row, with one float scale and one
integer zero point: ``w ~ (q - zero) * scale``, ``q`` in ``[0, 2^bits - 1]``. INT4 codes are packed
two per byte (low nibble first). Pure functions on tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GroupQuantized:
    """Codes ``[out, in]`` (uint8, unpacked), ``scale``/``zero`` ``[out, in / group_size]``."""

    codes: torch.Tensor
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # uint8
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scale, self.zero, self.group_size, dtype)


def check_group_args(in_features: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"residual_bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
    if group_size * bits % 8:
        raise ValueError(f"group_size {group_size} at {bits} bits is not a whole number of bytes (INT4 packs two codes per byte)")


MIN_SCALE = 2.0**-24
"""Smallest group scale, the smallest positive fp16 (5.96e-8): scales are stored as fp16, and the
scale of an all-zero or near-constant group used to be clamped to 1e-8, which rounds to fp16 zero and
turned its codes into NaN. Only such degenerate groups (INT4 range below ~1e-6) reach this floor."""


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(codes - zero) * scale`` broadcast over groups; ``codes`` unpacked ``[out, in]``."""
    out, n = codes.shape
    grouped = codes.view(out, n // group_size, group_size).to(dtype)
    deq = (grouped - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)
    return deq.view(out, n)


def _group_params(w: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded, as float32) and integer zero for each row of ``w`` [rows, group]."""
    qmax = 2**bits - 1
    lo = torch.clamp(w.min(dim=1).values * clip, max=0.0)
    hi = torch.clamp(w.max(dim=1).values * clip, min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE).to(torch.float16).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def _best_group_params(
    w: torch.Tensor, bits: int, importance: torch.Tensor | None, clips: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clip ratio minimizing the (importance-weighted) squared error of the group."""
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for clip in clips:
        scale, zero = _group_params(w, bits, clip)
        deq = (_quantize_with(w, scale, zero, bits) - zero[:, None]) * scale[:, None]
        err = (deq - w).pow(2)
        err = (err * importance).sum(1) if importance is not None else err.sum(1)
        if best is None:
            best = (scale, zero, err)
        else:
            best_scale, best_zero, best_err = best
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best = (best_scale, best_zero, torch.where(better, err, best_err))
    if best is None:
        raise ValueError("clips must not be empty")
    return best[0], best[1]


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None = None,
    clips: tuple[float, ...] = (1.0,),
) -> GroupQuantized:
    """Round-to-nearest. ``clips=(1.0,)`` is plain min/max; with :data:`CLIP_GRID` each group picks the
    clip ratio with the least (``importance``-weighted, e.g. ``diag(X^T X)``) squared error."""
    out, n = weight.shape
    check_group_args(n, bits, group_size)
    w = weight.detach().to(torch.float32).reshape(out * (n // group_size), group_size)
    imp = None
    if importance is not None:
        imp = importance.to(torch.float32).reshape(1, n // group_size, group_size).expand(out, -1, -1).reshape(-1, group_size)
    scale, zero = _best_group_params(w, bits, imp, clips)
    codes = _quantize_with(w, scale, zero, bits)
    groups = n // group_size
    return GroupQuantized(
        codes.to(torch.uint8).view(out, n),
        scale.view(out, groups).to(torch.float16),
        zero.to(torch.uint8).view(out, groups),
        bits,
        group_size,
    )


def damped_diagonal(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """The diagonal of GPTQ's Hessian ``H`` (float64): ``diag(G)`` with never-reached columns (zero) set to 1,
    plus ``damp`` times its mean."""
    diagonal = gram.detach().diagonal().to(torch.float64).clone()
    diagonal[diagonal <= 0] = 1.0
    return diagonal + damp * float(diagonal.mean())


def hessian_root(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper-triangular ``V`` with ``H = V V^T`` for GPTQ's ``H = G + damp * mean(diag G) I`` (columns
    the calibration never reached, with a zero diagonal, get ``H_jj = 1``): one float64 Cholesky of ``H``
    with its order reversed, returned as float32. ``V`` whitens (:class:`~hf_svdq.algorithms.whitening.Whitener`)
    and its inverse is GPTQ's factor (:func:`inverse_hessian_factor`). A Gram that is not positive
    definite after damping (``damp=0`` on a singular one) gets the smallest diagonal jitter that works."""
    if not torch.isfinite(gram).all():
        raise ValueError(f"the input Gram ({gram.shape[0]} wide) has non-finite values: the calibration activations overflowed")
    diagonal = damped_diagonal(gram, damp).flip(0)
    info = torch.zeros((), dtype=torch.int32, device=gram.device)
    jitter = 0.0
    for _attempt in range(12):
        # P H P = L L^T, so H = V V^T with V = P L P; the Cholesky runs in place (one n x n float64 copy)
        flipped = gram.detach().flip(0, 1).to(torch.float64)
        flipped.diagonal().copy_(diagonal + jitter)
        torch.linalg.cholesky_ex(flipped, out=(flipped, info))
        if int(info) == 0:
            lower = flipped.to(torch.float32)
            del flipped
            return lower.flip(0, 1)
        del flipped
        jitter = max(jitter * 100, 1e-12 * float(diagonal.mean()))
    raise ValueError(f"the input Gram ({gram.shape[0]} wide) is not positive definite even with jitter {jitter:.3g}; "
                     "raise damp")


def inverse_hessian_factor(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's ``U``: the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), float32, as the
    :func:`upper_inverse` of :func:`hessian_root` ``V`` (float32): the same factor as GPTQ's
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` with one Cholesky and a triangular inverse
    by halves (in float64 at 8192 wide: 8.4 s against 12.0 s for that chain, 2 EPYC cores). The chain in
    float32 moved SmolLM2's recommended-mode perplexity on 2 x 32768 held-out tokens by -0.4% / -0.15%,
    within the +-0.3-0.5% that equivalent roundings spread (README, "How precise a perplexity ratio
    is"). Depends only on the Gram: compute it once per layer."""
    return upper_inverse(hessian_root(gram, damp))


def upper_inverse(v: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of an upper-triangular matrix (in its dtype) by halves, ``[[A, B], [0, C]]^-1 =
    [[A^-1, -A^-1 B C^-1], [0, C^-1]]``: a third of the flops of ``solve_triangular(v, I)``, all of it in
    matrix products, written in place into one output (extra memory: two quarter-size products)."""
    out = torch.zeros_like(v)
    _invert_into(v, out, leaf)
    return out


def _invert_into(v: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = v.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(v, torch.eye(n, dtype=v.dtype, device=v.device), upper=True))
        return
    half = n // 2
    _invert_into(v[:half, :half], out[:half, :half], leaf)
    _invert_into(v[half:, half:], out[half:, half:], leaf)
    out[:half, half:] = -(out[:half, :half] @ v[:half, half:]) @ out[half:, half:]


def quantize_gptq(
    weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, block: int = 128,
    clips: tuple[float, ...] = CLIP_GRID, hinv: torch.Tensor | None = None,
) -> GroupQuantized:
    """GPTQ (Frantar et al. 2022): quantize columns in order, feeding each column's error back into
    the not-yet-quantized columns through the inverse Hessian ``G^-1``. Group parameters are chosen
    when a group starts, from the error-updated weights, with the same clip search as RTN. ``hinv``:
    :func:`inverse_hessian_factor` of ``gram`` when the caller already has it."""
    out, n = weight.shape
    check_group_args(n, bits, group_size)
    # columns as rows: every per-column step below reads and writes contiguous memory (2-2.7x faster
    # on CPU than the [out, in] layout, same codes)
    wt = weight.detach().to(torch.float32).T.contiguous()
    dead = gram.diagonal() <= 0
    wt[dead, :] = 0.0
    if hinv is None:
        hinv = inverse_hessian_factor(gram, damp)
    diag = damped_diagonal(gram, damp).to(torch.float32)

    groups = n // group_size
    block = group_size * max(1, block // group_size)  # every group lies inside one block
    codes = torch.zeros(n, out, dtype=torch.uint8, device=wt.device)  # on the weight's device (GPU too)
    scales = torch.zeros(groups, out, device=wt.device)
    zeros = torch.zeros(groups, out, device=wt.device)
    qmax = 2**bits - 1
    scale = zero = torch.zeros(out, device=wt.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        w1 = wt[start:stop].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:
                importance = diag[col : col + group_size].expand(out, -1)
                scale, zero = _best_group_params(w1[i : i + group_size].T, bits, importance, clips)
                scales[col // group_size], zeros[col // group_size] = scale, zero
            row = w1[i]
            q = torch.clamp(torch.round(row / scale) + zero, 0, qmax)
            codes[col] = q.to(torch.uint8)
            err = (row - (q - zero) * scale) / h1[i, i]
            w1[i:] -= h1[i, i:, None] * err[None, :]
            err1[i] = err
        wt[stop:] -= hinv[start:stop, stop:].T @ err1
    return GroupQuantized(codes.T.contiguous(), scales.T.contiguous().to(torch.float16), zeros.T.contiguous().to(torch.uint8),
                          bits, group_size)


def pack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``[out, in]`` uint8 codes -> ``[out, in / group_size, group_size * bits / 8]`` uint8 (3-D on
    purpose: it can never match a dense ``[out, in]`` weight)."""
    out, n = codes.shape
    grouped = codes.view(out, n // group_size, group_size)
    if bits == 8:
        return grouped.contiguous()
    return (grouped[..., 0::2] | (grouped[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[out, in]`` uint8 codes."""
    out, groups, width = packed.shape
    if bits == 8:
        return packed.reshape(out, groups * width)
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(out, groups * width * 2)
