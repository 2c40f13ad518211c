"""Parameter and MAC counts of the dense, sketch and low-rank forms of one layer (DESIGN §1).

Shapes are given for the whole layer: ``d_out`` output channels, ``d_in`` input channels,
``hw = prod(kernel)`` (1 for a Linear), ``groups`` (each group is sketched independently with ``m``
rows, so the layer holds ``groups * m`` sketch rows).  ``p_in``/``p_out`` are the numbers of
input/output positions per sample (pixels for a conv, tokens for a Linear on a sequence, 1 for a
plain Linear).  Effective parameters are the trainable ones: the sketches ``U`` are regenerated from
the seed and never counted.  Bias is counted in every form (it is kept as is).
"""

from __future__ import annotations


def _per_group(d_out: int, d_in: int, groups: int) -> tuple[int, int]:
    if d_out % groups or d_in % groups:
        raise ValueError(f"channels ({d_in} in, {d_out} out) are not divisible by groups={groups}")
    return d_out // groups, d_in // groups


def dense_params(d_out: int, d_in: int, hw: int = 1, groups: int = 1, bias: bool = False) -> int:
    o, i = _per_group(d_out, d_in, groups)
    return groups * o * i * hw + (d_out if bias else 0)


def sketch_params(d_out: int, d_in: int, m: int, hw: int = 1, groups: int = 1, bias: bool = False) -> int:
    """FC: ``m (d_in + d_out)``; CONV: ``m hw (d_in + d_out)`` per group (+ bias)."""
    o, i = _per_group(d_out, d_in, groups)
    return groups * m * hw * (i + o) + (d_out if bias else 0)


def svd_params(d_out: int, d_in: int, rank: int, hw: int = 1, groups: int = 1, bias: bool = False) -> int:
    """Chain ``d_in·hw → r → d_out`` per group (+ bias)."""
    o, i = _per_group(d_out, d_in, groups)
    return groups * rank * (i * hw + o) + (d_out if bias else 0)


def dense_macs(d_out: int, d_in: int, hw: int = 1, groups: int = 1, p_out: int = 1) -> int:
    o, i = _per_group(d_out, d_in, groups)
    return p_out * groups * o * i * hw


def sketch_macs(
    d_out: int, d_in: int, m: int, hw: int = 1, groups: int = 1, p_in: int = 1, p_out: int = 1
) -> int:
    """Two-branch SK form, per group:
    ``P_out m (hw d_in + d_out)`` (branch 1: S1 conv then U1ᵀ) ``+ P_in m d_in`` (U2 at every input
    position) ``+ P_out m hw d_out`` (S2 conv).  FC (``hw = P = 1``): ``2 m (d_in + d_out)``."""
    o, i = _per_group(d_out, d_in, groups)
    return groups * (p_out * m * (hw * i + o) + p_in * m * i + p_out * m * hw * o)


def svd_macs(d_out: int, d_in: int, rank: int, hw: int = 1, groups: int = 1, p_out: int = 1) -> int:
    o, i = _per_group(d_out, d_in, groups)
    return p_out * groups * rank * (i * hw + o)
