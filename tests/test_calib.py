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
