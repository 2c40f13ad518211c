"""Calibration helpers: im2col rows at sampled positions."""

import pytest
import torch
import torch.nn.functional as F

from sketchpass.calib import GramAccumulator, _patches_at, conv_rows


@pytest.mark.parametrize("k,s,p,d,hw", [((3, 3), (1, 1), (1, 1), (1, 1), (9, 11)),
                                        ((3, 5), (2, 1), (2, 0), (1, 2), (13, 17)),
                                        ((1, 1), (2, 2), (0, 0), (1, 1), (8, 8)),
                                        ((7, 7), (2, 2), (3, 3), (1, 1), (30, 30))])
def test_patches_at_equal_unfold_columns(k, s, p, d, hw):
    torch.manual_seed(0)
    x = torch.randn(3, 4, *hw)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    idx = torch.randperm(cols.shape[2])[:5]
    ref = cols[:, :, idx].transpose(1, 2).reshape(-1, cols.shape[1])
    w_out = (hw[1] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    got = _patches_at(F.pad(x, (p[1], p[1], p[0], p[0])), idx, k, s, d, w_out)
    assert torch.equal(ref, got)


def test_conv_rows_sampling_is_repeatable_and_capped():
    x = torch.randn(5, 3, 12, 12)
    a = torch.cat(list(conv_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), max_positions=7, seed=3, max_bytes=2000)))
    b = torch.cat(list(conv_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), max_positions=7, seed=3, max_bytes=2000)))
    assert torch.equal(a, b) and a.shape == (5 * 7, 27)
    full = torch.cat(list(conv_rows(x, (3, 3), (1, 1), (1, 1), (1, 1))))
    assert full.shape == (5 * 144, 27)
    # every sampled row is one of the full im2col rows of the same sample
    for i in range(5):
        rows_i, full_i = a[i * 7:(i + 1) * 7], full[i * 144:(i + 1) * 144]
        assert all((full_i == r).all(1).any() for r in rows_i)


def test_gram_of_conv_input_matches_unfold():
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    acc = GramAccumulator(2 * 9, max_positions=None)
    acc.add_conv_input(x, (3, 3), (1, 1), (1, 1), (1, 1))
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(acc.gram[0], cols.T @ cols, rtol=1e-5, atol=1e-5)


def test_wide_grams_accumulate_upper_blocks_and_read_back_full_and_symmetric():
    """Wide layers (n spanning several feature blocks) accumulate only the blocks on and above the
    diagonal; reads mirror them, further adds after a read still count, and the refit's cross Gram gets
    the full increment while x̂ = x and the plain product after."""
    from sketchpass.calib import BLOCK, CrossGramAccumulator

    g = torch.Generator().manual_seed(0)
    n, G = 2 * BLOCK + 300, 2
    X = torch.randn(200, G * n, generator=g)
    Y = X + 0.1 * torch.randn(X.shape, generator=g)
    ref = [X[:, i * n:(i + 1) * n].double() for i in range(G)]
    acc = GramAccumulator(n, G)
    acc.add_rows(X[:120])
    first = acc.gram.clone()
    acc.add_rows(X[120:])
    for i in range(G):
        torch.testing.assert_close(first[i], ref[i][:120].T @ ref[i][:120], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(acc.gram[i], ref[i].T @ ref[i], rtol=1e-5, atol=1e-3)
        assert torch.equal(acc.gram[i], acc.gram[i].T)
    cross = CrossGramAccumulator(n, G)
    cross.add_rows(X, X)
    assert cross.identical
    cross.add_rows(X, Y)
    assert not cross.identical
    for i in range(G):
        yi = Y[:, i * n:(i + 1) * n].double()
        torch.testing.assert_close(cross.cross[i], ref[i].T @ ref[i] + ref[i].T @ yi, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(cross.hat.gram[i], ref[i].T @ ref[i] + yi.T @ yi, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("groups", [1, 2])
def test_weighted_cross_gram_equals_weight_times_cross_gram(groups):
    """The refit keeps only W M = Σ (W x) x̂ᵀ; it must equal W times the full cross Gram, including when
    x̂ = x for the first batches and differs after (the Gram part is folded in at the switch)."""
    from sketchpass.calib import CrossGramAccumulator

    g = torch.Generator().manual_seed(1)
    n, co = 40, 6
    W = torch.randn(groups * co, n, generator=g)
    full, lean = CrossGramAccumulator(n, groups), CrossGramAccumulator(n, groups, weight=W)
    X1, X2 = torch.randn(30, groups * n, generator=g), torch.randn(25, groups * n, generator=g)
    X2h = X2 + 0.2 * torch.randn(X2.shape, generator=g)
    for acc in (full, lean):
        acc.add_rows(X1, X1)
        acc.add_rows(X2, X2h)
    assert lean.cross is None and not lean.identical
    for i in range(groups):
        Wg = W[i * co:(i + 1) * co].double()
        torch.testing.assert_close(lean.wcross[i], Wg @ full.cross[i], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lean.hat.gram[i], full.hat.gram[i])
    with pytest.raises(ValueError, match="does not match"):
        CrossGramAccumulator(n + 1, groups, weight=W)


@pytest.mark.parametrize("groups", [1, 2])
def test_accumulators_sharing_rows_get_what_each_would_alone(groups):
    """Layers that read the same x and x̂ (q/k/v) share one accumulation: every accumulator, with the full cross
    Gram or only W M, ends exactly where it would from the rows alone — through x̂ = x, x̂ ≠ x, then x̂ = x again."""
    from sketchpass.calib import CrossGramAccumulator

    g = torch.Generator().manual_seed(2)
    n = 24
    Ws = [torch.randn(groups * co, n, generator=g) for co in (24, 8)]
    X = [torch.randn(30, groups * n, generator=g) for _ in range(3)]
    Xh = X[1] + 0.3 * torch.randn(X[1].shape, generator=g)
    pairs = [(X[0], X[0]), (X[1], Xh), (X[2], X[2])]

    def make():
        return [CrossGramAccumulator(n, groups), CrossGramAccumulator(n, groups, weight=Ws[0]),
                CrossGramAccumulator(n, groups, weight=Ws[1])]

    alone, shared = make(), make()
    for x, xh in pairs:
        for acc in alone:
            acc.add_rows(x, xh)
        shared[1].add_rows(x, xh, others=(shared[0], shared[2]))
    for a, b in zip(alone, shared):
        assert a.identical == b.identical is False
        assert a.hat.count == b.hat.count == 90
        for name in ("cross", "wcross", "sum"):
            if getattr(a, name) is not None:
                torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-5)
        for name in ("gram", "sum", "sq_sum", "fourth"):
            torch.testing.assert_close(getattr(b.hat, name), getattr(a.hat, name), rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="same groups and features"):
        shared[0].add_rows(X[0], X[0], others=(CrossGramAccumulator(n + 1, groups),))


def test_calibration_passes_use_channels_last_only_when_the_model_allows():
    from torch import nn

    from sketchpass.batches import prefer_channels_last

    class Viewer(nn.Module):  # .view() on an activation: breaks in channels-last layout
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], -1))

    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    out = prefer_channels_last(conv, batches)
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in out)
    assert all(torch.equal(a, b) for a, b in zip(out, batches))  # same values, other layout
    kept = prefer_channels_last(Viewer().eval(), batches)
    assert all(a is b for a, b in zip(kept, batches))
    tokens = [torch.randn(4, 5, 8)]  # no 4-D input: nothing to do
    assert prefer_channels_last(conv, tokens) is tokens
    nested = [{"x": batches[0], "n": torch.tensor(3)}]
    model = nn.Module()
    model.forward = lambda x, n: conv(x) * n
    got = prefer_channels_last(model, nested)
    assert got[0]["x"].is_contiguous(memory_format=torch.channels_last) and got[0]["n"] is nested[0]["n"]


def test_move_batch_moves_every_tensor_and_keeps_the_structure():
    from sketchpass.batches import move_batch

    batch = {"x": torch.randn(2, 3), "pair": (torch.ones(1), [torch.zeros(2, dtype=torch.int64), "tag"]), "n": 3}
    out = move_batch(batch, "meta")
    assert out["x"].device.type == "meta" and out["x"].shape == (2, 3)
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert out["pair"][0].device.type == "meta" and out["pair"][1][0].dtype == torch.int64
    assert out["pair"][1][1] == "tag" and out["n"] == 3
    assert batch["x"].device.type == "cpu"  # the input is not modified


def test_shrink_centered_with_left_factor_equals_the_product_of_the_shrunk_matrix():
    from sketchpass.calib import shrink_centered

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 6, generator=g, dtype=torch.float64)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64)
    M, C = X.T @ Y, Y.T @ Y
    args = (C, X.sum(0), Y.sum(0), 50, 0.3)
    full = shrink_centered(M, *args)
    torch.testing.assert_close(shrink_centered(A @ M, *args, left=A), A @ full, rtol=1e-12, atol=1e-12)
    # and the plain form: (1-α) M + α N (x̄ ȳᵀ + μ I)
    xbar, ybar = X.mean(0), Y.mean(0)
    mu = float(torch.trace(C / 50 - torch.outer(ybar, ybar))) / 6
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(full, 0.7 * M + 0.3 * 50 * (torch.outer(xbar, ybar) + mu * eye))
