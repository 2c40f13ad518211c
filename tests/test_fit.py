"""The fitting math (sketchpass.sketch.fit), tested on plain tensors without any graph."""

import math

import pytest
import torch
from torch import nn

import sketchpass as sp
from sketchpass.sketch.fit import (
    expected_sketch_error,
    fit_sketch,
    fit_svd,
    kron_gram,
    kron_left,
    kron_right,
    relative_error,
    shrink_gram,
    sketch_materialize,
    svd_spectrum,
)
from sketchpass.sketch.random import sketch_matrix

D = torch.float64


def _u(seed, name, shape, k, dist="rademacher"):
    return torch.from_numpy(sketch_matrix(seed, name, "U", shape, k, dist))


def _objective(W, S1, S2, U1, U2, l, hw, C):
    W_hat = sketch_materialize(S1, S2, U1, U2, l, hw)
    return float(((W_hat - W) @ C * (W_hat - W)).sum())


def _gram(n_samples, n, seed=0, decay=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_samples, n, generator=g, dtype=D)
    if decay:  # correlated, anisotropic inputs like real activations
        X = X @ torch.randn(n, n, generator=g, dtype=D) * torch.logspace(0, -2, n, dtype=D)
    return X.T @ X


def test_kronecker_helpers_match_the_explicit_product():
    U = _u(0, "k", (5, 4), 5)
    hw = 3
    B = torch.kron(U, torch.eye(hw, dtype=D))
    M = torch.randn(6, 12, dtype=D)
    T = torch.randn(6, 15, dtype=D)
    C = _gram(40, 12)
    torch.testing.assert_close(kron_right(M, U, hw), M @ B.T)
    torch.testing.assert_close(kron_left(T, U, hw), T @ B)
    torch.testing.assert_close(kron_gram(C, U, hw), B @ C @ B.T)
    torch.testing.assert_close(kron_gram(None, U, hw), B @ B.T)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sketch_init_is_unbiased(kind):
    """Mean of materialize() over 300 seeds is within 3σ of W (entrywise z-scores)."""
    torch.manual_seed(0)
    dense = nn.Linear(10, 12) if kind == "linear" else nn.Conv2d(6, 8, 3)
    cls = sp.SKLinear if kind == "linear" else sp.SKConv2d
    samples = torch.stack(
        [cls.from_dense(dense, k=4, l=1, init="sketch", seed=s).materialize().double() for s in range(300)])
    W = dense.weight.double()
    mean, std = samples.mean(0), samples.std(0)
    z = (mean - W) / (std / math.sqrt(len(samples)))
    assert z.abs().max() < 4.5  # ~100-300 entries: max |z| beyond 4.5 has probability < 1e-3
    assert (z.abs() > 3).float().mean() < 0.02
    assert 0.7 < float((z**2).mean()) < 1.3  # z-scores are standard: the mean is unbiased
    # ...and the test can fail: a biased estimator (dropping the 1/(2l) normalisation by 10%) is caught
    zb = (mean * 1.1 - W) / (std / math.sqrt(len(samples)))
    assert float((zb**2).mean()) > 1.5


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sketch_init_variance_matches_formula(kind, dist):
    torch.manual_seed(1)
    d_in, d_out, k, l = 24, 16, 3, 2
    dense = nn.Linear(d_in, d_out) if kind == "linear" else nn.Conv2d(d_in, d_out, 3)
    cls = sp.SKLinear if kind == "linear" else sp.SKConv2d
    W = dense.weight.double()
    errs = [float(((cls.from_dense(dense, k, l, "sketch", seed=s, dist=dist).materialize().double() - W) ** 2).sum())
            for s in range(400)]
    measured = sum(errs) / len(errs) / float((W**2).sum())
    predicted = expected_sketch_error(d_in, d_out, k, l, dist)
    assert abs(measured / predicted - 1) < 0.10, (measured, predicted)


@pytest.mark.parametrize("hw", [1, 9])
def test_lstsq_and_calibrated_are_exact_at_full_capacity(hw):
    d_out, d_in, l = 10, 6, 2
    W = torch.randn(d_out, d_in * hw, dtype=D)
    C = _gram(200, d_in * hw)
    # m >= d_out: the output-mode branch alone can represent W
    # (small square sign matrices are often singular; exactness needs the square sketch to be full rank)
    m = d_out
    U1, U2 = _u(1, "a", (m, d_out), m // l), _u(2, "a", (m, d_in), m // l)
    assert torch.linalg.matrix_rank(U1) == m
    for init, gram in [("lstsq", None), ("calibrated", C)]:
        S1, S2 = fit_sketch(W, U1, U2, l, hw, init, gram)
        assert relative_error(W, sketch_materialize(S1, S2, U1, U2, l, hw)) < 1e-12
    # m = d_in < d_out: exact only through the input-mode branch (needs the T solve)
    m = d_in
    U1, U2 = _u(2, "b", (m, d_out), m // l), _u(0, "b", (m, d_in), m // l)
    assert torch.linalg.matrix_rank(U2) == m
    for init, gram in [("lstsq", None), ("calibrated", C)]:
        S1, S2 = fit_sketch(W, U1, U2, l, hw, init, gram)
        assert relative_error(W, sketch_materialize(S1, S2, U1, U2, l, hw)) < 1e-9


@pytest.mark.parametrize("hw", [1, 4])
def test_calibrated_is_optimal_below_capacity(hw):
    d_out, d_in, l, k = 12, 10, 1, 3
    g = torch.Generator().manual_seed(5)
    W = torch.randn(d_out, d_in * hw, generator=g, dtype=D)
    C = _gram(300, d_in * hw, seed=2)
    U1, U2 = _u(0, "c", (k, d_out), k), _u(1, "c", (k, d_in), k)
    S1, S2 = fit_sketch(W, U1, U2, l, hw, "calibrated", C)
    best = _objective(W, S1, S2, U1, U2, l, hw, C)
    # first-order optimality: the gradient of the objective at the fit vanishes
    P1, P2 = S1.clone().requires_grad_(), S2.clone().requires_grad_()
    W_hat = sketch_materialize(P1, P2, U1, U2, l, hw)
    obj = ((W_hat - W) @ C * (W_hat - W)).sum()
    obj.backward()
    scale = float(obj) / (float(S1.norm()) + float(S2.norm()))
    assert float(P1.grad.norm()) < 1e-8 * scale and float(P2.grad.norm()) < 1e-8 * scale
    # and no random perturbation improves it (convex quadratic: a global minimum)
    for i in range(50):
        eps = 1e-3 * (i % 5 + 1)
        d1 = torch.randn(S1.shape, generator=g, dtype=D) * eps
        d2 = torch.randn(S2.shape, generator=g, dtype=D) * eps
        assert _objective(W, S1 + d1, S2 + d2, U1, U2, l, hw, C) >= best * (1 - 1e-12)
    # lstsq is optimal for C = I, and calibrated beats it on the calibration objective
    L1, L2 = fit_sketch(W, U1, U2, l, hw, "lstsq")
    eye = torch.eye(d_in * hw, dtype=D)
    lbest = _objective(W, L1, L2, U1, U2, l, hw, eye)
    for _ in range(20):
        d1 = torch.randn(S1.shape, generator=g, dtype=D) * 1e-3
        assert _objective(W, L1 + d1, L2, U1, U2, l, hw, eye) >= lbest
    assert best < 0.95 * _objective(W, L1, L2, U1, U2, l, hw, C)


def test_lstsq_beats_the_paper_projection_on_frobenius_error():
    W = torch.randn(20, 30, dtype=D)
    U1, U2 = _u(0, "d", (8, 20), 8), _u(1, "d", (8, 30), 8)
    err = {i: relative_error(W, sketch_materialize(*fit_sketch(W, U1, U2, 1, 1, i), U1, U2, 1, 1))
           for i in ("sketch", "lstsq")}
    assert err["lstsq"] < 1.0 < err["sketch"]  # the projection's error is >= 1 at this compression


def test_whitened_svd_is_optimal_and_predicted_by_its_spectrum():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 24, generator=g, dtype=D)
    C = _gram(100, 24, seed=3)
    s = svd_spectrum(W, C)
    for r in (1, 4, 12, 16):
        L, R = fit_svd(W, r, C)
        err = relative_error(W, L @ R, C)
        assert abs(err - float((s[r:] ** 2).sum() / (s**2).sum())) < 1e-9
    # whitening wins on the calibration objective over plain SVD at equal rank
    L, R = fit_svd(W, 6)
    Lw, Rw = fit_svd(W, 6, C)
    assert relative_error(W, Lw @ Rw, C) < relative_error(W, L @ R, C)
    # no rank-6 perturbation does better
    best = relative_error(W, Lw @ Rw, C)
    for _ in range(30):
        assert relative_error(W, (Lw + 1e-3 * torch.randn(Lw.shape, generator=g, dtype=D)) @ Rw, C) >= best
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\]"):
        fit_svd(W, 17)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_data_free_svd_matches_lapack_svd_on_both_orientations(shape):
    """Data-free spectra and factors come from eigh of the smaller of W Wᵀ / Wᵀ W; they must agree with
    an SVD of W: same singular values, the Eckart–Young error at every rank, balanced factors."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=D) * torch.logspace(0, -2, shape[1], dtype=D)
    ref = torch.linalg.svdvals(W)
    s = svd_spectrum(W)
    assert s.shape == ref.shape and torch.allclose(s, ref, rtol=1e-9, atol=1e-12)
    for r in (1, 5, 16):
        L, R = fit_svd(W, r)
        assert L.shape == (shape[0], r) and R.shape == (r, shape[1])
        err = relative_error(W, L @ R)
        assert abs(err - float((ref[r:] ** 2).sum() / (ref**2).sum())) < 1e-10
        assert torch.allclose(L.norm(dim=0), R.norm(dim=1), rtol=1e-9)  # balanced: ‖L_i‖ = ‖R_i‖
        assert torch.allclose(L.norm(dim=0) ** 2, ref[:r], rtol=1e-8)  # and = σ_i, descending


def test_relative_error_and_shrinkage():
    W = torch.randn(5, 7, dtype=D)
    assert relative_error(W, W) == 0
    assert abs(relative_error(W, 0.5 * W) - 0.25) < 1e-12
    C = _gram(3, 7, decay=False)  # 3 samples, 7 dims: singular
    assert torch.linalg.matrix_rank(C) == 3
    Cs = shrink_gram(C, 0.1)
    assert torch.linalg.eigvalsh(Cs).min() > 0
    torch.testing.assert_close(torch.trace(Cs), torch.trace(C))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        shrink_gram(C, 1.5)


def test_random_init_is_variance_matched_to_the_dense_default():
    torch.manual_seed(0)
    for l in (1, 3):
        sk = sp.SKLinear(400, 300, k=20, l=l)
        var = float(sk.materialize().double().var())
        dense_var = 1.0 / (3 * 400)  # kaiming_uniform(a=sqrt(5)) of nn.Linear
        assert abs(var / dense_var - 1) < 0.05
        conv = sp.SKConv2d(32, 48, 3, k=8, l=l, groups=2)
        assert abs(float(conv.materialize().double().var()) / (1.0 / (3 * 16 * 9)) - 1) < 0.08


def test_calibrated_conv_fit_of_a_512_channel_3x3_conv_is_fast_enough_to_run():
    # The Kronecker structure is what makes this feasible (B2 alone would be 2304 x 4608).
    conv = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    C = _gram(600, 512 * 9, decay=False)
    sk = sp.SKConv2d.from_dense(conv, k=64, init="calibrated", gram=C)
    lst = sp.SKConv2d.from_dense(conv, k=64, init="lstsq")
    W = conv.weight.reshape(512, -1)
    assert relative_error(W, sk.materialize().reshape(512, -1), C) < relative_error(
        W, lst.materialize().reshape(512, -1), C)
