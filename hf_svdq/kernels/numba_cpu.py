"""Fused CPU decode kernels (numba), used by :mod:`hf_svdq.kernels.ops` for small inputs.

Each kernel computes ``y = x (Q + L R)^T + b`` (residual layers) or ``y = x (L R)^T + b`` (low-rank
layers) straight from the stored integer tensors: the float weight ``[out, in]`` is never formed.
Per group ``g`` of an output row ``o`` the base contributes ``scale[o, g] * (sum_k q_k x_k - zero[o, g] *
sum_k x_k)``, so only the integer codes are converted inside the dot product and the zero point costs
one multiply per group. The correction's thin product ``t = (x R^T) * r_scale`` is computed once per
call and added to every output row as ``l_scale[o] * (L[o] . t)`` in the same pass over the rows.

The reference these kernels are tested against is :mod:`hf_svdq.kernels.reference`. Everything here works on
NumPy views of the module's own tensors (no copies of weights); activations are float32 (the caller
converts bf16/fp16 activations and casts the result back). fp16 group scales are read as their raw
bits (numba has no float16 on CPU) and converted exactly by :func:`_half_to_float`.

numba compiles these for the host CPU on first use (a few seconds, cached on disk with
``cache=True``); nothing is compiled at install time.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_POW2 = np.array([2.0 ** (e - 25) if e else 2.0**-24 for e in range(32)], dtype=np.float32)
"""``2^(e-25)`` for an fp16 exponent field ``e`` (``2^-24`` for subnormals); see :func:`_half_to_float`."""
_LOW = np.uint32(15)
_SHIFT = np.uint32(4)
_BLOCK = 32
"""Output rows per block when several input rows share the codes (32 INT8 rows of 576 inputs: 18 KB)."""
# Integer work is written in 32-bit types on purpose: numba widens integer arithmetic to 64 bits, and
# LLVM then converts int64 -> float, which AVX2 cannot vectorize (measured 0.122 -> 0.085 ms on a
# 1536x576 INT4 row pass with uint32 nibbles).


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _half_to_float(bits: int) -> float:
    """Exact float value of the IEEE fp16 with raw ``bits`` (finite values; scales are never inf/NaN)."""
    exponent = (bits >> 10) & 31
    mantissa = bits & 1023
    if exponent:
        mantissa += 1024
    value = np.float32(mantissa) * _POW2[exponent]
    return -value if bits & 0x8000 else value


@njit(nogil=True, fastmath=True, cache=True)
def prepare(x, group_size, interleaved, vh, vh_scale, xg, xsum, t):  # pragma: no cover - compiled
    """Per-call activation side work, shared by every output row.

    ``xg`` gets ``x`` with each group's even elements first and odd ones second when ``interleaved``
    (INT4 codes hold elements ``2j``/``2j+1`` in the low/high nibble of byte ``j``; otherwise it is
    not written, the caller passes ``x`` itself);
    ``xsum[m, g]`` the group sums (for the zero points); ``t[m, k] = (x[m] . vh[k]) * vh_scale[k]``.
    """
    rows, n = x.shape
    groups = xsum.shape[1]
    half = group_size // 2
    for m in range(rows):
        for g in range(groups):
            base = g * group_size
            total = np.float32(0.0)
            for k in range(group_size):
                total += x[m, base + k]
            xsum[m, g] = total
            if interleaved:
                for j in range(half):
                    xg[m, base + j] = x[m, base + 2 * j]
                    xg[m, base + half + j] = x[m, base + 2 * j + 1]
        for k in range(t.shape[1]):
            acc = np.float32(0.0)
            for i in range(n):
                acc += np.float32(np.int32(vh[k, i])) * x[m, i]
            t[m, k] = acc * vh_scale[k]


@njit(nogil=True, fastmath=True, cache=True)
def add_correction(u, u_scale, t, bias, out, start, stop):  # pragma: no cover - compiled
    """``out[m, o] += u_scale[o] * (u[o] . t[m]) + bias[o]`` for rows ``[start, stop)`` (empty ``u``/``bias``
    mean none). A separate pass on purpose: fused into the base loop it kept LLVM from vectorizing the
    dot products (measured 1.75x slower: 0.205 against 0.117 ms on a 1536x576 INT4 pass)."""
    rank = t.shape[1]
    has_bias = bias.shape[0] > 0
    for o in range(start, stop):
        for m in range(out.shape[0]):
            value = out[m, o]
            if rank:
                acc = np.float32(0.0)
                for k in range(rank):
                    acc += np.float32(np.int32(u[o, k])) * t[m, k]
                value += acc * u_scale[o]
            if has_bias:
                value += bias[o]
            out[m, o] = value


@njit(nogil=True, fastmath=True, cache=True)
def residual_rows(bits, xg, xsum, codes, scale_bits, zero, u, u_scale, t, bias, out, start, stop):  # pragma: no cover
    """Output rows ``[start, stop)`` of a residual layer: base (``codes`` ``[out, groups, g * bits / 8]``
    uint8) plus correction and bias. Several input rows reuse each block of codes while it is in L1."""
    interleaved = bits == 4
    if xg.shape[0] == 1:
        _one_input(xg[0], xsum[0], codes, scale_bits, zero, out[0], start, stop, interleaved)
    else:
        for block in range(start, stop, _BLOCK):
            for m in range(xg.shape[0]):
                _one_input(xg[m], xsum[m], codes, scale_bits, zero, out[m], block, min(stop, block + _BLOCK), interleaved)
    add_correction(u, u_scale, t, bias, out, start, stop)


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _int4_group(x, base, codes, o, o1, g, s0, s1, part0, part1):  # pragma: no cover - compiled
    half = codes.shape[2]
    for j in range(half):
        even = x[base + j]
        odd = x[base + half + j]
        b0 = np.uint32(codes[o, g, j])
        b1 = np.uint32(codes[o1, g, j])
        part0[j] += s0 * (np.float32(np.int32(b0 & _LOW)) * even + np.float32(np.int32(b0 >> _SHIFT)) * odd)
        part1[j] += s1 * (np.float32(np.int32(b1 & _LOW)) * even + np.float32(np.int32(b1 >> _SHIFT)) * odd)


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _int8_group(x, base, codes, o, o1, g, s0, s1, part0, part1):  # pragma: no cover - compiled
    for k in range(codes.shape[2]):
        value = x[base + k]
        part0[k] += s0 * np.float32(np.int32(np.uint32(codes[o, g, k]))) * value
        part1[k] += s1 * np.float32(np.int32(np.uint32(codes[o1, g, k]))) * value


@njit(nogil=True, fastmath=True, cache=True)
def _one_input(x, xsum, codes, scale_bits, zero, out, start, stop, interleaved):  # pragma: no cover - compiled
    """Base product for a single input row (decode at batch 1), output rows ``[start, stop)``.

    Two output rows at a time share each activation load, and each keeps one partial sum per code
    position (``part``) that the group scale multiplies in, so the only horizontal reduction is one per
    output row, not one per group (1.3-1.5x faster than a dot product per group, measured). INT4
    (``interleaved``) codes hold two elements per byte; ``x`` is permuted to match by :func:`prepare`."""
    groups = codes.shape[1]
    width = codes.shape[2]
    size = 2 * width if interleaved else width
    part0 = np.empty(width, np.float32)
    part1 = np.empty(width, np.float32)
    scales0 = np.empty(groups, np.float32)
    scales1 = np.empty(groups, np.float32)
    o = start
    while o < stop:
        pair = o + 1 < stop
        o1 = o + 1 if pair else o
        part0[:] = 0.0
        part1[:] = 0.0
        offset0 = np.float32(0.0)
        offset1 = np.float32(0.0)
        # Scales and zero-point offsets ahead of the dot products: inside the group loop they kept
        # LLVM from vectorizing it well (0.136 -> 0.103 ms per 1536x576 INT4 pass, measured).
        for g in range(groups):
            scales0[g] = _half_to_float(np.int32(scale_bits[o, g]))
            scales1[g] = _half_to_float(np.int32(scale_bits[o1, g]))
            offset0 += scales0[g] * np.float32(zero[o, g]) * xsum[g]
            offset1 += scales1[g] * np.float32(zero[o1, g]) * xsum[g]
        for g in range(groups):
            if interleaved:
                _int4_group(x, g * size, codes, o, o1, g, scales0[g], scales1[g], part0, part1)
            else:
                _int8_group(x, g * size, codes, o, o1, g, scales0[g], scales1[g], part0, part1)
        total0 = np.float32(0.0)
        total1 = np.float32(0.0)
        for j in range(width):
            total0 += part0[j]
            total1 += part1[j]
        out[o] = total0 - offset0
        if pair:
            out[o1] = total1 - offset1
        o += 2


@njit(nogil=True, fastmath=True, cache=True)
def low_rank_rows(u, u_scale, t, bias, out, start, stop):  # pragma: no cover - compiled
    """Output rows ``[start, stop)`` of a low-rank layer: ``u_scale[o] * (u[o] . t[m]) + bias[o]``."""
    out[:, start:stop] = 0.0
    add_correction(u, u_scale, t, bias, out, start, stop)


@njit(nogil=True, fastmath=True, cache=True)
def _prepared(x, bits, codes, vh, vh_scale):  # pragma: no cover - compiled
    """Scratch arrays for one call, filled by :func:`prepare`: ``(xg, xsum, t)``."""
    rows = x.shape[0]
    groups = codes.shape[1]
    group_size = codes.shape[2] * 8 // bits
    xg = np.empty_like(x) if bits == 4 else x  # INT8 codes are in x's own order
    xsum = np.empty((rows, groups), np.float32)
    t = np.empty((rows, vh.shape[0]), np.float32)
    prepare(x, group_size, bits == 4, vh, vh_scale, xg, xsum, t)
    return xg, xsum, t


@njit(nogil=True, fastmath=True, cache=True)
def residual_forward(x, bits, codes, scale_bits, zero, u, u_scale, vh, vh_scale, bias):  # pragma: no cover
    """``x (Q + L R)^T + bias`` on one thread, returned as [rows, out] float32; ``x`` [rows, in] float32;
    ``codes``/``scale_bits``/``zero`` the residual layout (scales as raw fp16 bits), ``u``/``vh`` the INT8
    correction factors with float32 scales (shape ``[out, 0]``/``[0, in]`` for rank 0), ``bias`` empty for none."""
    xg, xsum, t = _prepared(x, bits, codes, vh, vh_scale)
    out = np.empty((x.shape[0], codes.shape[0]), np.float32)
    residual_rows(bits, xg, xsum, codes, scale_bits, zero, u, u_scale, t, bias, out, 0, codes.shape[0])
    return out


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def residual_forward_parallel(x, bits, codes, scale_bits, zero, u, u_scale, vh, vh_scale, bias, blocks):  # pragma: no cover
    """:func:`residual_forward` with the output rows split into ``blocks`` parallel blocks."""
    xg, xsum, t = _prepared(x, bits, codes, vh, vh_scale)
    n = codes.shape[0]
    out = np.empty((x.shape[0], n), np.float32)
    step = (n + blocks - 1) // blocks
    for b in prange(blocks):
        residual_rows(bits, xg, xsum, codes, scale_bits, zero, u, u_scale, t, bias, out, b * step, min(n, b * step + step))
    return out


@njit(nogil=True, fastmath=True, cache=True)
def _low_rank_hidden(x, vh, vh_scale):  # pragma: no cover - compiled
    t = np.empty((x.shape[0], vh.shape[0]), np.float32)
    prepare(x, 1, False, vh, vh_scale, x, np.empty((x.shape[0], 0), np.float32), t)
    return t


@njit(nogil=True, fastmath=True, cache=True)
def low_rank_forward(x, u, u_scale, vh, vh_scale, bias):  # pragma: no cover - compiled
    """``x (L R)^T + bias`` on one thread (``u`` = L codes, ``vh`` = R codes, float32 row scales)."""
    t = _low_rank_hidden(x, vh, vh_scale)
    out = np.empty((x.shape[0], u.shape[0]), np.float32)
    low_rank_rows(u, u_scale, t, bias, out, 0, u.shape[0])
    return out


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def low_rank_forward_parallel(x, u, u_scale, vh, vh_scale, bias, blocks):  # pragma: no cover - compiled
    """:func:`low_rank_forward` with the output rows split into ``blocks`` parallel blocks."""
    t = _low_rank_hidden(x, vh, vh_scale)
    n = u.shape[0]
    out = np.empty((x.shape[0], n), np.float32)
    step = (n + blocks - 1) // blocks
    for b in prange(blocks):
        low_rank_rows(u, u_scale, t, bias, out, b * step, min(n, b * step + step))
    return out


@njit(nogil=True, fastmath=True, cache=True)
def dequantize_group_rows(codes, scale_bits, zero, interleaved, out, start, stop):  # pragma: no cover - compiled
    """``out[o] = Q[o]`` (float32, natural column order) for rows ``[start, stop)`` of a group-quantized base:
    the dequantize half of the dequantize-then-GEMM path for inputs too large for the fused kernels."""
    groups = codes.shape[1]
    width = codes.shape[2]
    size = 2 * width if interleaved else width
    for o in range(start, stop):
        for g in range(groups):
            base = g * size
            s = _half_to_float(np.int32(scale_bits[o, g]))
            offset = -np.float32(zero[o, g]) * s
            if interleaved:
                for j in range(width):
                    byte = np.uint32(codes[o, g, j])
                    out[o, base + 2 * j] = np.float32(np.int32(byte & _LOW)) * s + offset
                    out[o, base + 2 * j + 1] = np.float32(np.int32(byte >> _SHIFT)) * s + offset
            else:
                for j in range(width):
                    out[o, base + j] = np.float32(np.int32(np.uint32(codes[o, g, j]))) * s + offset


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def dequantize_group_parallel(codes, scale_bits, zero, interleaved, out, blocks):  # pragma: no cover - compiled
    """:func:`dequantize_group_rows` over ``blocks`` contiguous row blocks in parallel."""
    n = codes.shape[0]
    step = (n + blocks - 1) // blocks
    for b in prange(blocks):
        dequantize_group_rows(codes, scale_bits, zero, interleaved, out, b * step, min(n, b * step + step))
