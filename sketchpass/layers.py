"""Sketched and low-rank ``nn.Module``s (DESIGN §1–2).

* :class:`SKLinear` — SK-FC: ``y = 1/(2l) (U1ᵀ (S1 x) + S2 (U2 x)) + b``.
* :class:`SKConv2d` / :class:`SKConv1d` — SK-CONV, two branches summed and scaled by ``1/(2l)``:
  (1) an ``h×w`` conv ``d_in → m`` with trainable ``S1`` then a fixed ``1×1`` conv ``m → d_out``
  with ``U1ᵀ``; (2) a fixed ``1×1`` conv ``d_in → m`` with ``U2`` then an ``h×w`` conv ``m → d_out``
  with trainable ``S2``.  Grouped convs use one independent sketch per group.
* :class:`LowRankLinear`, :class:`LowRankConv2d`, :class:`LowRankConv1d` — the chains of the
  ``"svd"`` method (``d_in → r → d_out``; conv: ``h×w`` conv then ``1×1`` conv).

The sketches ``U1``/``U2`` are *non-persistent* buffers generated from ``(seed, name, branch)`` by
:mod:`sketchpass.sketch.random`, so ``state_dict()`` holds exactly the effective parameters (``S1``,
``S2``, ``bias``).  They follow ``.to()``/``.half()`` like any buffer and :meth:`reset_sketches`
rebuilds them from the seed.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .sketch import cost
from .sketch.fit import INITS, fit_sketch, fit_svd, random_factors, sketch_materialize
from .sketch.random import DISTRIBUTIONS, layer_key, sketch_tensor


def _generator(seed: int, name: str, tag: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(layer_key(seed, name, tag) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _check_sizes(k: int, l: int, dist: str) -> None:
    if int(k) < 1 or int(l) < 1:
        raise ValueError(f"sketch sizes must be positive integers, got k={k}, l={l}")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown sketch distribution {dist!r}; expected one of {DISTRIBUTIONS}")


class _SKBase(nn.Module):
    """Shared sketch bookkeeping: sizes, seed, the ``U`` buffers and their regeneration."""

    k: int
    l: int
    seed: int
    name: str
    dist: str

    def _init_sketch_attrs(self, k: int, l: int, seed: int, name: str, dist: str) -> None:
        _check_sizes(k, l, dist)
        self.k, self.l, self.seed, self.name, self.dist = int(k), int(l), int(seed), str(name), dist

    @property
    def m(self) -> int:
        """Rows of the stacked sketches per group, ``m = l k``."""
        return self.k * self.l

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``Ŵ`` (:meth:`materialize`), formed when read — for code that reads a layer's
        weight (its dtype or device, as transformers' T5 and ViT forwards do); the layer's own forward never
        forms it."""
        return self.materialize()

    def _sketch_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def reset_sketches(self) -> None:
        """(Re)generate ``U1``, ``U2`` from ``(seed, name, branch)``, keeping device and dtype."""
        ref = next((p for p in self.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        for branch, shape in self._sketch_shapes().items():
            u = sketch_tensor(self.seed, self.name, branch, shape, self.k, self.dist, dtype=dtype, device=device)
            self.register_buffer(branch, u, persistent=False)

    def signs(self, branch: str) -> tuple[torch.Tensor, float, bool]:
        """``(Σ, c, exact)`` with ``U = c·Σ``: for Rademacher sketches ``Σ`` is the exact ``±1`` matrix and
        ``c = 1/√k``; for Gaussian ones ``Σ = U``, ``c = 1`` and ``exact`` is False."""
        U = getattr(self, branch)
        if self.dist == "rademacher":
            return torch.sign(U), 1.0 / math.sqrt(self.k), True
        return U, 1.0, False

    def folded(self) -> dict:
        """The factors the forward pass multiplies, with every scale folded into the trainable ones:
        ``S1f = S1·c/(2l)``, ``S2f = S2·c/(2l)`` and the sketches as ``Σ1``, ``Σ2`` (exact ``±1`` for
        Rademacher, so an exporter can store them as bits); ``signs`` says whether they are ``±1``.
        The torch forward and the ONNX emitter both use exactly these tensors."""
        sig1, c1, e1 = self.signs("U1")
        sig2, c2, e2 = self.signs("U2")
        return {"S1f": self.S1 * (c1 / (2.0 * self.l)), "S2f": self.S2 * (c2 / (2.0 * self.l)), "Sig1": sig1,
                "Sig2": sig2, "signs": e1 and e2}

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda(): regenerate the sketches in the new dtype instead of casting the old
        # ones, so a float32 -> float64 round trip still gives the exact float64 sketch.
        out = super()._apply(fn, *args, **kwargs)
        self.reset_sketches()
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        # The sketches are not in the state dict; make sure they match this module's seed/dtype.
        self.reset_sketches()


# --------------------------------------------------------------------------- SK-FC
class SKLinear(_SKBase):
    """SK-FC layer: ``Ŵ = 1/(2l) (U1ᵀ S1 + S2 U2)``, computed as two thin GEMMs
    ``y = A (B x) + b`` with ``B = [S1; U2]`` (``2m × d_in``) and ``A = [U1ᵀ | S2] / (2l)``.

    The constructor initialises ``S`` for training from scratch (variance-matched to
    ``nn.Linear``'s default init); use :meth:`from_dense` to approximate a trained layer.
    """

    def __init__(self, in_features: int, out_features: int, k: int, l: int = 1, bias: bool = True,
                 seed: int = 0, *, name: str = "", dist: str = "rademacher", device=None, dtype=None):
        super().__init__()
        self._init_sketch_attrs(k, l, seed, name, dist)
        self.in_features, self.out_features = int(in_features), int(out_features)
        m = self.m
        S1, S2 = random_factors(out_features, in_features, m, self.l, 1, in_features,
                                _generator(seed, name, "init"))
        fk = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.S1 = nn.Parameter(S1.to(**fk))
        self.S2 = nn.Parameter(S2.to(**fk))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            b = (torch.rand(out_features, generator=_generator(seed, name, "bias"), dtype=torch.float64) * 2 - 1)
            self.bias = nn.Parameter((b * bound).to(**fk))
        else:
            self.register_parameter("bias", None)
        self.reset_sketches()

    def _sketch_shapes(self):
        return {"U1": (self.m, self.out_features), "U2": (self.m, self.in_features)}

    def chain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``y = A (B x) + b``: ``B = [S1f ; Σ2]`` (``2m × d_in``), ``A = [Σ1ᵀ | S2f]``
        (``d_out × 2m``), from :meth:`folded` — ``A B = (U1ᵀ S1 + S2 U2)/(2l) = Ŵ``."""
        f = self.folded()
        return torch.cat([f["S1f"], f["Sig2"]], dim=0), torch.cat([f["Sig1"].T, f["S2f"]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.chain()
        return F.linear(F.linear(x, B), A, self.bias)

    def materialize(self) -> torch.Tensor:
        """The dense weight ``Ŵ`` (``out_features × in_features``, like ``nn.Linear.weight``)."""
        return sketch_materialize(self.S1, self.S2, self.U1, self.U2, self.l, 1).to(self.S1.dtype)

    def effective_params(self) -> int:
        return cost.sketch_params(self.out_features, self.in_features, self.m, bias=self.bias is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, l={self.l}, "
                f"seed={self.seed}, name={self.name!r}, dist={self.dist}, bias={self.bias is not None}, "
                f"effective_params={self.effective_params()}")

    @classmethod
    def from_dense(cls, linear: nn.Linear, k: int, l: int = 1, init: str = "sketch", seed: int = 0,
                   gram: torch.Tensor | None = None, *, name: str = "", dist: str = "rademacher",
                   damp: float | None = None, out_scale: torch.Tensor | None = None) -> SKLinear:
        """Approximate a trained ``nn.Linear``.

        ``init``: ``"sketch"`` (the paper's unbiased projection), ``"lstsq"`` (best ``S`` for these
        ``U``), ``"calibrated"`` (best ``S`` on inputs with Gram ``gram = Σ x xᵀ``,
        ``in_features²``), or ``"random"`` (ignore the weights; train from scratch).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SKLinear.from_dense expects an nn.Linear, got {type(linear).__name__}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if init == "calibrated" and gram is None:
            raise ValueError("init='calibrated' needs gram= (the input Gram Σ x xᵀ); use init='lstsq' without data")
        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, k, l, bias=linear.bias is not None, seed=seed,
                    name=name, dist=dist, device=W.device, dtype=W.dtype)
        if init != "random":
            kw = {} if damp is None else {"damp": damp}
            S1, S2 = fit_sketch(W, layer.U1, layer.U2, layer.l, 1, init, gram, **kw, out_scale=out_scale)
            with torch.no_grad():
                layer.S1.copy_(S1)
                layer.S2.copy_(S2)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer


# --------------------------------------------------------------------------- SK-CONV
def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


class _SKConvNd(_SKBase):
    _ndim: int
    _dense_cls: type

    def __init__(self, in_channels: int, out_channels: int, kernel_size, k: int, l: int = 1, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True, seed: int = 0, *,
                 name: str = "", dist: str = "rademacher", device=None, dtype=None):
        super().__init__()
        self._init_sketch_attrs(k, l, seed, name, dist)
        n = self._ndim
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                             f"by groups={groups}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _tuple(kernel_size, n)
        self.stride, self.dilation = _tuple(stride, n), _tuple(dilation, n)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n)
        G, m, hw = self.groups, self.m, self.hw
        ci, co = in_channels // G, out_channels // G
        fan_in = ci * hw
        gen = _generator(seed, name, "init")
        per_group = [random_factors(co, ci, m, self.l, hw, fan_in, gen) for _ in range(G)]
        S1s = torch.cat([f[0] for f in per_group], 0)  # (G m, ci hw)
        S2s = torch.cat([f[1] for f in per_group], 0)  # (G co, m hw)
        fk = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.S1 = nn.Parameter(S1s.reshape(G * m, ci, *self.kernel_size).to(**fk))
        self.S2 = nn.Parameter(S2s.reshape(out_channels, m, *self.kernel_size).to(**fk))
        if bias:
            bound = 1.0 / math.sqrt(fan_in)
            b = torch.rand(out_channels, generator=_generator(seed, name, "bias"), dtype=torch.float64) * 2 - 1
            self.bias = nn.Parameter((b * bound).to(**fk))
        else:
            self.register_parameter("bias", None)
        self.reset_sketches()

    @property
    def hw(self) -> int:
        return math.prod(self.kernel_size)

    def _sketch_shapes(self):
        G, m = self.groups, self.m
        return {"U1": (G, m, self.out_channels // G), "U2": (G, m, self.in_channels // G)}

    def _conv(self, x, w, stride, padding, dilation):
        fn = F.conv1d if self._ndim == 1 else F.conv2d
        return fn(x, w, None, stride, padding, dilation, self.groups)

    def branch_weights(self) -> dict:
        """The four conv kernels of the two branches, from :meth:`folded`: ``S1f`` (the layer's
        geometry, ``in → G m``), ``Sig1t`` (``1×1``, ``G m → out``: per group ``Σ1ᵀ``), ``Sig2w`` (``1×1``,
        ``in → G m``: per group ``Σ2``) and ``S2f`` (the layer's geometry, ``G m → out``)."""
        G, m, one = self.groups, self.m, (1,) * self._ndim
        f = self.folded()
        return {"S1f": f["S1f"], "S2f": f["S2f"], "signs": f["signs"],
                "Sig1t": f["Sig1"].transpose(1, 2).reshape(self.out_channels, m, *one),
                "Sig2w": f["Sig2"].reshape(G * m, self.in_channels // G, *one)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = (1,) * self._ndim
        w = self.branch_weights()
        b1 = self._conv(self._conv(x, w["S1f"], self.stride, self.padding, self.dilation), w["Sig1t"], one, 0, one)
        # zero padding commutes with a bias-free 1x1 map
        b2 = self._conv(self._conv(x, w["Sig2w"], one, 0, one), w["S2f"], self.stride, self.padding, self.dilation)
        y = b1 + b2
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, *one)
        return y

    def _group_factors(self, g: int):
        G, m = self.groups, self.m
        co, ci = self.out_channels // G, self.in_channels // G
        S1 = self.S1[g * m:(g + 1) * m].reshape(m, ci * self.hw)
        S2 = self.S2[g * co:(g + 1) * co].reshape(co, m * self.hw)
        return S1, S2, self.U1[g], self.U2[g]

    def materialize(self) -> torch.Tensor:
        """The dense kernel ``K̂`` (``out × in/groups × *kernel``, like ``nn.ConvNd.weight``)."""
        ci = self.in_channels // self.groups
        blocks = [sketch_materialize(*self._group_factors(g), self.l, self.hw) for g in range(self.groups)]
        return torch.cat(blocks, 0).reshape(self.out_channels, ci, *self.kernel_size).to(self.S1.dtype)

    def effective_params(self) -> int:
        return cost.sketch_params(self.out_channels, self.in_channels, self.m, self.hw, self.groups,
                                  self.bias is not None)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, k={self.k}, "
             f"l={self.l}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        return (s + f", bias={self.bias is not None}, seed={self.seed}, name={self.name!r}, dist={self.dist}, "
                f"effective_params={self.effective_params()}")

    @classmethod
    def from_dense(cls, conv, k: int, l: int = 1, init: str = "sketch", seed: int = 0,
                   gram: torch.Tensor | None = None, *, name: str = "", dist: str = "rademacher",
                   damp: float | None = None, out_scale: torch.Tensor | None = None):
        """Approximate a trained conv.  ``gram`` is the im2col input Gram per group: shape
        ``(groups, n, n)`` or ``(n, n)`` for ``groups=1``, ``n = in_channels/groups · prod(kernel)``,
        in the order of ``conv.weight.reshape(out, -1)``; ``out_scale`` weighs the output channels
        (:func:`~sketchpass.sketch.fit.fit_sketch`)."""
        if not isinstance(conv, cls._dense_cls):
            raise TypeError(f"{cls.__name__}.from_dense expects an {cls._dense_cls.__name__}, got "
                            f"{type(conv).__name__}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}.from_dense: padding_mode={conv.padding_mode!r} is not supported "
                             f"(only 'zeros' commutes with the input-mode sketch); keep this layer dense")
        if conv.in_channels // conv.groups == 1:
            raise ValueError(f"{cls.__name__}.from_dense: a depthwise conv (groups={conv.groups}, one input "
                             f"channel per group) has nothing to factor; keep it dense")
        if init == "calibrated" and gram is None:
            raise ValueError("init='calibrated' needs gram= (the im2col input Gram); use init='lstsq' without data")
        W = conv.weight
        G = conv.groups
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, k, l, conv.stride, conv.padding,
                    conv.dilation, G, conv.bias is not None, seed, name=name, dist=dist, device=W.device,
                    dtype=W.dtype)
        if init == "random":
            return layer
        grams = None
        if gram is not None:
            grams = gram if gram.dim() == 3 else gram.unsqueeze(0)
            n = W.shape[1] * layer.hw
            if grams.shape != (G, n, n):
                raise ValueError(f"gram must have shape ({G}, {n}, {n}) (or ({n}, {n}) when groups=1), got "
                                 f"{tuple(gram.shape)}")
        co, m = conv.out_channels // G, layer.m
        kw = {} if damp is None else {"damp": damp}
        Wm = W.reshape(conv.out_channels, -1)
        with torch.no_grad():
            for g in range(G):
                S1, S2 = fit_sketch(Wm[g * co:(g + 1) * co], layer.U1[g], layer.U2[g], layer.l, layer.hw, init,
                                    None if grams is None else grams[g], **kw,
                                    out_scale=None if out_scale is None else out_scale[g * co:(g + 1) * co])
                layer.S1[g * m:(g + 1) * m].copy_(S1.reshape(m, *layer.S1.shape[1:]))
                layer.S2[g * co:(g + 1) * co].copy_(S2.reshape(co, *layer.S2.shape[1:]))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer


class SKConv2d(_SKConvNd):
    """SK-CONV for 2-D convolutions (see module docstring)."""

    _ndim = 2
    _dense_cls = nn.Conv2d


class SKConv1d(_SKConvNd):
    """SK-CONV for 1-D convolutions (see module docstring)."""

    _ndim = 1
    _dense_cls = nn.Conv1d


# --------------------------------------------------------------------------- low-rank chains
class LowRankLinear(nn.Sequential):
    """``Linear(d_in → r, no bias)`` then ``Linear(r → d_out, bias)``: the ``"svd"`` form."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        fk = {"device": device, "dtype": dtype}
        super().__init__(nn.Linear(in_features, rank, bias=False, **fk), nn.Linear(rank, out_features, bias, **fk))
        self.rank = int(rank)

    # what code written for nn.Linear reads of a layer (transformers' T5 feed-forward casts its input to
    # wo.weight.dtype): the sizes, the bias, and the dense weight Ŵ = L R, formed when read (the forward never
    # forms it)
    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias

    @property
    def weight(self) -> torch.Tensor:
        return self.materialize()

    def materialize(self) -> torch.Tensor:
        return self[1].weight @ self[0].weight

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, gram: torch.Tensor | None = None,
                   damp: float | None = None, *, wc: torch.Tensor | None = None) -> LowRankLinear:
        """Whitened-SVD factors of ``linear`` (``gram`` = input Gram; ``None`` = plain SVD; ``wc``,
        optional: ``weight @ gram``, when the caller already has it)."""
        W = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, W.device, W.dtype)
        L, R = fit_svd(W, rank, gram, **({} if damp is None else {"damp": damp}), WC=wc)
        with torch.no_grad():
            layer[0].weight.copy_(R)
            layer[1].weight.copy_(L)
            if linear.bias is not None:
                layer[1].bias.copy_(linear.bias)
        return layer


class _LowRankConvNd(nn.Sequential):
    _conv_cls: type

    def __init__(self, in_channels, out_channels, kernel_size, rank: int, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None, dtype=None):
        """``rank`` is per group: an ``h×w`` conv ``in → groups·rank`` then a ``1×1`` conv to ``out``."""
        fk = {"device": device, "dtype": dtype}
        super().__init__(
            self._conv_cls(in_channels, groups * rank, kernel_size, stride, padding, dilation, groups, False, **fk),
            self._conv_cls(groups * rank, out_channels, 1, groups=groups, bias=bias, **fk),
        )
        self.rank, self.groups = int(rank), int(groups)

    # what code written for nn.ConvNd reads of a layer (transformers' ViT reads its patch projection's
    # weight.dtype): the sizes, the bias, and the dense kernel K̂, formed when read (the forward never forms it)
    in_channels = property(lambda self: self[0].in_channels)
    out_channels = property(lambda self: self[1].out_channels)
    kernel_size = property(lambda self: self[0].kernel_size)
    stride = property(lambda self: self[0].stride)
    padding = property(lambda self: self[0].padding)
    dilation = property(lambda self: self[0].dilation)
    padding_mode = property(lambda self: self[0].padding_mode)
    bias = property(lambda self: self[1].bias)
    weight = property(lambda self: self.materialize())

    def materialize(self) -> torch.Tensor:
        first, second = self[0], self[1]
        G, r = self.groups, self.rank
        co = second.out_channels // G
        R = first.weight.reshape(G, r, -1)
        L = second.weight.reshape(G, co, r)
        return torch.bmm(L, R).reshape(second.out_channels, *first.weight.shape[1:])

    @classmethod
    def from_dense(cls, conv, rank: int, gram: torch.Tensor | None = None, damp: float | None = None, *,
                   wc: torch.Tensor | None = None):
        """Whitened-SVD factors per group (``gram`` as in :meth:`SKConv2d.from_dense`; ``wc``, optional:
        the per-group ``W_g @ gram_g``, ``(groups, out/groups, n)``, when the caller already has it)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}.from_dense: padding_mode={conv.padding_mode!r} is not supported")
        W, G = conv.weight, conv.groups
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
                    conv.dilation, G, conv.bias is not None, W.device, W.dtype)
        co = conv.out_channels // G
        Wm = W.reshape(conv.out_channels, -1)
        grams = None if gram is None else (gram if gram.dim() == 3 else gram.unsqueeze(0))
        kw = {} if damp is None else {"damp": damp}
        with torch.no_grad():
            for g in range(G):
                L, R = fit_svd(Wm[g * co:(g + 1) * co], rank, None if grams is None else grams[g], **kw,
                               WC=None if wc is None else wc[g])
                layer[0].weight[g * rank:(g + 1) * rank].copy_(R.reshape(rank, *W.shape[1:]))
                layer[1].weight[g * co:(g + 1) * co].copy_(L.reshape(co, rank, *([1] * (W.dim() - 2))))
            if conv.bias is not None:
                layer[1].bias.copy_(conv.bias)
        return layer


class LowRankConv2d(_LowRankConvNd):
    _conv_cls = nn.Conv2d


class LowRankConv1d(_LowRankConvNd):
    _conv_cls = nn.Conv1d


# --------------------------------------------------------------------------- the factory
_SK = {nn.Linear: SKLinear, nn.Conv1d: SKConv1d, nn.Conv2d: SKConv2d}
_LR = {nn.Linear: LowRankLinear, nn.Conv1d: LowRankConv1d, nn.Conv2d: LowRankConv2d}


def dense_type(mod: nn.Module) -> type:
    """``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``: the dense layer type ``mod`` is (or stands in for)."""
    for t in (nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(mod, t):
            return t
    raise TypeError(f"cannot factor a {type(mod).__name__}")


def dense_module(weight: torch.Tensor, *, stride=1, dilation=1, groups: int = 1, padding=0,
                 bias: torch.Tensor | None = None) -> nn.Module:
    """An ``nn.Linear`` (2-D ``weight``) or ``nn.Conv1d``/``nn.Conv2d`` (3-/4-D, torch layout) holding
    ``weight`` (and ``bias``) as frozen parameters, for frontends whose layers are not torch modules."""
    if weight.dim() == 2:
        mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        cls = nn.Conv1d if weight.dim() == 3 else nn.Conv2d
        mod = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding, dilation,
                  groups, bias=bias is not None, device="meta")
    mod.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias, requires_grad=False)
    return mod


def with_weight(mod: nn.Module, W: torch.Tensor) -> nn.Module:
    """A shallow stand-in of ``mod`` whose weight is ``W`` (reshaped to ``mod.weight``'s shape and dtype)."""
    twin = copy.copy(mod)
    twin._parameters = dict(mod._parameters)
    twin._parameters["weight"] = nn.Parameter(W.to(mod.weight.dtype).reshape(mod.weight.shape), requires_grad=False)
    return twin


def factor_module(dense: nn.Module, method: str, *, rank: int | None = None, k: int | None = None, l: int = 1,
                  name: str = "", seed: int = 0, dist: str = "rademacher", init: str = "calibrated",
                  gram: torch.Tensor | None = None, wc: torch.Tensor | None = None,
                  out_scale: torch.Tensor | None = None) -> nn.Module:
    """The one constructor from a dense layer and a decision to its factored module (both frontends).

    ``method="svd"``: the whitened low-rank chain of ``rank``; ``"sketch"``: SK layer with ``k``, ``l``,
    sketches keyed by ``(seed, name)``.  ``gram``: the (shrunk) input Grams ``(groups, n, n)``, ``None``
    for data-free fits; ``wc``: ``weight @ gram`` per group when known.  ``init``: ``"calibrated"``
    (``"lstsq"`` when ``gram`` is ``None``), ``"lstsq"``, ``"sketch"`` or ``"random"`` (fresh factors).

    ``out_scale`` (``d_out`` values): the layer's output is scaled per channel right after it (an
    inference-mode BatchNorm), so its error is weighed by that scale: the svd form is fitted to ``D W``
    and its last factor divided by ``D`` again (the same chain, the error of ``D W`` minimised); the sketch
    form is fitted in the scaled space (:func:`~sketchpass.sketch.fit.fit_sketch`)."""
    t = dense_type(dense)
    linear = t is nn.Linear
    g = None if gram is None else (gram[0] if linear and gram.dim() == 3 else gram)
    if method == "svd":
        if out_scale is not None and init != "random":
            d = out_scale.to(torch.float64).reshape(-1)
            shape = (-1,) + (1,) * (dense.weight.dim() - 1)
            scaled = with_weight(dense, dense.weight.detach().double() * d.reshape(shape))
            if wc is not None:
                wc = wc * d.reshape(wc.shape[0], -1, 1) if wc.dim() == 3 else wc * d.reshape(-1, 1)
            mod = _LR[t].from_dense(scaled, rank, gram=g, wc=None if wc is None else (wc[0] if linear else wc))
            with torch.no_grad():
                w = mod[1].weight
                w.copy_((w.double() / d.reshape((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
            return mod
        return _LR[t].from_dense(dense, rank, gram=None if init == "random" else g,
                                 wc=None if wc is None or init == "random" else (wc[0] if linear else wc))
    if method == "sketch":
        use = "lstsq" if init == "calibrated" and g is None else init
        return _SK[t].from_dense(dense, k, l, init=use, seed=seed, gram=g if use == "calibrated" else None,
                                 name=name, dist=dist, out_scale=None if use in ("random", "sketch") else out_scale)
    raise ValueError(f"method {method!r} does not build a module (expected 'svd' or 'sketch')")


def form_module(spec, method: str, size: int | None = None, l: int = 1, *, dtype=None, device=None,
                name: str = "", seed: int = 0, dist: str = "rademacher") -> nn.Module:
    """A module of the shape of one candidate form of the layer ``spec`` (a
    :class:`~sketchpass.plan.LayerSpec`), with fresh weights — what a standalone timing runs, and what
    :func:`sketchpass.load` fills with saved weights.  ``method``: ``"dense"``, ``"svd"`` (``size`` = rank)
    or ``"sketch"`` (``size`` = ``m = k l``; its sketches are keyed by ``seed``, ``name`` and ``dist``, as
    in the emitted layer)."""
    fk = {"dtype": dtype, "device": device}
    sk_kw = {"seed": seed, "name": name, "dist": dist, **fk}
    if spec.op == "linear":
        if method == "dense":
            return nn.Linear(spec.d_in, spec.d_out, bias=spec.bias, **fk)
        if method == "svd":
            return LowRankLinear(spec.d_in, spec.d_out, size, bias=spec.bias, **fk)
        return SKLinear(spec.d_in, spec.d_out, size // l, l, bias=spec.bias, **sk_kw)
    conv, lr, sk = ((nn.Conv1d, LowRankConv1d, SKConv1d) if spec.op == "conv1d" else
                    (nn.Conv2d, LowRankConv2d, SKConv2d))
    geo = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation, "groups": spec.groups}
    if method == "dense":
        return conv(spec.d_in, spec.d_out, spec.kernel, bias=spec.bias, **geo, **fk)
    if method == "svd":
        return lr(spec.d_in, spec.d_out, spec.kernel, size, bias=spec.bias, **geo, **fk)
    return sk(spec.d_in, spec.d_out, spec.kernel, size // l, l, bias=spec.bias, **geo, **sk_kw)
