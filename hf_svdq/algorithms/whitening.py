"""Activation-aware (whitened) low rank: minimize the layer's OUTPUT error on calibration inputs.

With inputs ``X`` (tokens x in) and Gram ``G = X^T X``, the output error of an approximation
``W'`` is ``||(W - W') X^T||_F^2 = ||(W - W') S||_F^2`` for any ``S`` with ``S S^T = G``. So the best
rank-r ``W'`` is the truncated SVD of ``W S`` mapped back by ``S^-1`` (SVD-LLM). ``S`` is the triangular
root ``V`` of GPTQ's damped Hessian ``H = G + damp * mean(diag G) I`` (:func:`~hf_svdq.algorithms.groupquant.hessian_root`),
so one Cholesky serves both the whitening and GPTQ, whose factor is ``V^-1``. The SVD of ``W S`` comes
from :func:`~hf_svdq.algorithms.linalg.leading_singular` (the eigendecomposition of its smaller Gram).
"""

from __future__ import annotations

import torch

from .groupquant import hessian_root, upper_inverse
from .linalg import leading_singular, singular_values


class Whitener:
    """``S = V`` (upper triangular, float32) with ``V V^T = G + damp * mean(diag G) I``, and its inverse
    (computed on first use; it is also GPTQ's inverse-Hessian factor, :attr:`inverse`)."""

    def __init__(self, factor: torch.Tensor) -> None:
        self.factor = factor
        self._inverse: torch.Tensor | None = None

    @classmethod
    def from_gram(cls, gram: torch.Tensor, damp: float = 0.01) -> Whitener:
        """Whitening for the input Gram ``gram`` (damped additively by ``damp`` times its mean diagonal)."""
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
        if not 0.0 <= damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {damp!r}")
        return cls(hessian_root(gram, damp))

    @property
    def inverse(self) -> torch.Tensor:
        """``V^-1`` (upper triangular, float32): GPTQ's :func:`~hf_svdq.algorithms.groupquant.inverse_hessian_factor`."""
        if self._inverse is None:
            self._inverse = upper_inverse(self.factor)
        return self._inverse

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W S``: the weight in the metric where Frobenius error = output error (float32, or float64 for
        a float64 ``weight``)."""
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return weight.to(dtype) @ self.factor.to(dtype)

    def unwhiten(self, right: torch.Tensor) -> torch.Tensor:
        """``R S^-1`` for a right factor ``R`` expressed in the whitened space."""
        dtype = torch.promote_types(right.dtype, torch.float32)
        return right.to(dtype) @ self.inverse.to(dtype)

    def output_energy(self, weight: torch.Tensor) -> float:
        """``||W S||_F^2``: the squared output norm of ``W`` in the damped metric."""
        return float(self.whiten(weight).to(torch.float64).pow(2).sum())


def whitened_low_rank(
    weight: torch.Tensor, whitener: Whitener, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, R, spectrum)`` with ``L R`` the output-error-optimal rank-``rank`` approximation of
    ``weight`` and ``spectrum`` all singular values of ``W S`` (``L``/``R`` float32)."""
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    left, right, s = leading_singular(whitener.whiten(weight), rank)
    return left.to(torch.float32), whitener.unwhiten(right).to(torch.float32), s


def whitened_spectrum(weight: torch.Tensor, whitener: Whitener) -> torch.Tensor:
    """Singular values of ``W S`` (descending, float64): their squares are output-error energies."""
    return singular_values(whitener.whiten(weight))


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((W - W') G (W - W')^T)``: squared output error summed over the calibration tokens."""
    diff = (weight - approx).to(torch.float64)
    return float(((diff @ gram.to(torch.float64)) * diff).sum())


def refit_left(weight: torch.Tensor, right: torch.Tensor, gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Best ``L`` for a fixed (e.g. already quantized) ``R`` in the output norm:
    ``argmin_L tr((W - L R) G (W - L R)^T) = W G R^T (R G R^T)^-1``."""
    g = gram.to(torch.float64)
    r = right.to(torch.float64)
    rg = r @ g
    normal = rg @ r.T
    normal += torch.eye(normal.shape[0], dtype=normal.dtype, device=normal.device) * damp * float(normal.diagonal().mean().clamp(min=1e-30))
    rhs = weight.to(torch.float64) @ rg.T
    return torch.linalg.solve(normal, rhs.T).T.to(torch.float32)
