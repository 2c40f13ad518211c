"""Parameter and MAC formulas (sketchpass.sketch.cost) against counts taken from real modules."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sketchpass as sp
from sketchpass.sketch import cost


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward pass as counted by torch's own FLOP counter (FLOPs = 2 MACs)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def test_linear_counts():
    assert cost.dense_params(40, 30, bias=True) == 40 * 30 + 40
    assert cost.sketch_params(40, 30, m=8, bias=True) == 8 * 70 + 40
    assert cost.sketch_macs(40, 30, m=8) == 2 * 8 * 70
    assert _macs(sp.SKLinear(30, 40, k=4, l=2), torch.randn(1, 30)) == cost.sketch_macs(40, 30, m=8)
    assert cost.svd_params(40, 30, rank=5) == 5 * 70
    layer = sp.SKLinear(30, 40, k=4, l=2)
    assert sum(p.numel() for p in layer.parameters()) == cost.sketch_params(40, 30, 8, bias=True)


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 1, 1), (1, 1, 2, 2), (4, 2, 0, 1)])
def test_conv_params_and_macs_match_the_modules(groups, stride, padding, dilation):
    ci, co, k, l = 16, 24, 3, 2
    sk = sp.SKConv2d(ci, co, 3, k=k, l=l, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert sum(p.numel() for p in sk.parameters()) == cost.sketch_params(co, ci, k * l, 9, groups, True)
    x = torch.randn(1, ci, 13, 11)
    y = sk(x)
    p_out, p_in = y.shape[2] * y.shape[3], x.shape[2] * x.shape[3]
    assert _macs(sk, x) == cost.sketch_macs(co, ci, k * l, 9, groups, p_in, p_out)
    lr = sp.LowRankConv2d(ci, co, 3, rank=5, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert sum(p.numel() for p in lr.parameters()) == cost.svd_params(co, ci, 5, 9, groups, True)
    assert _macs(lr, x) == cost.svd_macs(co, ci, 5, 9, groups, p_out)
    dense = nn.Conv2d(ci, co, 3, stride, padding, dilation, groups)
    assert _macs(dense, x) == cost.dense_macs(co, ci, 9, groups, p_out)
    assert sum(p.numel() for p in dense.parameters()) == cost.dense_params(co, ci, 9, groups, True)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        cost.dense_params(8, 8, groups=3)
