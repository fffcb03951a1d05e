"""``SVDQExperts``: a fused mixture-of-experts module whose expert stacks are compressed.

transformers 5 holds a MoE block's experts as one module with 3-D parameters (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``; transposed, ``[E, H, 2I]`` / ``[E, I, H]``, with biases in
gpt-oss) and a forward that loops over the routed experts (``@use_experts_implementation``). This
module is generic over that pattern, not one class per model: :func:`find_expert_stacks` recognises
any module the decorator marks (``is_transposed``, ``has_bias``; ``has_gate`` where present), and :class:`SVDQExperts`
copies that module's attributes (activation, gpt-oss's ``alpha``/``limit``, its ``_apply_gate``) and
replaces the stacks it compresses with the tensors :func:`hf_svdq.format.layout.expert_tensors`
declares. Stacks it does not compress stay the module's dense parameters. The forward runs
:func:`routed_forward`: only the experts the router picked are computed, each through the same
fused kernels as a compressed Linear, on per-expert views of the stacked codes (no float copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms.groupquant import GroupQuantized, check_group_args, pack_codes
from ..algorithms.linalg import LowRankInt8
from ..format import layout as fmt
from ..kernels.ops import low_rank_linear, residual_linear
from ..kernels.reference import dequantize_group_codes, dequantize_rows
from .low_rank import _TORCH_DTYPES, _frozen

_MODULE_KEYS = frozenset(nn.Module().__dict__)


@dataclass(frozen=True)
class ExpertStack:
    """One 3-D expert parameter: ``experts`` matrices of ``[out_features, in_features]`` (as a Linear
    weight; ``transposed`` when the module stores them ``[in, out]``)."""

    name: str
    experts: int
    out_features: int
    in_features: int
    transposed: bool
    bias: bool


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused-experts module (3-D ``down_proj`` + ``gate_up_proj``/``up_proj``),
    dense or already an :class:`SVDQExperts`."""
    if isinstance(module, SVDQExperts):
        return True
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a fused-experts module cannot be compressed by :class:`SVDQExperts` (None: it can)."""
    if isinstance(module, SVDQExperts):
        return None
    missing = [a for a in ("is_transposed", "has_bias") if not hasattr(module, a)]  # has_gate: 5.x later, default True
    if missing:
        return f"{type(module).__name__} does not follow transformers' experts interface (no {', '.join(missing)})"
    if getattr(module, "has_post_expert_norm", False):
        return f"{type(module).__name__} applies a norm after each expert (has_post_expert_norm), not supported"
    return None


def find_expert_stacks(module: nn.Module) -> list[ExpertStack]:
    """The compressible stacks of a fused-experts module, in forward order (``gate_up_proj`` or
    ``up_proj``, then ``down_proj``); empty for any other module or an unsupported one."""
    if isinstance(module, SVDQExperts):
        return list(module.stacks.values())
    if not is_fused_experts(module) or unsupported_reason(module) is not None:
        return []
    transposed, bias = bool(module.is_transposed), bool(module.has_bias)
    stacks = []
    for name in fmt.EXPERT_STACKS:
        param = module._parameters.get(name)
        if param is None or param.dim() != 3:
            continue
        experts, a, b = param.shape
        out_features, in_features = (b, a) if transposed else (a, b)
        stacks.append(ExpertStack(name, experts, out_features, in_features, transposed, bias))
    return stacks


@dataclass(frozen=True)
class StackFormat:
    """How one stack is stored: the low-rank layout (``bits`` None) or the residual layout."""

    rank: int
    bits: int | None = None
    group_size: int | None = None

    def shape(self, stack: ExpertStack) -> fmt.LayerShape:
        return fmt.LayerShape(stack.out_features, stack.in_features, self.rank, self.bits,
                              (self.group_size or stack.in_features) if self.bits is not None else None)


class SVDQExperts(nn.Module):
    """A fused-experts module with some stacks compressed (see the module docstring).

    Build it with :meth:`from_module` (any device, ``meta`` included): compressed stacks start as empty
    tensors of the declared layout and are filled by :meth:`load_stack` (compression) or from a
    checkpoint (reload).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stacks: dict[str, ExpertStack] = {}
        self.formats: dict[str, StackFormat] = {}
        self.source_class: type[nn.Module] = nn.Module
        self.float_dtype = torch.float32
        self._views: dict[str, tuple[tuple[Any, ...], list[tuple[torch.Tensor | None, ...]]]] = {}

    @classmethod
    def from_module(cls, source: nn.Module, formats: dict[str, StackFormat], dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> SVDQExperts:
        """``source``'s attributes, children and other parameters, with the stacks named in ``formats``
        declared compressed (empty, on ``device``; float scales in ``dtype``)."""
        if isinstance(source, SVDQExperts):
            raise TypeError("from_module: the module is already an SVDQExperts")
        reason = unsupported_reason(source)
        if reason is not None:
            raise TypeError(reason)
        stacks = {s.name: s for s in find_expert_stacks(source)}
        unknown = sorted(set(formats) - set(stacks))
        if unknown:
            raise ValueError(f"{type(source).__name__} has no expert stack(s) {unknown}; it has {sorted(stacks)}")
        new = cls()
        for key, value in source.__dict__.items():
            if key not in _MODULE_KEYS:
                new.__dict__[key] = value
        new.source_class = type(source)
        new.float_dtype = dtype or next(p.dtype for p in source.parameters() if p.is_floating_point())
        new.stacks = stacks
        new.formats = {}
        new._views = {}
        for name, child in source.named_children():
            new.add_module(name, child)
        for name, buffer in source.named_buffers(recurse=False):
            new.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
        for name, param in source.named_parameters(recurse=False):
            if name not in formats:
                new.register_parameter(name, param)
        for name, stack_format in formats.items():
            first = source._parameters[name]
            assert first is not None
            new.declare_stack(name, stack_format, dtype or first.dtype, device if device is not None else first.device)
        return new

    def declare_stack(self, name: str, stack_format: StackFormat, dtype: torch.dtype, device: torch.device | str | None) -> None:
        """Register stack ``name``'s empty compressed tensors, replacing its dense parameter."""
        stack = self.stacks[name]
        if stack_format.bits is not None:
            check_group_args(stack.in_features, stack_format.bits, stack_format.group_size or stack.in_features)
        limit = min(stack.out_features, stack.in_features)
        if not (0 if stack_format.bits is not None else 1) <= stack_format.rank <= limit:
            raise ValueError(f"{name}: rank {stack_format.rank} does not fit {stack.out_features}x{stack.in_features} experts")
        if name in self._parameters:
            del self._parameters[name]
        for tensor, (kind, shape) in fmt.expert_tensors(name, stack_format.shape(stack), stack.experts).items():
            self.register_parameter(tensor, _frozen(shape, _TORCH_DTYPES.get(kind, dtype), device))
        self.formats[name] = stack_format
        self._views.pop(name, None)

    def _tensor(self, stack: str, tensor: str) -> torch.Tensor:
        param = self._parameters[fmt.expert_tensor_name(stack, tensor)]
        assert param is not None
        return param

    def load_stack(self, name: str, bases: Sequence[GroupQuantized] | None, corrections: Sequence[LowRankInt8 | None]) -> None:
        """Install one computed matrix per expert: residual layout (``bases`` given, ``corrections`` of the
        stack's rank, or all None at rank 0) or low-rank layout (``bases`` None)."""
        stack, stack_format = self.stacks[name], self.formats[name]
        dtype = self.compute_dtype
        if len(corrections) != stack.experts or (bases is not None and len(bases) != stack.experts):
            raise ValueError(f"{name}: expected {stack.experts} experts")
        tensors: dict[str, torch.Tensor] = {}
        if bases is not None:
            group = stack_format.group_size or stack.in_features
            tensors[fmt.CODES] = torch.stack([pack_codes(b.codes, b.bits, group) for b in bases])
            tensors[fmt.GROUP_SCALE] = torch.stack([b.scale.to(torch.float16) for b in bases])
            tensors[fmt.GROUP_ZERO] = torch.stack([b.zero.to(torch.uint8) for b in bases])
            left, left_scale = fmt.CORR_LEFT, fmt.CORR_LEFT_SCALE
        else:
            left, left_scale = fmt.LEFT, fmt.LEFT_SCALE
        if stack_format.rank:
            if any(c is None or c.rank != stack_format.rank for c in corrections):
                raise ValueError(f"{name}: every expert needs a rank-{stack_format.rank} factorization")
            factors = [c for c in corrections if c is not None]
            tensors[left] = torch.stack([c.left.codes for c in factors])
            tensors[left_scale] = torch.stack([c.left.scale.to(dtype) for c in factors])
            tensors[fmt.RIGHT] = torch.stack([c.right.codes for c in factors])
            tensors[fmt.RIGHT_SCALE] = torch.stack([c.right.scale.to(dtype) for c in factors])
        for tensor, value in tensors.items():
            key = fmt.expert_tensor_name(name, tensor)
            expected = self._parameters[key]
            assert expected is not None
            if tuple(value.shape) != tuple(expected.shape) or value.dtype != expected.dtype:
                raise ValueError(f"{name}: {key} computed as {value.dtype}{list(value.shape)}, "
                                 f"declared {expected.dtype}{list(expected.shape)}")
            device = expected.device if not expected.is_meta else value.device
            self._parameters[key] = nn.Parameter(value.to(device), requires_grad=False)
        self._views.pop(name, None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The model's float dtype (the per-row scales' and biases')."""
        return self.float_dtype

    # -- forward ---------------------------------------------------------------------------------------

    def _expert_views(self, name: str) -> list[tuple[torch.Tensor | None, ...]]:
        """Per-expert views of stack ``name``'s tensors (kept while the stacked storage is unchanged, so
        the kernels' per-layer caches stay warm across calls)."""
        stack_format = self.formats[name]
        names = ((fmt.LEFT, fmt.LEFT_SCALE, fmt.RIGHT, fmt.RIGHT_SCALE) if stack_format.bits is None else
                 (fmt.CODES, fmt.GROUP_SCALE, fmt.GROUP_ZERO) + ((fmt.CORR_LEFT, fmt.CORR_LEFT_SCALE, fmt.RIGHT, fmt.RIGHT_SCALE)
                                                                 if stack_format.rank else ()))
        tensors = [self._tensor(name, t) for t in names]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self._views.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        views: list[tuple[torch.Tensor | None, ...]] = [tuple(t[e] for t in tensors) for e in range(self.stacks[name].experts)]
        self._views[name] = (key, views)
        return views

    def project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` through expert ``expert``'s matrix of stack ``name`` (plus its bias)."""
        stack = self.stacks[name]
        bias = self._parameters.get(f"{name}_bias") if stack.bias else None
        bias_e = None if bias is None else bias[expert]
        stack_format = self.formats.get(name)
        if stack_format is None:
            weight = self._parameters[name]
            assert weight is not None
            y = x @ weight[expert] if stack.transposed else nn.functional.linear(x, weight[expert])
            return y if bias_e is None else y + bias_e
        views = self._expert_views(name)[expert]
        if stack_format.bits is None:
            return low_rank_linear(x, views[0], views[1], views[2], views[3], bias_e)  # type: ignore[arg-type]
        return residual_linear(x, views[0], views[1], views[2], stack_format.bits, *views[3:], bias=bias_e)  # type: ignore[arg-type,misc]

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The source class's ``_apply_gate`` (gpt-oss's clamped, interleaved SwiGLU; else act(gate) * up)."""
        return apply_gate(self, self.source_class, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        index = top_k_index if top_k_index is not None else kwargs.get("router_indices")
        weights = top_k_weights if top_k_weights is not None else kwargs.get("routing_weights")
        if index is None or weights is None:
            raise TypeError("SVDQExperts.forward needs hidden_states, top_k_index and top_k_weights")
        return routed_forward(self, hidden_states, index, weights, self.project)

    # -- dense -----------------------------------------------------------------------------------------

    def dequantize_stack(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stack ``name`` as its dense ``[E, out, in]`` matrices (``[E, in, out]`` when stored transposed)."""
        stack, stack_format = self.stacks[name], self.formats[name]
        matrices = []
        for views in self._expert_views(name):
            if stack_format.bits is None:
                w = dequantize_rows(views[0], views[1], torch.float32) @ dequantize_rows(views[2], views[3], torch.float32)  # type: ignore[arg-type]
            else:
                w = dequantize_group_codes(views[0], views[1], views[2], stack_format.bits, torch.float32)  # type: ignore[arg-type]
                if stack_format.rank:
                    w = w + dequantize_rows(views[3], views[4], torch.float32) @ dequantize_rows(views[5], views[6], torch.float32)  # type: ignore[arg-type]
            matrices.append(w.t() if stack.transposed else w)
        return torch.stack(matrices).to(dtype or self.compute_dtype)

    def to_dense_module(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A module of the source class with dense stacks (the compressed ones dequantized)."""
        dense = self.source_class.__new__(self.source_class)
        nn.Module.__init__(dense)
        for key, value in self.__dict__.items():
            if key not in _MODULE_KEYS and key not in ("stacks", "formats", "source_class", "float_dtype", "_views"):
                dense.__dict__[key] = value
        for name, child in self.named_children():
            dense.add_module(name, child)
        for name, buffer in self.named_buffers(recurse=False):
            dense.register_buffer(name, buffer)
        compressed = {t for s, f in self.formats.items() for t in fmt.expert_tensors(s, f.shape(self.stacks[s]), 1)}
        for name, param in self.named_parameters(recurse=False):
            if name not in compressed:
                dense.register_parameter(name, nn.Parameter(param.detach().to(dtype or param.dtype)))
        for name in self.formats:
            dense.register_parameter(name, nn.Parameter(self.dequantize_stack(name, dtype)))
        return dense

    def storage_bytes(self) -> int:
        """Bytes of the compressed stacks' tensors."""
        total = 0
        for name, stack_format in self.formats.items():
            for tensor in fmt.layer_tensors(stack_format.shape(self.stacks[name])):
                param = self._parameters[fmt.expert_tensor_name(name, tensor.name)]
                assert param is not None
                total += param.numel() * param.element_size()
        return total

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = {}  # views of this instance's storage: never carried into a copy
        return state

    def extra_repr(self) -> str:
        parts = []
        for name, stack in self.stacks.items():
            f = self.formats.get(name)
            kind = "dense" if f is None else (f"rank={f.rank}" if f.bits is None else f"bits={f.bits}, group_size={f.group_size}, rank={f.rank}")
            parts.append(f"{name}: {stack.experts}x[{stack.out_features}, {stack.in_features}] {kind}")
        return f"source={self.source_class.__name__}, " + "; ".join(parts)


def apply_gate(module: nn.Module, source_class: type[nn.Module], gate_up: torch.Tensor) -> torch.Tensor:
    """The gating of ``source_class`` applied to ``gate_up`` (its own ``_apply_gate`` when it has one)."""
    gate_fn = getattr(source_class, "_apply_gate", None)
    if gate_fn is not None:
        return gate_fn(module, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up  # type: ignore[operator]


Projection = Callable[[str, int, torch.Tensor], torch.Tensor]


def routed_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, project: Projection) -> torch.Tensor:
    """The experts forward transformers' eager implementation computes, with each expert matrix applied by
    ``project(stack, expert, x)``: only the routed experts run, their outputs weighted by the router's
    top-k weights (``[tokens, k]``, or ``[tokens, E]`` for routers that return the full distribution)
    and summed per token."""
    stacks = find_expert_stacks(module)
    first, down = stacks[0].name, stacks[-1].name
    experts = stacks[0].experts
    has_gate = bool(getattr(module, "has_gate", True))
    source_class = module.source_class if isinstance(module, SVDQExperts) else type(module)
    out = torch.zeros_like(hidden_states)
    full = top_k_weights.shape[-1] == experts and top_k_weights.shape != top_k_index.shape
    if hidden_states.shape[0] == 1:  # decode: no mask to build
        routed = [e for e in dict.fromkeys(top_k_index[0].tolist()) if 0 <= e < experts]
    else:
        routed = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < experts]
    for expert in routed:
        token_idx, position = torch.where(top_k_index == expert)
        x = hidden_states[token_idx]
        h = project(first, expert, x)
        h = apply_gate(module, source_class, h) if has_gate else module.act_fn(h)  # type: ignore[operator]
        y = project(down, expert, h)
        weight = top_k_weights[token_idx, expert] if full else top_k_weights[token_idx, position]
        out.index_add_(0, token_idx, (y * weight.unsqueeze(-1)).to(out.dtype))
    return out


def dense_projection(module: nn.Module) -> Projection:
    """``project`` of a dense fused-experts module (for :func:`routed_forward` during calibration)."""
    stacks = {s.name: s for s in find_expert_stacks(module)}

    def project(name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        stack = stacks[name]
        weight = module._parameters[name]
        assert weight is not None
        y = x @ weight[expert] if stack.transposed else nn.functional.linear(x, weight[expert])
        bias = module._parameters.get(f"{name}_bias") if stack.bias else None
        return y if bias is None else y + bias[expert]

    return project
