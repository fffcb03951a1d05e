"""Activation-aware (whitened) low rank: minimize the layer's OUTPUT error on calibration inputs.

With inputs ``X`` (tokens x in) and Gram ``G = X^T X``, the output error of an approximation
``W'`` is ``||(W - W') X^T||_F^2 = ||(W - W') S||_F^2`` for any ``S`` with ``S S^T = G``. So the best
rank-r ``W'`` is the truncated SVD of ``W S`` mapped back by ``S^-1`` (SVD-LLM). ``S`` comes from a
damped eigendecomposition of ``G`` (never a Cholesky), so a singular or rank-deficient ``G`` is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Whitener:
    """``S = Q diag(sqrt(lam))`` and its inverse for a damped Gram ``G ~ Q diag(lam) Q^T``."""

    basis: torch.Tensor  # Q, [in, in], float64
    root: torch.Tensor  # sqrt(lam), [in], float64

    @classmethod
    def from_gram(cls, gram: torch.Tensor, damp: float = 0.01) -> Whitener:
        """Eigen-decompose ``gram`` (symmetrized; float32 eigh, 2.5x faster than float64, and the
        floor makes its rounding of tiny eigenvalues irrelevant); eigenvalues are floored at ``damp * mean``."""
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
        if not 0.0 <= damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {damp!r}")
        g = gram.detach().to(torch.float64)
        g = (g + g.T) / 2
        lam, basis = torch.linalg.eigh(g.to(torch.float32))
        lam, basis = lam.to(torch.float64), basis.to(torch.float64)
        mean = float(lam.clamp(min=0).mean())
        # never divide by a zero eigenvalue, even with damp=0 on a singular Gram
        floor = max(damp * mean, 1e-10 * float(lam.max())) if mean > 0 else 1.0
        return cls(basis, lam.clamp(min=floor).sqrt())

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W S``: the weight in the metric where Frobenius error = output error."""
        return (weight.to(torch.float64) @ self.basis) * self.root

    def unwhiten(self, right: torch.Tensor) -> torch.Tensor:
        """``R S^-1`` for a right factor ``R`` expressed in the whitened space."""
        return (right.to(torch.float64) / self.root) @ self.basis.T

    def output_energy(self, weight: torch.Tensor) -> float:
        """``||W S||_F^2``: the squared output norm of ``W`` in the damped metric."""
        return float(self.whiten(weight).pow(2).sum())


def whitened_low_rank(
    weight: torch.Tensor, whitener: Whitener, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, R, spectrum)`` with ``L R`` the output-error-optimal rank-``rank`` approximation of
    ``weight`` and ``spectrum`` all singular values of ``W S`` (``L``/``R`` float32)."""
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    # the whitening itself is float64; the SVD runs in float32 (4x faster, ample for truncation)
    u, s, vh = torch.linalg.svd(whitener.whiten(weight).to(torch.float32), full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = whitener.unwhiten(root[:, None] * vh[:rank])
    return left.to(torch.float32), right.to(torch.float32), s.to(torch.float64)


def whitened_spectrum(weight: torch.Tensor, whitener: Whitener) -> torch.Tensor:
    """Singular values of ``W S`` (descending, float64): their squares are output-error energies."""
    return torch.linalg.svdvals(whitener.whiten(weight).to(torch.float32)).to(torch.float64)


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
    normal += torch.eye(normal.shape[0], dtype=normal.dtype) * damp * float(normal.diagonal().mean().clamp(min=1e-30))
    rhs = weight.to(torch.float64) @ rg.T
    return torch.linalg.solve(normal, rhs.T).T.to(torch.float32)
