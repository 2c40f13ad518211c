"""Candidate errors (no graphs): the all-sizes-at-once sketch errors equal one real fit per size."""

import pytest
import torch

from sketchpass.candidates import nested_sketch_errors, sketch_error, sketch_forms, svd_error_curve
from sketchpass.plan import LayerSpec
from sketchpass.sketch.fit import svd_spectrum

D = torch.float64


def _gram(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g, dtype=D) * torch.logspace(0, -1.5, n, dtype=D) + 0.3
    return (X.T @ X)[None]


CASES = [  # (spec, weight shape)
    (LayerSpec("fc", "linear", d_in=48, d_out=40), (40, 48)),
    (LayerSpec("conv", "conv2d", d_in=12, d_out=20, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
               dilation=(1, 1)), (20, 12, 3, 3)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("calibrated", [True, False])
def test_nested_sketch_errors_equal_one_fit_per_size(case, calibrated):
    spec, shape = CASES[case]
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(case), dtype=D)
    n = spec.d_in * spec.hw
    grams = _gram(3 * n, n, seed=7) if calibrated else None
    init = "calibrated" if calibrated else "lstsq"
    for l in (1, 2):
        ms = [m for m in (2, 4, 6, 8, 10) if m % l == 0]
        nested = nested_sketch_errors(spec, W, grams, ms, l, seed=3, dist="rademacher", init=init)
        assert nested is not None and sorted(nested) == ms
        for m in ms:
            ref = sketch_error(spec, W, grams, m, l, 3, "rademacher", init)
            assert abs(nested[m] - ref) <= 1e-8 * max(ref, 1e-12), (m, l, nested[m], ref)
        assert all(nested[a] >= nested[b] - 1e-12 for a, b in zip(ms, ms[1:]))  # more rows never hurt


def test_nested_sketch_errors_decline_where_the_shortcut_does_not_hold():
    spec, shape = CASES[0]
    W = torch.randn(*shape, dtype=D)
    grams = _gram(200, 48, seed=1)
    assert nested_sketch_errors(spec, W, grams, [8, 40], 1, 0, "rademacher", "calibrated") is None  # m >= d_out
    assert nested_sketch_errors(spec, W, grams, [8], 1, 0, "rademacher", "sketch") is None  # not an optimal fit
    assert nested_sketch_errors(spec, W, grams, [8], 1, 0, "rademacher", "lstsq") is None  # unweighted fit
    grouped = LayerSpec("g", "conv2d", d_in=8, d_out=8, kernel=(1, 1), stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1), groups=2)
    assert nested_sketch_errors(grouped, torch.randn(8, 4, 1, 1, dtype=D), None, [2], 1, 0, "rademacher",
                                "lstsq") is None
    # sketch_forms still answers for every size (size by size) where the shortcut declines
    forms = sketch_forms(grouped, torch.randn(8, 4, 1, 1, dtype=D), None, ("params",), 1, 1, 0, "rademacher",
                         "lstsq", 8)
    assert forms and all(f.error >= 0 for f in forms)


def test_svd_curve_reuses_the_weighted_product():
    spec, shape = CASES[1]
    W = torch.randn(*shape, dtype=D)
    grams = _gram(300, spec.d_in * spec.hw, seed=2)
    Wm = W.reshape(spec.d_out, -1)
    plain = svd_error_curve(spec, W, grams)
    shared = svd_error_curve(spec, W, grams, [(Wm, grams[0], Wm @ grams[0], 0.0)])
    for r in (1, 5, 12):
        assert abs(plain(r) - shared(r)) < 1e-12
    assert torch.allclose(svd_spectrum(Wm, grams[0]), svd_spectrum(Wm, grams[0], WC=Wm @ grams[0]))


def test_output_weighted_fits_minimise_the_weighted_error_and_the_predictions_match():
    """With ``out_scale`` (a per-channel scale after the layer, e.g. a BatchNorm) the svd and sketch fits
    minimise the error after that scale: their weighted error is below the plain fits', and the nested
    sketch shortcut predicts what a real weighted fit gives."""
    from sketchpass.layers import factor_module
    from sketchpass.sketch.fit import relative_error

    g = torch.Generator().manual_seed(3)
    spec = LayerSpec("w", "linear", 40, 24)
    lin = torch.nn.Linear(40, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 40, generator=g))
    X = torch.randn(500, 40, generator=g, dtype=torch.float64)
    C = X.T @ X
    d = torch.logspace(-1.5, 1, 24, dtype=torch.float64)[torch.randperm(24, generator=g)]
    Wd = lin.weight.double() * d[:, None]

    def weighted(mod):
        return relative_error(Wd, mod.materialize().double() * d[:, None], C)

    for method, size in (("svd", {"rank": 6}), ("sketch", {"k": 8})):
        plain = factor_module(lin, method, gram=C[None], name="w", **size)
        aware = factor_module(lin, method, gram=C[None], name="w", out_scale=d, **size)
        assert weighted(aware) < 0.9 * weighted(plain), method
    errs = nested_sketch_errors(spec, lin.weight, C[None], [8, 16], 1, 0, "rademacher", "calibrated", out_scale=d)
    for m in (8, 16):
        one = sketch_error(spec, lin.weight, C[None], m, 1, 0, "rademacher", "calibrated", out_scale=d)
        assert errs[m] == pytest.approx(one, rel=1e-6)
        got = weighted(factor_module(lin, "sketch", k=m, gram=C[None], name="w", out_scale=d))
        assert got == pytest.approx(one, rel=1e-4)
    assert svd_error_curve(spec, lin.weight, C[None], out_scale=d)(6) == pytest.approx(
        weighted(factor_module(lin, "svd", rank=6, gram=C[None], out_scale=d)), rel=1e-6)
