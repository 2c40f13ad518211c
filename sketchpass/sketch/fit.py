"""Fitting sketch and low-rank factors to a dense weight.  Tensors in, tensors out; no graphs.

Everything works on the *im2col view* of one group of a layer (DESIGN §1):

* ``W`` — ``(d_out, d_in * hw)``; a Linear weight has ``hw = 1``, a Conv weight ``K`` of shape
  ``(d_out, d_in, *kernel)`` is ``K.reshape(d_out, -1)`` with ``hw = prod(kernel)``.
* ``C`` — the Gram of the layer's (im2col) inputs, ``(d_in*hw, d_in*hw)``; ``None`` means ``I``
  (data-free).  The fitting objective of a factorisation ``Ŵ`` is the output error on those inputs,
  ``‖(Ŵ - W) X‖²_F = tr((Ŵ - W) C (Ŵ - W)ᵀ)`` (Zhang et al., "Accelerating very deep convolutional
  networks for classification and detection", TPAMI 2015, use the same objective).
* sketches ``U1 ∈ R^{m × d_out}`` and ``U2 ∈ R^{m × d_in}``, ``m = l k``; for a conv the input-mode
  sketch acts per kernel position, ``B2 = U2 ⊗ I_hw``.  We never build ``B2``: :func:`kron_right`,
  :func:`kron_left` and :func:`kron_gram` apply it through reshapes (cost ``O(m d_in hw)`` per row
  instead of ``O(m d_in hw²)``, and ``O(m d_in² hw²)`` for ``B C Bᵀ`` instead of ``O(d_in³ hw³)``).

SK factors (Kasiviswanathan, Narodytska & Jin, IJCAI 2018): ``Ŵ = 1/(2l) (U1ᵀ S1 + S2 B2)`` with
``S1 ∈ R^{m × d_in hw}`` (an ``h×w`` conv ``d_in → m``) and ``S2 ∈ R^{d_out × m hw}`` (an ``h×w`` conv
``m → d_out``).

All arithmetic is float64; results are float64 (callers cast).
"""

from __future__ import annotations

import math

import torch

INITS = ("sketch", "lstsq", "calibrated", "random")
DEFAULT_DAMP = 1e-10


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# --------------------------------------------------------------------------- Kronecker structure
def kron_right(M: torch.Tensor, U: torch.Tensor, hw: int) -> torch.Tensor:
    """``M B2ᵀ`` for ``B2 = U ⊗ I_hw``: ``(r, d*hw) -> (r, m*hw)``."""
    r = M.shape[0]
    m, d = U.shape
    return torch.einsum("rcp,jc->rjp", M.reshape(r, d, hw), U).reshape(r, m * hw)


def kron_left(T: torch.Tensor, U: torch.Tensor, hw: int) -> torch.Tensor:
    """``T B2`` for ``B2 = U ⊗ I_hw``: ``(r, m*hw) -> (r, d*hw)``."""
    r = T.shape[0]
    m, d = U.shape
    return torch.einsum("rjp,jc->rcp", T.reshape(r, m, hw), U).reshape(r, d * hw)


def kron_gram(C: torch.Tensor | None, U: torch.Tensor, hw: int) -> torch.Tensor:
    """``B2 C B2ᵀ`` for ``B2 = U ⊗ I_hw``; ``C=None`` means identity (then ``(U Uᵀ) ⊗ I_hw``)."""
    m, d = U.shape
    if C is None:
        return torch.kron(U @ U.T, torch.eye(hw, dtype=U.dtype, device=U.device))
    C4 = C.reshape(d, hw, d, hw)
    left = torch.einsum("jc,cpdq->jpdq", U, C4)  # (m, hw, d, hw)
    return torch.einsum("jpdq,kd->jpkq", left, U).reshape(m * hw, m * hw)


# --------------------------------------------------------------------------- error and Grams
def relative_error(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Relative squared output error ``‖(Ŵ-W)X‖²_F / ‖W X‖²_F = tr(ΔCΔᵀ)/tr(WCWᵀ)`` (``C = X Xᵀ``).

    With ``gram=None`` it is the relative squared Frobenius error ``‖Ŵ-W‖²/‖W‖²``.  This is the
    predictor the budget solver uses for every candidate factorisation.
    """
    W, D = _f64(W), _f64(W_hat) - _f64(W)
    if gram is None:
        num, den = (D * D).sum(), (W * W).sum()
    else:
        C = _f64(gram)
        num, den = ((D @ C) * D).sum(), ((W @ C) * W).sum()
    den = float(den)
    return float(num) / den if den > 0 else (0.0 if float(num) == 0 else math.inf)


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shrink a Gram toward a scaled identity: ``(1-α) C + α (tr C / n) I`` (Ledoit–Wolf style).

    With fewer calibration samples than input dimensions the raw Gram is singular and whitened fits
    overfit to the calibration set; shrinkage keeps every input direction weighted (DESIGN §1).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrinkage alpha must be in [0, 1], got {alpha}")
    C = _f64(gram)
    n = C.shape[0]
    scale = torch.trace(C) / n
    return (1.0 - alpha) * C + alpha * scale * torch.eye(n, dtype=C.dtype, device=C.device)


def _damped(G: torch.Tensor, damp: float) -> torch.Tensor:
    """``G + damp * mean(diag G) * I``: Tikhonov damping relative to the Gram's scale."""
    n = G.shape[0]
    lam = damp * float(torch.diagonal(G).mean().clamp_min(1e-300))
    return G + lam * torch.eye(n, dtype=G.dtype, device=G.device)


def _pinv_solve_right(Y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``Y G⁺`` for symmetric PSD ``G`` by eigendecomposition (eigenvalues below ``1e-12·max`` dropped)."""
    evals, evecs = torch.linalg.eigh(G)
    keep = evals > evals.max().clamp_min(1e-300) * 1e-12
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return ((Y @ evecs) * inv) @ evecs.T


def _spd_solve_right(Y: torch.Tensor, G: torch.Tensor, damp: float, singular: bool = False) -> torch.Tensor:
    """``Y (G + λI)^{-1}`` for symmetric PSD ``G`` by Cholesky; ``Y G⁺`` when ``G`` is known to be
    singular or Cholesky fails (then the minimum-norm least-squares solution is the right answer)."""
    if not singular:
        L, info = torch.linalg.cholesky_ex(_damped(G, damp))
        if int(info) == 0:
            return torch.cholesky_solve(Y.T, L).T
    return _pinv_solve_right(Y, G)


# --------------------------------------------------------------------------- SK fits
def sketch_materialize(S1, S2, U1, U2, l: int, hw: int) -> torch.Tensor:
    """``Ŵ = 1/(2l) (U1ᵀ S1 + S2 (U2 ⊗ I_hw))`` in the im2col view (one group)."""
    return (U1.T @ S1 + kron_left(S2, U2, hw)) / (2.0 * l)


def fit_sketch(
    W: torch.Tensor,
    U1: torch.Tensor,
    U2: torch.Tensor,
    l: int,
    hw: int = 1,
    init: str = "sketch",
    gram: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
    *,
    WC: torch.Tensor | None = None,
    return_error: bool = False,
    out_scale: torch.Tensor | None = None,
):
    """Trainable factors ``(S1, S2)`` for a dense weight ``W`` and fixed sketches ``U1, U2``.

    * ``"sketch"`` — the paper's projection ``S1 = U1 W``, ``S2 = W B2ᵀ``.  Unbiased, ``E[Ŵ] = W``;
      with Rademacher sketches ``E‖Ŵ-W‖² = ((d_in-1) + (d_out-1)) / (4 l k) ‖W‖²``.
    * ``"lstsq"`` — the minimiser of ``‖Ŵ - W‖_F`` for these ``U`` (``"calibrated"`` with ``C = I``).
    * ``"calibrated"`` — the minimiser of ``tr((Ŵ-W) C (Ŵ-W)ᵀ)``.  With ``A = U1ᵀ/(2l)``,
      ``P = A A⁺``, ``B = B2``: ``T = (I-P) W C Bᵀ (B C Bᵀ + λI)⁻¹``, ``S2 = 2l T``,
      ``S1 = A⁺ (W - T B)``.  Derivation: for fixed ``T`` the best ``S1`` is ``A⁺(W - TB)``, which
      leaves the residual ``(I-P)(W - TB)``; minimising that over ``T`` is the weighted least-squares
      problem solved above.  The solve uses Cholesky with damping ``λ = damp · mean(diag(B C Bᵀ))``
      (default ``1e-10``: a guard against round-off, not a regulariser — regularise the Gram with
      :func:`shrink_gram` instead); when ``B C Bᵀ`` is singular (``m > d_in``, or Cholesky fails on
      a rank-deficient ``C``) it uses the pseudo-inverse, i.e. the minimum-norm solution.  Exact
      when ``m ≥ d_out`` with ``U1`` of full rank, or ``m ≥ d_in`` with ``C`` positive definite.

    ``out_scale`` (optional, ``d`` of length ``d_out``) weighs the output channels: the calibrated and
    lstsq fits then minimise ``tr(D (Ŵ-W) C (Ŵ-W)ᵀ D)`` with ``D = diag(d)`` — the error after a per-channel
    scale that follows the layer (an inference-mode BatchNorm).  That is the same fit in the scaled space,
    ``W_d = D W`` and ``A_d = D A``, with ``T = D⁻¹ T_d``; ``WC`` is then ``D W C`` and the error returned is
    the weighted one.

    ``WC`` (optional) is ``W @ gram``, precomputed when fitting many sizes of one layer.  With
    ``return_error=True`` the result is ``(S1, S2, e)`` where ``e = tr(ΔCΔᵀ)`` (``C = I`` when no
    gram): for the optimal fits ``Δ = TB - R`` with ``R = (I-P)W`` and
    ``e = tr(R C Rᵀ) - ⟨T, R C Bᵀ⟩``, which costs no extra ``d_out · n²`` product.
    """
    if init not in ("sketch", "lstsq", "calibrated"):
        raise ValueError(f"fit_sketch init must be 'sketch', 'lstsq' or 'calibrated', got {init!r}")
    W, U1, U2 = _f64(W), _f64(U1), _f64(U2)
    d_out, n = W.shape
    m = U1.shape[0]
    if U1.shape != (m, d_out) or U2.shape[0] != m or U2.shape[1] * hw != n:
        raise ValueError(
            f"shape mismatch: W {tuple(W.shape)}, U1 {tuple(U1.shape)}, U2 {tuple(U2.shape)}, hw={hw}"
        )
    if init == "sketch":
        S1, S2 = U1 @ W, kron_right(W, U2, hw)
        if not return_error:
            return S1, S2
        D = sketch_materialize(S1, S2, U1, U2, l, hw) - W
        if out_scale is not None:
            D = D * _f64(out_scale).reshape(-1, 1)
        e = float((D * D).sum()) if gram is None else float(((D @ _f64(gram)) * D).sum())
        return S1, S2, e
    C = _f64(gram) if (init == "calibrated" and gram is not None) else None
    A = U1.T / (2.0 * l)  # (d_out, m)
    if out_scale is not None:  # the same fit in the output-scaled space (docstring)
        dv = _f64(out_scale).reshape(-1, 1)
        W, A = W * dv, A * dv
    A_pinv = torch.linalg.pinv(A)  # (m, d_out)
    WCm = W if C is None else (_f64(WC) if WC is not None else W @ C)
    R = W - A @ (A_pinv @ W)  # (I - P) W
    RC = WCm - A @ (A_pinv @ WCm)  # (I - P) W C   (P is symmetric)
    if float(R.abs().max()) <= 1e-13 * float(W.abs().max().clamp_min(1e-300)):
        T = torch.zeros(d_out, m * hw, dtype=W.dtype, device=W.device)
        RCB = None
    else:
        RCB = kron_right(RC, U2, hw)
        # B C Bᵀ has rank <= d_in·hw < m·hw when the input-mode sketch is over-complete (m > d_in).
        T = _spd_solve_right(RCB, kron_gram(C, U2, hw), damp, singular=m > U2.shape[1])
    S1 = A_pinv @ (W - kron_left(T, U2, hw))
    e = float((RC * R).sum()) - (0.0 if RCB is None else float((T * RCB).sum()))
    if out_scale is not None:
        T = T / dv
    if not return_error:
        return S1, 2.0 * l * T
    return S1, 2.0 * l * T, max(e, 0.0)


def random_factors(
    d_out: int, d_in: int, m: int, l: int, hw: int, fan_in: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S1, S2)`` for training from scratch, variance-matched to the dense default init.

    ``nn.Linear``/``nn.Conv`` draw ``U(-1/√fan_in, 1/√fan_in)`` (variance ``σ² = 1/(3 fan_in)``).  An
    entry of ``U1ᵀS1`` sums ``m`` products of variance ``(1/k) s²``, i.e. ``l s²``; likewise
    ``S2 B2``; so ``Var Ŵ = 2 l s² / (2l)² = s²/(2l)`` and ``s² = 2 l σ²`` matches the dense layer.
    We draw S uniformly with that variance: bound ``√(3 · 2 l σ²) = √(2 l / fan_in)``.
    """
    bound = math.sqrt(2.0 * l / fan_in)
    S1 = (torch.rand(m, d_in * hw, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    S2 = (torch.rand(d_out, m * hw, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return S1, S2


def expected_sketch_error(d_in: int, d_out: int, k: int, l: int, dist: str = "rademacher") -> float:
    """``E‖Ŵ-W‖²/‖W‖²`` of the paper's ``"sketch"`` init (DESIGN §1; ``d_in`` = input channels).

    Rademacher: ``((d_in-1) + (d_out-1)) / (4 l k)``; Gaussian: ``(d_in + d_out + 2) / (4 l k)``.
    """
    if dist == "rademacher":
        return ((d_in - 1) + (d_out - 1)) / (4.0 * l * k)
    if dist == "gaussian":
        return (d_in + d_out + 2) / (4.0 * l * k)
    raise ValueError(f"unknown sketch distribution {dist!r}")


# --------------------------------------------------------------------------- whitened SVD
def _gram_factor(C: torch.Tensor, damp: float) -> torch.Tensor:
    """A lower-triangular ``L`` with ``L Lᵀ = C + λI`` (Cholesky of the damped Gram).

    Any square root of ``C`` serves for whitening since ``tr(Δ C Δᵀ) = ‖Δ L‖²_F``; Cholesky is
    several times cheaper than an eigendecomposition.  If the damped Gram is still not numerically
    positive definite we damp harder (×100 at a time) rather than fail.
    """
    d = damp
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(_damped(C, d))
        if int(info) == 0:
            return L
        d = max(d * 100.0, 1e-12)
    raise ValueError("the calibration Gram is not positive semi-definite (contains NaN/inf?)")


def _output_side(W: torch.Tensor, C: torch.Tensor | None) -> bool:
    """Whiten on the output side (eigh of ``W C Wᵀ``, ``d_out²``) when ``d_out`` is not larger than ``n``."""
    return C is None or W.shape[0] <= W.shape[1]


def svd_spectrum(W: torch.Tensor, gram: torch.Tensor | None = None, damp: float = DEFAULT_DAMP, *,
                 WC: torch.Tensor | None = None):
    """Singular values of ``W C^{1/2}`` (descending): the rank-r whitened fit has relative error
    ``Σ_{i>r} σ_i² / Σ σ_i²`` (Eckart–Young in the ``C``-weighted norm).  Computed from the
    eigenvalues of ``W C Wᵀ`` when ``d_out ≤ n`` (no factorisation of the ``n × n`` Gram); ``WC``
    (optional) is ``W @ gram``, when the caller already has it."""
    W = _f64(W)
    if gram is None:  # eigenvalues of the smaller of W Wᵀ and Wᵀ W: several times faster than svdvals
        ev = torch.linalg.eigvalsh(W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W)
        return torch.flip(ev.clamp_min(0).sqrt(), [0])
    C = _f64(gram)
    if _output_side(W, C):
        ev = torch.linalg.eigvalsh(((W @ C) if WC is None else _f64(WC)) @ W.T)
        return torch.flip(ev.clamp_min(0).sqrt(), [0])
    return torch.linalg.svdvals(W @ _gram_factor(C, damp))


def fit_svd(
    W: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damp: float = DEFAULT_DAMP, *,
    WC: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors ``(L, R)`` with ``W ≈ L R`` minimising ``tr((LR-W) C (LR-W)ᵀ)``.

    The optimum keeps the top-``r`` left singular vectors ``U_r`` of ``W C^{1/2}`` and projects:
    ``LR = U_r U_rᵀ W`` (Eckart–Young: the best rank-r approximation of ``W C^{1/2}`` is
    ``U_r U_rᵀ W C^{1/2}``).  ``U_r`` are the top eigenvectors of ``W C Wᵀ`` — a ``d_out × d_out``
    problem, so the ``n × n`` Gram is never factorised.  When ``d_out > n`` we use the Cholesky factor
    ``C + λI = Lc Lcᵀ`` and the SVD of ``W Lc`` instead (``WC``, optional: ``W @ gram`` when the
    caller has it).  Data-free (``C = I``) we take the
    eigenvectors of the smaller of ``W Wᵀ`` and ``Wᵀ W`` (right vectors ``V_r``, ``LR = W V_r V_rᵀ``),
    several times faster than an SVD of ``W`` for the 4096-wide layers of VGG-style nets.  Each
    component is scaled so that its columns of ``L`` and rows of ``R`` have equal norms
    (``L = U_r D``, ``R = D⁻¹ U_rᵀ W``).
    """
    W = _f64(W)
    d_out, n = W.shape
    if not 1 <= rank <= min(d_out, n):
        raise ValueError(f"rank must be in [1, {min(d_out, n)}] for a {d_out}x{n} weight, got {rank}")
    C = None if gram is None else _f64(gram)
    if C is None and d_out > n:  # data-free, wide input side: top right singular vectors from Wᵀ W
        V = torch.flip(torch.linalg.eigh(W.T @ W)[1][:, -rank:], [1])  # (n, r)
        L = W @ V
        scale = L.norm(dim=0).clamp_min(1e-300).sqrt()
        return L / scale, V.T * scale[:, None]
    if C is None:  # data-free: top left singular vectors from W Wᵀ (d_out ≤ n)
        U = torch.flip(torch.linalg.eigh(W @ W.T)[1][:, -rank:], [1])
    elif _output_side(W, C):
        evecs = torch.linalg.eigh(((W @ C) if WC is None else _f64(WC)) @ W.T)[1]
        U = torch.flip(evecs[:, -rank:], [1])
    else:
        U = torch.linalg.svd(W @ _gram_factor(C, damp), full_matrices=False)[0][:, :rank]
    R = U.T @ W
    scale = R.norm(dim=1).clamp_min(1e-300).sqrt()  # ‖L_i‖ = ‖R_i‖ = sqrt(‖U_iᵀ W‖)
    return U * scale, R / scale[:, None]
