"""The one dispatch point of compressed-layer forwards: ``torch.ops.hf_svdq.*`` custom ops.

``torch.ops.hf_svdq.low_rank_linear`` and ``torch.ops.hf_svdq.residual_linear`` run the pure-PyTorch
reference (:mod:`hf_svdq.kernels.reference`) on every device; on CPU, inputs of at most
``backend.active().max_rows`` rows go to the fused numba kernels instead (:mod:`hf_svdq.kernels.backend` says
which is active and why). Fake (meta) implementations give ``torch.compile`` and meta-device tracing
the output shape without running anything.

The ops carry no autograd formula: :func:`residual_linear` and :func:`low_rank_linear` (what the modules
call) run the differentiable reference when a gradient is needed (LoRA training). Eager CPU calls go
straight to the op's CPU kernel (the dispatcher costs 4.5 us a call, 16 us with a Python autograd
kernel, measured here: ~1-3 ms per decoded token over 210 layers); ``torch.compile`` and other devices
see the registered op.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from . import backend
from .reference import low_rank_linear as _low_rank_torch
from .reference import residual_linear_reference

_lib = torch.library.Library("hf_svdq", "DEF")
_lib.define(
    "low_rank_linear(Tensor x, Tensor left, Tensor left_scale, Tensor right, Tensor right_scale, Tensor? bias) -> Tensor"
)
_lib.define(
    "residual_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, Tensor? u, Tensor? u_scale, "
    "Tensor? vh, Tensor? vh_scale, Tensor? bias) -> Tensor"
)

_NO_INT8 = np.zeros((0, 0), dtype=np.int8)
_NO_FLOAT = np.zeros(0, dtype=np.float32)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VIEWS: dict[int, tuple[tuple, tuple[np.ndarray, ...]]] = {}
"""Per layer, keyed by ``id()`` of its first tensor (the entry is dropped when that tensor dies): the
NumPy views the fused kernels read. Kept beside the tensors rather than on them, so pickling or
deep-copying a module never carries them (a ``WeakKeyDictionary`` would compare tensors with ``==``)."""


def _numpy(t: torch.Tensor | None, kind: str) -> np.ndarray:
    if t is None:
        return _NO_FLOAT if kind == "float" else _NO_INT8
    detached = t.detach()
    if kind == "float":
        return detached.to(torch.float32).contiguous().numpy()
    if kind == "half_bits":
        return np.ascontiguousarray(detached.view(torch.int16).numpy())
    return np.ascontiguousarray(detached.numpy())


def _per_layer(cache: dict, first: torch.Tensor, rest: tuple[torch.Tensor | None, ...], build):  # type: ignore[no-untyped-def]
    """``build((first, *rest))`` cached on the layer's first tensor and rebuilt when any tensor's storage or
    version changes (``load_state_dict`` copies in place); the entry goes when that tensor dies."""
    tensors = (first, *rest)
    key = tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
    cached = cache.get(id(first))
    if cached is not None and cached[0] == key:
        return cached[1]
    value = build(tensors)
    if cached is None:
        weakref.finalize(first, cache.pop, id(first), None)
    cache[id(first)] = (key, value)
    return value


def _layer_arrays(
    first: torch.Tensor, rest: tuple[torch.Tensor | None, ...], kinds: tuple[str, ...]
) -> tuple[np.ndarray, ...]:
    """NumPy views of a frozen layer's tensors (float32 copies of its small scale/bias vectors) for the numba
    kernels. Caching them took a 192x576 INT4 layer call from 36 to 25 us (measured)."""
    # views of detached tensors: no cycle
    return _per_layer(_VIEWS, first, rest, lambda tensors: tuple(_numpy(t, k) for t, k in zip(tensors, kinds)))


_RESIDUAL_KINDS = ("int", "half_bits", "int", "int", "float", "int", "float", "float")
_LOW_RANK_KINDS = ("int", "float", "int", "float", "float")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _use_fused(x: torch.Tensor) -> backend.Backend | None:
    chosen = backend.active()
    if (chosen.module is None and chosen.compiled is None) or x.dtype not in _FUSED_DTYPES or not 0 < _rows(x) <= chosen.max_rows:
        return None
    return chosen


def _flat_float32(x: torch.Tensor, in_features: int) -> np.ndarray:
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x.detach().contiguous().numpy().reshape(-1, in_features)


def _as_output(out: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    y = torch.from_numpy(out.reshape(x.shape[:-1] + (out.shape[1],)))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _fused_residual(kernels, x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias):  # type: ignore[no-untyped-def]
    out_features, groups, width = codes.shape
    in_features = groups * width * 8 // bits
    arrays = _layer_arrays(codes, (scale, zero, u, u_scale, vh, vh_scale, bias), _RESIDUAL_KINDS)
    flat = _flat_float32(x, in_features)
    threads = backend.threads_for(out_features * in_features)
    if threads == 1:
        out = kernels.residual_forward(flat, bits, *arrays)
    else:
        out = backend.run_parallel(kernels.residual_forward_parallel, flat, bits, *arrays, threads)
    return _as_output(out, x)


def _compiled_fits(in_features: int, group_size: int | None = None) -> bool:
    """The compiled kernels take input widths (and group sizes) that are multiples of 32."""
    return in_features % 32 == 0 and (group_size is None or group_size % 32 == 0)


def _compiled(chosen, x, out_features, base, u, u_scale, vh, vh_scale, bias):  # type: ignore[no-untyped-def]
    """One compiled-kernel call: ``base`` is ``(codes, scale, zero, bits, group_size)`` for a residual
    layer, None for a low-rank one (``u``/``vh`` its factors). The kernels take ``[..., in]`` float32 and
    convert small scale and bias vectors themselves: nothing else to prepare per call."""
    codes, scale, zero, bits, group_size = base if base is not None else (None, None, None, 0, 0)
    flat = x  # no gradient is needed on this path (_dispatch), so no detach (0.36 us a call)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.to(torch.float32).contiguous()
    y = chosen.compiled.forward(flat, codes, scale, zero, bits, group_size, out_features, u, u_scale, vh, vh_scale,
                                bias, chosen.isa, backend.PARALLEL_MIN_WEIGHTS)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _dequantize_then_gemm(kernels, x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias):  # type: ignore[no-untyped-def]
    """Large float32 inputs (prefill): the base dequantized by numba into a temporary float32 weight
    (3-6x faster than the PyTorch reference's dequantization), then PyTorch's GEMM; freed on return."""
    out_features, groups, width = codes.shape
    weight = torch.empty(out_features, groups * width * 8 // bits, dtype=torch.float32)
    codes_np, scale_np, zero_np = _layer_arrays(codes, (scale, zero, u, u_scale, vh, vh_scale, bias), _RESIDUAL_KINDS)[:3]
    args = (codes_np, scale_np, zero_np, bits == 4, weight.numpy())
    threads = backend.threads_for(weight.numel())
    if threads == 1:
        kernels.dequantize_group_rows(*args, 0, out_features)
    else:
        backend.run_parallel(kernels.dequantize_group_parallel, *args, threads)
    y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if u is not None and u_scale is not None and vh is not None and vh_scale is not None:
        y = y + _low_rank_torch(x, u, u_scale, vh, vh_scale)
    return y


def _fused_low_rank(kernels, x, left, left_scale, right, right_scale, bias):  # type: ignore[no-untyped-def]
    out_features, rank = left.shape
    arrays = _layer_arrays(left, (left_scale, right, right_scale, bias), _LOW_RANK_KINDS)
    flat = _flat_float32(x, right.shape[1])
    threads = backend.threads_for(out_features * rank)
    if threads == 1:
        out = kernels.low_rank_forward(flat, *arrays)
    else:
        out = backend.run_parallel(kernels.low_rank_forward_parallel, flat, *arrays, threads)
    return _as_output(out, x)


def _low_rank_cpu(x, left, left_scale, right, right_scale, bias):  # type: ignore[no-untyped-def]
    chosen = _use_fused(x)
    if chosen is None or _rows(x) > backend.LOW_RANK_FUSED_ROWS:
        return _low_rank_torch(x, left, left_scale, right, right_scale, bias)
    if chosen.compiled is not None and _compiled_fits(right.shape[1]):
        return _compiled(chosen, x, left.shape[0], None, left, left_scale, right, right_scale, bias)
    if chosen.module is None:
        return _low_rank_torch(x, left, left_scale, right, right_scale, bias)
    return _fused_low_rank(chosen.module, x, left, left_scale, right, right_scale, bias)


def _residual_cpu(x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias):  # type: ignore[no-untyped-def]
    chosen = _use_fused(x)
    if chosen is None:
        kernels = backend.active().module
        if kernels is not None and x.dtype == torch.float32:
            return _dequantize_then_gemm(kernels, x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias)
        return residual_linear_reference(x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias)
    out_features, groups, width = codes.shape
    in_features, group_size = groups * width * 8 // bits, width * 8 // bits
    if chosen.compiled is not None and _compiled_fits(in_features, group_size):
        return _compiled(chosen, x, out_features, (codes, scale, zero, bits, group_size), u, u_scale, vh, vh_scale, bias)
    if chosen.module is None:
        return residual_linear_reference(x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias)
    return _fused_residual(chosen.module, x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias)


def _low_rank_fake(x, left, left_scale, right, right_scale, bias):  # type: ignore[no-untyped-def]
    return x.new_empty(*x.shape[:-1], left.shape[0])


def _residual_fake(x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias):  # type: ignore[no-untyped-def]
    return x.new_empty(*x.shape[:-1], codes.shape[0])


_lib.impl("low_rank_linear", _low_rank_torch, "CompositeExplicitAutograd")
_lib.impl("low_rank_linear", _low_rank_cpu, "CPU")
_lib.impl("residual_linear", residual_linear_reference, "CompositeExplicitAutograd")
_lib.impl("residual_linear", _residual_cpu, "CPU")
torch.library.register_fake("hf_svdq::low_rank_linear", _low_rank_fake, lib=_lib)
torch.library.register_fake("hf_svdq::residual_linear", _residual_fake, lib=_lib)


def _eager_cpu(x: torch.Tensor) -> bool:
    """True when a call may skip the dispatcher: eager, on CPU, no gradient needed."""
    return x.is_cpu and not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled())


def uses_fused_kernels(x: torch.Tensor) -> bool:
    """Whether a residual-layer call with input ``x`` would run the fused decode kernels."""
    return _eager_cpu(x) and _use_fused(x) is not None


def _dispatch(reference, cpu_kernel, op, x, *args):  # type: ignore[no-untyped-def]
    """The differentiable reference when a gradient is needed, the op's CPU kernel directly in eager
    CPU mode (skipping the dispatcher), else the registered op (``torch.compile``, other devices)."""
    if x.requires_grad and torch.is_grad_enabled():
        return reference(x, *args)
    if _eager_cpu(x):
        return cpu_kernel(x, *args)
    return op(x, *args)


def low_rank_linear(
    x: torch.Tensor,
    left: torch.Tensor,
    left_scale: torch.Tensor,
    right: torch.Tensor,
    right_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (L R)^T + bias`` of a low-rank INT8 layer (see :func:`_dispatch`)."""
    return _dispatch(_low_rank_torch, _low_rank_cpu, torch.ops.hf_svdq.low_rank_linear,
                     x, left, left_scale, right, right_scale, bias)


def residual_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    u: torch.Tensor | None = None,
    u_scale: torch.Tensor | None = None,
    vh: torch.Tensor | None = None,
    vh_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (Q + L R)^T + bias`` of a residual layer (see :func:`_dispatch`)."""
    return _dispatch(residual_linear_reference, _residual_cpu, torch.ops.hf_svdq.residual_linear,
                     x, codes, scale, zero, bits, u, u_scale, vh, vh_scale, bias)
