import pytest
import torch

from hf_svdq.algorithms.whitening import Whitener, output_error, refit_left, whitened_low_rank, whitened_spectrum


def _problem(m=40, n=24, tokens=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix  # strongly anisotropic inputs
    return w, x.T @ x


@pytest.mark.parametrize("rank", [1, 6, 20])
def test_output_error_of_whitened_truncation_is_the_discarded_spectrum(rank):
    w, gram = _problem()
    whitener = Whitener.from_gram(gram, damp=0.0)
    left, right, spectrum = whitened_low_rank(w, whitener, rank)
    error = output_error(w, left.double() @ right.double(), gram)
    assert error == pytest.approx(float((spectrum[rank:] ** 2).sum()), rel=1e-4)


def test_whitened_beats_plain_svd_in_output_error():
    w, gram = _problem()
    left, right, _ = whitened_low_rank(w, Whitener.from_gram(gram, damp=0.0), 6)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :6] * s[:6]) @ vh[:6]
    assert output_error(w, left.double() @ right.double(), gram) < 0.8 * output_error(w, plain, gram)


def test_singular_gram_does_not_fail():
    w, _ = _problem()
    x = torch.randn(5, 24, dtype=torch.float64)  # 5 tokens: rank-5 Gram of a 24-wide input
    gram = x.T @ x
    left, right, _spectrum = whitened_low_rank(w, Whitener.from_gram(gram, damp=0.01), 10)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert torch.isfinite(whitened_spectrum(w, Whitener.from_gram(torch.zeros(24, 24)))).all()
    undamped = Whitener.from_gram(gram, damp=0.0)  # singular and undamped: still finite
    assert torch.isfinite(whitened_low_rank(w, undamped, 10)[1]).all()


def test_refit_left_is_the_least_squares_optimum():
    w, gram = _problem()
    right = torch.randn(6, 24, dtype=torch.float64)
    best = refit_left(w, right, gram, damp=0.0).double()
    base = output_error(w, best @ right, gram)
    for _ in range(5):
        nudged = best + 1e-3 * torch.randn_like(best)
        assert output_error(w, nudged @ right, gram) >= base


def test_whitener_validates_input():
    with pytest.raises(ValueError, match="square"):
        Whitener.from_gram(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="damp"):
        Whitener.from_gram(torch.eye(3), damp=1.5)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (16, 16)])
def test_leading_singular_matches_the_svd(shape):
    from hf_svdq.algorithms.linalg import leading_singular, singular_values

    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    left, right, spectrum = leading_singular(a, 5)
    torch.testing.assert_close(spectrum, s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(singular_values(a.float()), s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left @ right, (u[:, :5] * s[:5]) @ vh[:5], rtol=1e-9, atol=1e-9)


def test_leading_singular_of_a_rank_deficient_matrix_is_finite():
    from hf_svdq.algorithms.linalg import leading_singular

    a = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 20, dtype=torch.float64)
    left, right, spectrum = leading_singular(a, 6)  # 4 of the 6 singular values are zero
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left @ right, a, rtol=1e-8, atol=1e-8)
    assert spectrum[2:].abs().max() < 1e-6


def test_the_whitening_factor_is_gptqs_factor():
    """One Cholesky serves both: the whitener's inverse is GPTQ's inverse-Hessian factor of the same Gram."""
    from hf_svdq.algorithms.groupquant import inverse_hessian_factor

    _, gram = _problem()
    whitener = Whitener.from_gram(gram, damp=0.01)
    v = whitener.factor.double()
    damped = gram + 0.01 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    torch.testing.assert_close(v @ v.T, damped, rtol=1e-5, atol=1e-5 * float(damped.abs().max()))
    assert torch.equal(v, v.triu())
    torch.testing.assert_close(whitener.inverse, inverse_hessian_factor(gram, 0.01))


def test_a_singular_undamped_gram_gets_jitter_and_a_non_finite_one_is_named():
    x = torch.randn(3, 10, dtype=torch.float64)
    v = Whitener.from_gram(x.T @ x, damp=0.0).factor  # rank 3 of 10: Cholesky needs a jitter
    assert torch.isfinite(v).all() and torch.isfinite(Whitener(v).inverse).all()
    bad = torch.eye(4, dtype=torch.float64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        Whitener.from_gram(bad)
