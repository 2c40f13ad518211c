"""Calibration: batches in, streaming input Grams out.

A :class:`GramAccumulator` sums ``C = Σ x xᵀ`` over every input row a layer sees — for a Linear the
last-dimension vectors, for a conv the im2col patches (``F.unfold`` order ``(channel, kh, kw)``, the
order of ``weight.reshape(out, -1)``), one Gram per group.  Per-chunk products are computed in the
input dtype promoted to float32 and added into float64 accumulators.

Memory: a conv's patches are unfolded a few samples at a time so that the temporary patch matrix
stays under :data:`UNFOLD_BYTES` (256 MiB); the peak per layer is then that plus the Gram itself
(``groups · (C_in/groups · kh · kw)²`` float64 values, e.g. 170 MiB for a 512-channel 3×3 conv).

It also accumulates ``Σ ‖x‖⁴`` so the Ledoit–Wolf shrinkage intensity can be estimated without
keeping the samples (``Σ_i ‖x_i x_iᵀ - S‖²_F = Σ_i ‖x_i‖⁴ - N ‖S‖²_F`` with ``S = C/N``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UNFOLD_BYTES = 256 * 2**20
MAX_POSITIONS = 64  # default cap on conv output positions per sample used for Grams


def conv_rows(x: torch.Tensor, kernel, stride, padding, dilation, max_bytes: int = UNFOLD_BYTES,
              max_positions: int | None = None, seed: int = 0):
    """Yield im2col patch matrices ``(rows, C_in·prod(kernel))`` of an N-C-... input, a few samples at a
    time.  Conv1d inputs are treated as height-1 images.

    ``max_positions`` keeps a random subset of that many output positions per sample (the same
    subset for every call with the same ``seed`` and shapes): neighbouring patches overlap heavily, so
    a few hundred positions per image estimate the Gram nearly as well as all of them, at a fraction
    of the ``rows · n²`` cost."""
    if x.dim() == 3:  # conv1d: (N, C, L) -> (N, C, 1, L)
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
        padding = padding if isinstance(padding, str) else (0, padding[0])
    if isinstance(padding, str):
        padding = same_padding(padding, kernel, dilation)
    n, c = x.shape[:2]
    n_feat = c * math.prod(kernel)
    h_out = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    n_pos = math.prod(h_out)
    sample = max_positions is not None and n_pos > max_positions
    per_sample = n_feat * (max_positions if sample else n_pos) * 4
    chunk = max(1, int(max_bytes // max(per_sample, 1)))
    gen = torch.Generator().manual_seed(seed)
    if sample:
        xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    for s in range(0, n, chunk):
        if not sample:
            cols = F.unfold(x[s:s + chunk].float(), kernel, dilation=dilation, padding=padding, stride=stride)
            yield cols.transpose(1, 2).reshape(-1, n_feat)
            continue
        idx = torch.randperm(n_pos, generator=gen)[:max_positions]
        yield _patches_at(xp[s:s + chunk].float(), idx.to(x.device), kernel, stride, dilation, h_out[1])


def _patches_at(xp: torch.Tensor, idx: torch.Tensor, kernel, stride, dilation, w_out: int) -> torch.Tensor:
    """The im2col rows of a (padded) input at output positions ``idx`` only — what ``F.unfold``
    followed by a column selection gives, without unfolding every position: patch element
    ``(c, i, j)`` of output position ``(oy, ox)`` is ``xp[c, oy·s_y + i·d_y, ox·s_x + j·d_x]``."""
    n, c, _, width = xp.shape
    oy, ox = idx // w_out, idx % w_out
    ky = torch.arange(kernel[0], device=xp.device) * dilation[0]
    kx = torch.arange(kernel[1], device=xp.device) * dilation[1]
    rows = oy[:, None, None] * stride[0] + ky[None, :, None]
    cols = ox[:, None, None] * stride[1] + kx[None, None, :]
    flat = (rows * width + cols).reshape(-1)  # (P · kh · kw), position-major
    g = xp.flatten(2)[:, :, flat].reshape(n, c, idx.numel(), -1)  # (n, c, P, kh·kw)
    return g.permute(0, 2, 1, 3).reshape(n * idx.numel(), -1)


def same_padding(mode: str, kernel, dilation):
    if mode == "valid":
        return (0,) * len(kernel)
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError("padding='same' with an even effective kernel is asymmetric; not supported")
        pads.append(total // 2)
    return tuple(pads)


# --------------------------------------------------------------------------- accumulators
BLOCK = 512  # feature block of the symmetric Gram products (only blocks on or above the diagonal are computed)


def _edges(n: int) -> list[int]:
    b = max(1, round(n / BLOCK))
    return [round(i * n / b) for i in range(b + 1)]


def sym_add(X: torch.Tensor, upper: list[torch.Tensor], full: tuple[torch.Tensor, ...] = ()) -> None:
    """Add ``XᵀX`` (float32 products) into float64 matrices: into each of ``upper`` on and above the diagonal
    blocks only (:func:`_edges`; the caller mirrors them), into each of ``full`` entirely.  Computing
    only the upper block triangle halves the ``rows · n²`` flops of wide layers."""
    e = _edges(X.shape[1])
    for a, b in zip(e[:-1], e[1:]):
        blk = X[:, a:b].T @ X[:, a:]  # (b-a, n-a): the block row from the diagonal on
        for T in upper:
            T[a:b, a:].add_(blk)
        for T in full:
            T[a:b, a:].add_(blk)
            if b < X.shape[1]:
                T[b:, a:b].add_(blk[:, b - a:].T)


def mirror_upper(G: torch.Tensor, n: int) -> None:
    """Copy the blocks above the diagonal (of :func:`_edges`) onto those below, in place."""
    e = _edges(n)
    for i in range(len(e) - 1):
        a, b = e[i], e[i + 1]
        if b < n:
            G[b:, a:b].copy_(G[a:b, b:].T)


class GramAccumulator:
    """Streaming ``Σ x xᵀ`` per group (float64), with the counts needed for shrinkage.

    The products are accumulated on and above the diagonal blocks only (:func:`sym_add`); reading
    :attr:`gram` mirrors them into the full symmetric matrices."""

    def __init__(self, n_features: int, groups: int = 1, device=None, max_positions: int | None = MAX_POSITIONS):
        self.groups, self.n = int(groups), int(n_features)
        self.max_positions = max_positions
        self.calls = 0
        self._gram = torch.zeros(self.groups, self.n, self.n, dtype=torch.float64, device=device)
        self._mirrored = True
        self.count = 0  # rows
        self.samples = 0  # images / sequences the rows came from (rows of one sample are correlated)
        self.fourth = torch.zeros(self.groups, dtype=torch.float64, device=device)  # Σ ‖x‖⁴
        self.sum = torch.zeros(self.groups, self.n, dtype=torch.float64, device=device)  # Σ x
        self.sq_sum = torch.zeros(self.groups, self.n, dtype=torch.float64, device=device)  # Σ ‖x‖² x

    @property
    def gram(self) -> torch.Tensor:
        """``(groups, n, n)`` float64: ``Σ x xᵀ`` per group."""
        if not self._mirrored:
            for g in range(self.groups):
                mirror_upper(self._gram[g], self.n)
            self._mirrored = True
        return self._gram

    def add_rows(self, rows: torch.Tensor, also: tuple[torch.Tensor, ...] = (),
                 others: tuple[GramAccumulator, ...] = ()) -> None:
        """``rows``: ``(N, groups · n)`` with group-major features.  Every tensor of ``also`` (``(groups, n, n)``)
        receives the same ``xᵀx`` increments in full (:class:`CrossGramAccumulator` when ``x̂ = x``); every
        accumulator of ``others`` (the same shape: layers that read the same input) the same increments as this
        one, from one product."""
        mine = (self, *others)
        if any((o.groups, o.n) != (self.groups, self.n) for o in others):
            raise ValueError("accumulators sharing rows must have the same groups and features")
        r = rows.detach().reshape(rows.shape[0], self.groups, self.n).float()
        for acc in mine:
            acc._mirrored = False
        for g in range(self.groups):
            xg = r[:, g]
            sym_add(xg, [acc._gram[g] for acc in mine], tuple(t[g] for t in also))
            a = xg.square().sum(1)  # ‖x‖² per row
            fourth = float(a.square().sum(dtype=torch.float64))
            total, sq = xg.sum(0, dtype=torch.float64), (a @ xg).double()
            for acc in mine:
                acc.fourth[g] += fourth
                acc.sum[g] += total
                acc.sq_sum[g] += sq
        for acc in mine:
            acc.count += rows.shape[0]

    def add_conv_input(self, x: torch.Tensor, kernel, stride, padding, dilation) -> None:
        """Add the im2col patches of a conv input (per group: channel slices of the patch rows)."""
        # unfold order is (channel, kh, kw), so group g's features are the contiguous block
        # [g n, (g+1) n) of each patch row — exactly what add_rows splits.
        self.calls += 1
        self.samples += x.shape[0]
        for rows in conv_rows(x.detach(), kernel, stride, padding, dilation, max_positions=self.max_positions,
                              seed=self.calls):
            self.add_rows(rows)

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def ledoit_wolf(self) -> torch.Tensor:
        """Ledoit–Wolf shrinkage intensity per group for the *centred* covariance
        ``S = C/N - x̄x̄ᵀ``: ``α = min(1, β²/δ²)``, ``β² = (Σ‖x_i - x̄‖⁴/N - ‖S‖²)/N``,
        ``δ² = ‖S - μI‖²``, ``μ = tr S / n`` (Ledoit & Wolf, "A well-conditioned estimator for
        large-dimensional covariance matrices", 2004).  Centring matters: inputs after a ReLU have a
        large mean, whose rank-one term would dominate ``δ²`` and make ``α`` far too small.
        ``Σ‖x_i - x̄‖⁴`` comes from streamed moments: with ``a = ‖x‖²``, ``b = xᵀx̄``, ``c = ‖x̄‖²``,
        ``Σ(a - 2b + c)² = Σa² - 4 x̄ᵀ(Σ a x) + 4 x̄ᵀCx̄ + 2c tr C - 4N c² + N c²``."""
        N = max(self.count, 1)
        out = torch.zeros(self.groups, dtype=torch.float64)
        for g in range(self.groups):
            xbar = self.sum[g] / N
            c = float(xbar @ xbar)
            C = self.gram[g]
            # ‖S‖² and tr S of S = C/N - x̄x̄ᵀ without forming S (n² values: a second of memory traffic
            # for the 4608-wide Grams of ResNet-50's last stage)
            flat = C.reshape(-1)
            xCx = float(xbar @ C @ xbar)
            tr_s = float(torch.trace(C)) / N - c
            s2 = float(flat @ flat) / (N * N) - 2 * xCx / N + c * c
            mu = tr_s / self.n
            delta2 = s2 - mu * mu * self.n  # ‖S - μI‖²
            fourth_c = (self.fourth[g] - 4 * float(xbar @ self.sq_sum[g]) + 4 * xCx
                        + 2 * c * float(torch.trace(C)) - 3 * N * c * c)
            beta2 = (fourth_c / N - s2) / N
            # Rows of one conv input (overlapping patches) are far from independent: the sampling noise
            # of S is that of ~N_eff = samples·√(rows per sample) rows, not of N rows (an empirical
            # middle ground between fully dependent and independent positions).
            if self.samples and N > self.samples:
                beta2 = beta2 * math.sqrt(N / self.samples)
            out[g] = 1.0 if delta2 <= 0 else float(torch.clamp(beta2 / delta2, 0.0, 1.0))
        return out

    def alphas(self, alpha: float | str = "auto") -> torch.Tensor:
        return self.ledoit_wolf() if alpha == "auto" else torch.full((self.groups,), float(alpha), dtype=torch.float64)

    def shrunk(self, alpha: float | str = "auto") -> torch.Tensor:
        """The Grams with their centred part shrunk toward a scaled identity (the mean kept):
        ``C_s = N [x̄x̄ᵀ + (1-α) S + α μ I] = (1-α) C + α N (x̄x̄ᵀ + μ I)``; ``alpha="auto"`` is
        Ledoit–Wolf."""
        al = self.alphas(alpha)
        return torch.stack([shrink_centered(self.gram[g], self.gram[g], self.sum[g], self.sum[g], self.count,
                                            float(al[g])) for g in range(self.groups)])


def shrink_centered(M: torch.Tensor, C: torch.Tensor, sum_x: torch.Tensor, sum_y: torch.Tensor, count: int,
                    alpha: float, left: torch.Tensor | None = None) -> torch.Tensor:
    """``(1-α) M + α N (x̄ ȳᵀ + μ I)`` with ``μ = tr(C/N - ȳȳᵀ)/n`` from the Gram ``C`` of the ``y``s.

    For ``M = C`` (``x = y``) this is the shrunk Gram; for the cross Gram ``M = Σ x yᵀ`` of the refit
    it is the matching shrinkage, so that ``x = y`` gives ``M_s = C_s`` exactly.

    With ``left`` (an ``r × n`` matrix ``A``), ``M`` is given as ``A M`` and the result is ``A`` times the
    shrunk ``M``: ``(1-α) A M + α N (A x̄ ȳᵀ + μ A)``, without ever forming the ``n × n`` ``M``."""
    N = max(count, 1)
    n = C.shape[0]
    ybar = sum_y / N
    mu = float((torch.trace(C) / N - ybar @ ybar) / n)
    out = M * (1 - alpha)  # one allocation; the rest in place (this runs on 4608² Grams)
    out.addr_(sum_x / N if left is None else left @ (sum_x / N), ybar, alpha=alpha * N)
    if left is None:
        out.diagonal().add_(alpha * N * mu)
    else:
        out.add_(left, alpha=alpha * N * mu)
    return out


class CrossGramAccumulator:
    """Streaming ``Σ x x̂ᵀ`` and ``Σ x̂ x̂ᵀ`` for the asymmetric refit (original ``x``, compressed-model
    input ``x̂`` of the same layer on the same sample), per group.

    With ``weight`` (the layer's im2col weight, ``(d_out, n)`` per group stacked: ``(groups · co, n)``)
    only ``W M = Σ (W x) x̂ᵀ`` is kept (:attr:`wcross`, ``(groups, co, n)``) — all the refit needs, at
    ``2·rows·co·n`` flops per batch instead of ``rows·n²`` for ``M`` itself (4.5× fewer for a
    512-channel 3×3 conv); :attr:`cross` is then ``None``."""

    def __init__(self, n_features: int, groups: int = 1, max_positions: int | None = MAX_POSITIONS,
                 weight: torch.Tensor | None = None):
        self.hat = GramAccumulator(n_features, groups, max_positions=max_positions)
        self.weight = None
        self.cross = self.wcross = None
        if weight is None:
            self.cross = torch.zeros(groups, n_features, n_features, dtype=torch.float64)
        else:
            w = weight.detach().float().reshape(weight.shape[0], -1)
            if w.shape[1] != n_features or w.shape[0] % groups:
                raise ValueError(f"weight {tuple(w.shape)} does not match {groups} group(s) of {n_features} features")
            self.weight = w.reshape(groups, w.shape[0] // groups, n_features)
            self.wcross = torch.zeros(groups, w.shape[0] // groups, n_features, dtype=torch.float64)
        self.sum = torch.zeros(groups, n_features, dtype=torch.float64)  # Σ x (original inputs)
        self.identical = True  # every x̂ so far was x itself: Σ x x̂ᵀ = Σ x̂ x̂ᵀ exactly

    def add_rows(self, rows: torch.Tensor, rows_hat: torch.Tensor, others: tuple[CrossGramAccumulator, ...] = ()) \
            -> None:
        """Add one batch of row pairs.  ``others``: accumulators (same groups and features) of layers that read
        the very same ``x`` and ``x̂`` (the q/k/v projections of one hidden state): each gets the same
        increments as if it had been given the rows itself, from one ``x̂ᵀx̂`` product for all and one ``xᵀx̂``
        product for those that keep :attr:`cross`."""
        mine = (self, *others)
        if any((o.hat.groups, o.hat.n) != (self.hat.groups, self.hat.n) for o in others):
            raise ValueError("accumulators sharing rows must have the same groups and features")
        G, n = self.hat.groups, self.hat.n
        if rows_hat is not rows:
            for acc in mine:
                if acc.identical:
                    acc.identical = False
                    if acc.wcross is not None and acc.hat.count:  # so far Σ x x̂ᵀ was the Gram itself
                        for g in range(G):
                            acc.wcross[g] += acc.weight[g].double() @ acc.hat.gram[g]
        r = rows.detach().reshape(rows.shape[0], G, n).float()
        rh = r if rows_hat is rows else rows_hat.detach().reshape(rows.shape[0], G, n).float()
        hats = tuple(acc.hat for acc in others)
        if rows_hat is rows:  # Σ x x̂ᵀ = Σ x̂ x̂ᵀ: one product per group; W M = W Σ x xᵀ is formed from the Gram
            # if x̂ ever differs (above)
            self.hat.add_rows(rows, also=tuple(acc.cross for acc in mine if acc.cross is not None), others=hats)
            for g in range(G):
                for acc in mine:
                    if acc.wcross is not None and not acc.identical:  # x̂ differed in an earlier batch
                        acc.wcross[g].add_((r[:, g] @ acc.weight[g].T).T @ r[:, g])
        else:
            self.hat.add_rows(rh.reshape(rows.shape[0], G * n), others=hats)
            crossing = [acc for acc in mine if acc.cross is not None]
            for g in range(G):
                if crossing:
                    m = r[:, g].T @ rh[:, g]
                    for acc in crossing:
                        acc.cross[g].add_(m)
                for acc in mine:
                    if acc.wcross is not None:
                        acc.wcross[g].add_((r[:, g] @ acc.weight[g].T).T @ rh[:, g])
        for g in range(G):
            total = r[:, g].sum(0, dtype=torch.float64)
            for acc in mine:
                acc.sum[g] += total

    def add_conv_inputs(self, x, x_hat, kernel, stride, padding, dilation) -> None:
        self.hat.calls += 1
        self.hat.samples += x.shape[0]
        mp, seed = self.hat.max_positions, self.hat.calls  # same positions for x and x̂
        if x_hat is x:
            for rows in conv_rows(x.detach(), kernel, stride, padding, dilation, max_positions=mp, seed=seed):
                self.add_rows(rows, rows)
            return
        for rows, rows_hat in zip(conv_rows(x.detach(), kernel, stride, padding, dilation, max_positions=mp, seed=seed),
                                  conv_rows(x_hat.detach(), kernel, stride, padding, dilation, max_positions=mp,
                                            seed=seed)):
            self.add_rows(rows, rows_hat)
