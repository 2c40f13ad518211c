"""Sketched CNNs trained from scratch (the claim of Kasiviswanathan et al., IJCAI 2018) on Fashion-MNIST and MNIST.

What it measures
----------------
1. **Accuracy at equal parameters, trained from scratch.**  A dense CNN (3 convs + 2 FC, BatchNorm after
   every conv)::

       conv 1→32 3×3 · BN · ReLU · maxpool      28×28 → 14×14
       conv 32→64 3×3 · BN · ReLU · maxpool     14×14 → 7×7      (sketched)
       conv 64→128 3×3 · BN · ReLU · maxpool    7×7 → 3×3        (sketched)
       fc 1152→256 · ReLU                                          (sketched)
       fc 256→10

   and, at ``R`` = 4×, 8×, 16× fewer effective parameters in the three middle layers:

   * ``sketch R×`` — those layers are :class:`sketchpass.SKConv2d` / :class:`sketchpass.SKLinear`
     (``l = 1``, variance-matched random init, DESIGN §1) with **one sketch size k for all three**, the
     k whose total ``Σ k·hw·(d_in + d_out)`` is the dense total / R (a layer whose sketch at that k
     would not be smaller than the layer stays dense: conv2 at 4×); see :func:`sketch_forms`;
   * ``sketch R× even`` — the same layers each R× smaller on its own, ``k = round(d_in·d_out / (R (d_in
     + d_out)))`` (8×: conv2 k = 3, conv3 k = 5, fc1 k = 26).  The default run has it at 8× only, to
     show what the allocation across layers costs;
   * ``low-rank R×`` — the same layers as :class:`sketchpass.LowRankConv2d` / ``LowRankLinear``
     chains (svd-chain form; PyTorch's default init with the first factor scaled by √3 so that the
     product has the dense init's variance, like the SK layers) whose rank gives each layer the sketch's
     params (the same allocation across layers as ``sketch R×``);
   * ``thin R×`` — the dense CNN with every width scaled by one factor, chosen so that the whole model
     has the same number of parameters as ``sketch R×``.

   Every model is trained the same way — :func:`sketchpass.finetune` with ``teacher=None`` (labels
   only), ``train="all"``, ``bn="train"``, Adam at ``--lr`` with cosine decay, ``--epochs`` epochs over
   the first ``--train-n`` training images in batches of ``--batch`` (reshuffled every epoch) — for
   ``--seeds`` seeds (seed = data order, init and sketches), and evaluated on the first ``--test-n``
   (default: all 10,000) test images.  Reported: mean ± std (sample std over seeds) of the test
   accuracy, total and sketched-layer effective parameters, and the ratio of the sketched layers'
   params to dense.  ``--mnist-configs`` chooses which configurations also run on MNIST (default: dense
   and sketch 8×), trained the same way on the first ``--mnist-train-n`` MNIST training images.

   Throughput on a CPU (what lets the default run train every model on 36,000 images in the time
   budget): every model and batch is in ``channels_last`` memory format (the layout oneDNN's
   convolutions prefer), and the CNN max-pools before its ReLU (the same function: ReLU is monotone, so it
   commutes with max) so that the ReLU runs on 4× fewer elements.

2. **The paper's "sketch" init: unbiasedness and variance** (no training).  For the sketched layers of
   the dense CNN trained in 1 (Fashion-MNIST, seed 0), ``SK*.from_dense(layer, k, l, init="sketch",
   seed=s)`` over ``--var-seeds`` seeds: the measured relative error ``E‖Ŵ−W‖²/‖W‖²`` against the
   formula of DESIGN §1 (``((d_in−1) + (d_out−1)) / (4lk)`` Rademacher, ``(d_in + d_out + 2)/(4lk)`` Gaussian; ``d_in``,
   ``d_out`` are channels for a conv), and the bias ``‖mean_s Ŵ − W‖/‖W‖`` against
   ``sqrt(formula / n_seeds)``, what an unbiased estimator's sample mean gives.

3. **Effect of l at fixed m = l·k** (Fashion-MNIST, the sketched CNN with each layer about 4× smaller
   on its own, the ``even`` allocation, every ``m`` a multiple of 4, ``l`` ∈ {1, 2, 4}), trained as in 1
   but on the first ``--l-train-n`` (12,000) images.

Outputs (``--out``, default ``docs``): ``paper.json``, ``paper.md`` (the command and the tables,
generated) and ``paper.png`` (accuracy vs sketched-layer params ratio).

How to run (about 16 minutes on 2 CPU cores with the defaults: 945 s measured, docs/paper.md)::

    python bench/paper.py
    python bench/paper.py --seeds 1 --train-n 5000 --l-values ''    # quick look, no l study
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sketchpass as sp
from sketchpass.demo.data import load_fashion_mnist, mnist_tensors
from sketchpass.sketch.fit import expected_sketch_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posttrain import library_revision  # noqa: E402

BASE = (32, 64, 128, 256)  # conv1, conv2, conv3 channels; fc1 units
SKETCHED = ("conv2", "conv3", "fc1")
RATIOS = (4, 8, 16)
KINDS = ("sketch", "low-rank", "thin")
EQUAL_K = ["dense"] + [f"{kind} {r}x" for r in RATIOS for kind in KINDS]
EVEN = [f"{kind} {r}x even" for r in RATIOS for kind in KINDS]
CONFIGS = EQUAL_K + EVEN
# the default run: every kind at every ratio with the equal-k allocation, and the even allocation at 8x
DEFAULT_CONFIGS = EQUAL_K + ["sketch 8x even"]
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


# --------------------------------------------------------------------------- models
def _matched(chain: nn.Module) -> nn.Module:
    """Variance-matched init of a low-rank chain, as for the SK layers: with PyTorch's default init each
    factor has variance ``1/(3 fan_in)``, so an entry of the product ``L R`` (a sum of ``r`` products)
    has ``r · 1/(3 fan_in) · 1/(3 r) = σ²/3`` for the dense ``σ² = 1/(3 fan_in)``; scale ``R`` by √3."""
    with torch.no_grad():
        chain[0].weight.mul_(math.sqrt(3.0))
    return chain


class CNN(nn.Module):
    """The benchmark CNN; ``layers`` maps a sketched layer name to ``("dense",)``, ``("sketch", k, l)`` or
    ``("lowrank", r)``; ``widths`` = (conv1, conv2, conv3, fc1)."""

    def __init__(self, widths=BASE, layers=None, seed: int = 0):
        super().__init__()
        layers = layers or {}
        c1, c2, c3, f1 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = self._conv(c1, c2, layers.get("conv2", ("dense",)), seed, "conv2")
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = self._conv(c2, c3, layers.get("conv3", ("dense",)), seed, "conv3")
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = self._linear(c3 * 9, f1, layers.get("fc1", ("dense",)), seed, "fc1")
        self.fc2 = nn.Linear(f1, 10)

    @staticmethod
    def _conv(cin, cout, form, seed, name):
        if form[0] == "sketch":
            return sp.SKConv2d(cin, cout, 3, k=form[1], l=form[2], padding=1, seed=seed, name=name)
        if form[0] == "lowrank":
            return _matched(sp.LowRankConv2d(cin, cout, 3, form[1], padding=1))
        return nn.Conv2d(cin, cout, 3, padding=1)

    @staticmethod
    def _linear(din, dout, form, seed, name):
        if form[0] == "sketch":
            return sp.SKLinear(din, dout, k=form[1], l=form[2], seed=seed, name=name)
        if form[0] == "lowrank":
            return _matched(sp.LowRankLinear(din, dout, form[1]))
        return nn.Linear(din, dout)

    def forward(self, x):
        # maxpool then ReLU: the same function as ReLU then maxpool (ReLU is monotone, so it commutes
        # with max), with the ReLU and its backward on 4x fewer elements.
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        x = F.relu(F.max_pool2d(self.bn3(self.conv3(x)), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_params(model: nn.Module, names=SKETCHED) -> int:
    """Effective (trainable) params of the named layers, weights and biases."""
    return sum(p.numel() for n in names for p in getattr(model, n).parameters())


def shapes(widths=BASE) -> dict[str, tuple[int, int, int]]:
    """``(d_in, d_out, hw)`` of every sketched layer."""
    c1, c2, c3, f1 = widths
    return {"conv2": (c1, c2, 9), "conv3": (c2, c3, 9), "fc1": (c3 * 9, f1, 1)}


def sketch_forms(ratio: float, l: int = 1, multiple: int = 1, alloc: str = "equal-k") -> dict[str, tuple]:
    """Sketch sizes ``m = l k`` of the three layers for ``ratio``× fewer effective params in them in total.

    ``alloc="equal-k"`` (the default): one sketch size ``m`` for every layer, the ``m`` whose total
    ``Σ m·hw·(d_in + d_out)`` (+ biases) is closest to the dense total / ``ratio``.  A layer whose sketch
    at that ``m`` would not have fewer weights than the layer itself stays dense (DESIGN §1: only worth
    sketching when below the dense figure) and the others share what is left.  Every layer keeps the same
    sketch width, so the savings come mostly from the widest layer (fc1).

    ``alloc="even"``: every layer ``ratio``× smaller on its own, ``m = d_in·d_out / (ratio (d_in + d_out))``
    (for this CNN at 8×: conv2 m = 3, conv3 m = 5, fc1 m = 26).

    ``m`` is rounded to a multiple of ``multiple`` (≥ it)."""
    shp = shapes()
    if alloc == "even":
        out = {}
        for name, (din, dout, _) in shp.items():
            m = din * dout / (ratio * (din + dout))
            m = max(multiple, int(round(m / multiple)) * multiple)
            out[name] = ("sketch", m // l, l)
        return out
    if alloc != "equal-k":
        raise ValueError(f"unknown allocation {alloc!r} (equal-k, even)")
    target = sum(din * dout * hw + dout for din, dout, hw in shp.values()) / ratio
    sketched = dict(shp)
    while True:
        kept = sum(din * dout * hw + dout for n, (din, dout, hw) in shp.items() if n not in sketched)
        per_m = sum(hw * (din + dout) for din, dout, hw in sketched.values())
        bias = sum(dout for _, dout, _ in sketched.values())
        m = max(multiple, int(round((target - kept - bias) / per_m / multiple)) * multiple)
        too_big = [n for n, (din, dout, hw) in sketched.items() if m * hw * (din + dout) >= din * dout * hw]
        if not too_big:
            break
        for n in too_big:
            del sketched[n]
        if not sketched:
            raise ValueError(f"no layer can be sketched at ratio {ratio}")
    return {n: ("sketch", m // l, l) if n in sketched else ("dense",) for n in shp}


def lowrank_forms(sk: dict[str, tuple]) -> dict[str, tuple]:
    """Per layer, the rank whose chain has the weight count of the sketch ``m·hw·(d_in+d_out)`` (a layer
    the sketch keeps dense stays dense)."""
    out = {}
    for name, (din, dout, hw) in shapes().items():
        if sk[name][0] != "sketch":
            out[name] = sk[name]
            continue
        m = sk[name][1] * sk[name][2]
        out[name] = ("lowrank", max(1, round(m * hw * (din + dout) / (din * hw + dout))))
    return out


def thin_widths(target_params: int) -> tuple[tuple[int, ...], float]:
    """Widths ``round(alpha · BASE)`` with the whole-model params closest to ``target_params``."""
    best = None
    for i in range(1, 1001):
        alpha = i / 1000
        w = tuple(max(1, round(alpha * b)) for b in BASE)
        p = n_params(CNN(w))
        if best is None or abs(p - target_params) < abs(best[2] - target_params):
            best = (w, alpha, p)
        if p > target_params * 1.5:
            break
    return best[0], best[1]


def parse_config(config: str) -> tuple[str, int, str]:
    """``"sketch 8x even"`` → ``("sketch", 8, "even")``; the allocation defaults to ``"equal-k"``."""
    kind, r, *alloc = config.split(" ")
    return kind, int(r.rstrip("x")), alloc[0] if alloc else "equal-k"


def build(config: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if config == "dense":
        return CNN(seed=seed)
    kind, ratio, alloc = parse_config(config)
    sk = sketch_forms(ratio, alloc=alloc)
    if kind == "sketch":
        return CNN(layers=sk, seed=seed)
    if kind == "low-rank":
        return CNN(layers=lowrank_forms(sk), seed=seed)
    if kind == "thin":
        target = n_params(CNN(layers=sk))
        return CNN(widths=thin_widths(target)[0], seed=seed)
    raise ValueError(config)


def channels_last(t):
    """A model or a batch of images in ``channels_last`` memory format (same values, oneDNN's faster layout)."""
    return t.to(memory_format=torch.channels_last) if isinstance(t, nn.Module) else \
        t.contiguous(memory_format=torch.channels_last)


def describe(model: CNN) -> str:
    parts = []
    for n in SKETCHED:
        m = getattr(model, n)
        if isinstance(m, (sp.SKConv2d, sp.SKLinear)):
            parts.append(f"k{m.k}" + (f"x{m.l}" if m.l > 1 else ""))
        elif isinstance(m, (sp.LowRankConv2d, sp.LowRankLinear)):
            parts.append(f"r{m.rank}")
        else:
            parts.append("·")
    widths = (model.conv1.out_channels, model.bn2.num_features, model.bn3.num_features, model.fc2.in_features)
    return " ".join(parts) + ("" if widths == BASE else f" (widths {'/'.join(map(str, widths))})")


# --------------------------------------------------------------------------- data and training
class Shuffled:
    """Re-iterable ``(x, y)`` batches, reshuffled on every pass (a fixed sequence for a given seed)."""

    def __init__(self, x, y, batch: int, seed: int):
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.x) / self.batch)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(perm), self.batch):
            idx = perm[i:i + self.batch]
            yield channels_last(self.x[idx]), self.y[idx]


def load(dataset: str, n_train: int | None, n_test: int | None = None):
    if dataset == "mnist":
        xtr, ytr = mnist_tensors("train", n=n_train)
        return (xtr, ytr), mnist_tensors("test", n=n_test)

    def prep(split, n=None):
        x, y = load_fashion_mnist(split)
        x, y = x[:n] if n else x, y[:n] if n else y
        t = torch.from_numpy(x.copy()).float().div_(255).unsqueeze_(1).sub_(FMNIST_MEAN).div_(FMNIST_STD)
        return t, torch.from_numpy(y.copy()).long()

    return prep("train", n_train), prep("test", n_test)


@torch.inference_mode()
def accuracy(model, x, y, batch=500) -> float:
    model.eval()
    x = channels_last(x)
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return 100.0 * correct / len(y)


def train_eval(model, train, test, args, seed: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    data = Shuffled(*train, args.batch, seed)
    trained = sp.finetune(channels_last(model), data=data, epochs=args.epochs, lr=args.lr, train="all", bn="train",
                          inplace=True, seed=seed, weight_decay=args.weight_decay)
    return accuracy(trained, *test), time.perf_counter() - t0


def run_config(config: str, dataset: str, train, test, args, keep: dict | None = None) -> dict:
    """Train and test ``config`` for every seed; ``keep`` (if given) receives the trained seed-0 model."""
    accs, secs = [], []
    for seed in range(args.seeds):
        model = build(config, seed)
        acc, s = train_eval(model, train, test, args, seed)
        accs.append(acc)
        secs.append(s)
        if seed == 0 and keep is not None:
            keep[(dataset, config)] = model
        print(f"  {dataset} {config:14s} seed {seed}: {acc:.2f}% ({s:.0f} s)", file=sys.stderr, flush=True)
    dense_layers = layer_params(CNN())
    return {"dataset": dataset, "config": config, "accs": accs, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "params": n_params(model),
            "sketched_layer_params": layer_params(model), "layer_ratio": dense_layers / layer_params(model),
            "form": describe(model), "train_s": secs}


# --------------------------------------------------------------------------- unbiasedness / variance
def variance_table(dense: CNN, n_seeds: int) -> list[dict]:
    rows = []
    cases = [(k, l, dist) for (k, l) in ((4, 1), (16, 1)) for dist in ("rademacher", "gaussian")]
    cases.append((4, 4, "rademacher"))  # same m = l k as (16, 1)
    for name in SKETCHED:
        layer = getattr(dense, name)
        W = layer.weight.detach().double()
        lay = layer.double()
        for k, l, dist in cases:
            cls = sp.SKConv2d if isinstance(layer, nn.Conv2d) else sp.SKLinear
            errs, total = [], torch.zeros_like(W)
            for s in range(n_seeds):
                sk = cls.from_dense(lay, k, l, init="sketch", seed=s, name=name, dist=dist)
                Wh = sk.materialize().detach()
                errs.append(float((Wh - W).pow(2).sum() / W.pow(2).sum()))
                total += Wh
            if isinstance(layer, nn.Conv2d):
                din, dout = layer.in_channels, layer.out_channels
            else:
                din, dout = layer.in_features, layer.out_features
            formula = expected_sketch_error(din, dout, k, l, dist)
            bias = float((total / n_seeds - W).norm() / W.norm())
            mean_err = statistics.fmean(errs)
            rows.append({"layer": name, "d_in": din, "d_out": dout, "k": k, "l": l, "dist": dist, "seeds": n_seeds,
                         "measured_error": mean_err, "measured_error_sem": statistics.stdev(errs) / math.sqrt(n_seeds),
                         "formula_error": formula, "bias": bias,
                         "bias_expected_if_unbiased": math.sqrt(formula / n_seeds)})
        layer.float()
    return rows


# --------------------------------------------------------------------------- report
def _pm(r) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}"


def markdown(results: list[dict], var_rows: list[dict], l_rows: list[dict], meta: dict, verdict: list[str]) -> str:
    lines = [
        "# Sketched CNNs trained from scratch (Fashion-MNIST, MNIST)",
        "",
        "*Generated by `bench/paper.py`; every number below comes from the run described here. "
        "Do not edit by hand — re-run the command.*",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}; sketchpass {meta['sketchpass']} at commit `{(meta['commit'] or '?')[:12]}`"
        + (" (with uncommitted changes in `sketchpass/`)" if meta["library_modified"] else "")
        + f"; torch {meta['torch']}, python {meta['python']}, {meta['cpu_count']} CPU(s), "
        f"{meta['torch_threads']} torch thread(s); total wall time {meta['wall_s']:.0f} s (1-minute load average "
        f"{meta['load_avg_1min'][0]:g} at the start, {meta['load_avg_1min'][1]:g} at the end)",
        f"- training (every model the same): `sp.finetune(model, data=(x, y) batches, epochs={meta['epochs']}, "
        f"lr={meta['lr']:g}, weight_decay={meta['weight_decay']:g}, train='all', bn='train')` — Adam, cosine decay "
        f"to 0, cross-entropy on the labels; the first {meta['train_n']:,} Fashion-MNIST training images"
        + (f" ({meta['mnist_train_n']:,} for MNIST)" if meta.get("mnist_train_n") else "")
        + f", batches of {meta['batch']}, reshuffled each epoch; {meta['seeds']} seeds (data order, init, "
        f"sketches); test: the first {meta['test_n']:,} test images; models and batches in channels_last memory "
        "format",
        "- CNN: conv 1→32, conv 32→64, conv 64→128 (3×3, BN, maxpool, ReLU each), fc 1152→256, fc 256→10; "
        "`sketch R×`: conv2, conv3, fc1 as SK layers (l = 1) with R× fewer effective params in the three "
        "together, one sketch size k for all of them (a layer whose sketch at that k would not be smaller "
        "stays dense); `sketch R× even`: each of the three R× smaller on its own; `low-rank R×`: the same "
        "layers as low-rank chains with the sketch's params layer by layer; `thin R×`: all widths scaled to "
        "the whole-model params of `sketch R×`",
        "- `form`: conv2 conv3 fc1 (`kN` sketch k = N, `rN` rank N, `·` dense); `ratio`: dense params of "
        "those three layers / their params in this model (weights + biases)",
        "",
    ]
    for ds in meta["datasets"]:
        rows = [r for r in results if r["dataset"] == ds]
        if not rows:
            continue
        n_ds = meta["train_n"] if ds == "fashion" else meta.get("mnist_train_n") or meta["train_n"]
        lines += [f"## {'Fashion-MNIST' if ds == 'fashion' else 'MNIST'}", "",
                  f"{meta['epochs']} epoch(s) on the first {n_ds:,} training images.", "",
                  "| config | test acc. % (mean ± std) | per seed | params | sketched-layer params | ratio | form | "
                  "train s/seed |",
                  "|:---|---:|:---|---:|---:|---:|:---|---:|"]
        for r in rows:
            lines.append(f"| {r['config']} | **{_pm(r)}** | {', '.join(f'{a:.2f}' for a in r['accs'])} | "
                         f"{r['params']:,} | {r['sketched_layer_params']:,} | {r['layer_ratio']:.1f}× | {r['form']} | "
                         f"{statistics.fmean(r['train_s']):.0f} |")
        lines.append("")
    lines += ["![test accuracy vs sketched-layer params ratio](paper.png)", "", "## Done-when (issue 6)", ""]
    lines += [f"- {v}" for v in verdict] + [""]
    if var_rows:
        lines += ["## The paper's `\"sketch\"` init: unbiased, with the predicted variance", "",
                  f"Weights: the sketched layers of the dense CNN trained above (Fashion-MNIST, seed 0). "
                  f"{var_rows[0]['seeds']} sketch seeds per row. `error` = mean over seeds of ‖Ŵ−W‖²/‖W‖² (± its "
                  "standard error), `formula` = DESIGN §1; `bias` = ‖mean Ŵ − W‖/‖W‖, `√(formula/n)` = what an "
                  "unbiased estimator's mean over n seeds gives.", "",
                  "| layer | d_in→d_out | k | l | dist | error (measured) | formula | measured/formula | bias | "
                  "√(formula/n) |", "|:---|:---|---:|---:|:---|---:|---:|---:|---:|---:|"]
        for r in var_rows:
            lines.append(f"| {r['layer']} | {r['d_in']}→{r['d_out']} | {r['k']} | {r['l']} | {r['dist']} | "
                         f"{r['measured_error']:.3f} ± {r['measured_error_sem']:.3f} | {r['formula_error']:.3f} | "
                         f"{r['measured_error'] / r['formula_error']:.3f} | {r['bias']:.3f} | "
                         f"{r['bias_expected_if_unbiased']:.3f} |")
        lines.append("")
    if l_rows:
        lines += ["## Effect of l at fixed m = l·k (Fashion-MNIST)", "",
                  f"Trained as above on the first {meta['l_train_n']:,} Fashion-MNIST training images.", "",
                  "| l | form | params | ratio | test acc. % (mean ± std) | per seed |",
                  "|---:|:---|---:|---:|---:|:---|"]
        for r in l_rows:
            lines.append(f"| {r['l']} | {r['form']} | {r['params']:,} | {r['layer_ratio']:.1f}× | **{_pm(r)}** | "
                         f"{', '.join(f'{a:.2f}' for a in r['accs'])} |")
        lines.append("")
        lines += ["At fixed m = l·k an SK layer is one function class for every l: the entries ±1/√k of `U` and the "
                  "factor 1/(2l) only rescale Ŵ by 1/(2√(l·m)) for the same S (the `k=16, l=1` and `k=4, l=4` rows "
                  "of the variance table come out identical), and the variance-matched init scales S by √l to "
                  "compensate. So l changes training only through the optimiser: Adam's steps are about `lr` per "
                  "entry of S whatever its scale, so a larger l takes relatively smaller steps in Ŵ.", ""]
    return "\n".join(lines)


def plot(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dsets = [d for d in meta["datasets"] if any(r["dataset"] == d for r in results)]
    fig, axes = plt.subplots(1, len(dsets), figsize=(6 * len(dsets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], dsets):
        rows = [r for r in results if r["dataset"] == ds]
        dense = next((r for r in rows if r["config"] == "dense"), None)
        if dense:
            ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"], color="k", alpha=0.1)
            ax.axhline(dense["mean"], color="k", ls="--", lw=1, label=f"dense ({_pm(dense)})")
        for kind, alloc, marker in (("sketch", "equal-k", "o"), ("low-rank", "equal-k", "s"), ("thin", "equal-k", "^"),
                                    ("sketch", "even", "x"), ("low-rank", "even", "+"), ("thin", "even", "v")):
            pts = sorted((ratio, r["mean"], r["std"]) for r in rows if r["config"] != "dense"
                         for k, ratio, a in [parse_config(r["config"])] if (k, a) == (kind, alloc))
            if pts:
                even = alloc == "even"
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            capsize=3, label=kind + (" (even ratio per layer)" if even else ""),
                            ls=":" if even else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(RATIOS), [f"{r}×" for r in RATIOS])
        ax.set_xlabel("fewer effective params in conv2, conv3, fc1 (R)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title("Fashion-MNIST" if ds == "fashion" else "MNIST")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_mnist = f" ({meta['mnist_train_n']:,} MNIST)" if meta.get("mnist_train_n") else ""
    fig.suptitle(f"Trained from scratch, {meta['epochs']} epoch(s) on {meta['train_n']:,} images{n_mnist}, "
                 f"{meta['seeds']} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdicts(results: list[dict]) -> list[str]:
    by = {(r["dataset"], r["config"]): r for r in results}
    d, s, t = by.get(("fashion", "dense")), by.get(("fashion", "sketch 8x")), by.get(("fashion", "thin 8x"))
    if not (d and s and t):
        return ["not evaluated (Fashion-MNIST dense, sketch 8x and thin 8x are needed)"]
    gap = d["mean"] - s["mean"]
    out = [f"Fashion-MNIST sketch 8× within 1.0 point of dense: {'**met**' if gap <= 1.0 else '**not met**'} "
           f"(dense {_pm(d)}, sketch 8× {_pm(s)}: sketch − dense = {-gap:+.2f} points)",
           f"Fashion-MNIST sketch 8× not worse than thin 8× (equal params): "
           f"{'**met**' if s['mean'] >= t['mean'] else '**not met**'} (thin 8× {_pm(t)}, "
           f"difference {s['mean'] - t['mean']:+.2f})"]
    e = by.get(("fashion", "sketch 8x even"))
    if e:
        out.append(f"For comparison, with every layer 8× smaller on its own (`sketch 8x even`, {e['form']}): "
                   f"{_pm(e)}, sketch − dense = {e['mean'] - d['mean']:+.2f} points, "
                   f"{'within' if d['mean'] - e['mean'] <= 1.0 else 'not within'} 1.0 point")
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-n", type=int, default=36000, help="first N Fashion-MNIST training images")
    ap.add_argument("--mnist-train-n", type=int, default=12000, help="first N MNIST training images")
    ap.add_argument("--test-n", type=int, default=None, help="first N test images (default: all 10,000)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"Fashion-MNIST configurations, among: {', '.join(CONFIGS)}")
    ap.add_argument("--mnist-configs", default="dense,sketch 8x",
                    help="MNIST configurations ('' to skip MNIST)")
    ap.add_argument("--var-seeds", type=int, default=24, help="sketch seeds per row of the variance table")
    ap.add_argument("--l-values", default="1,2,4", help="l values of the l study at fixed m ('' to skip)")
    ap.add_argument("--l-ratio", type=float, default=4.0, help="params ratio of the l study")
    ap.add_argument("--l-train-n", type=int, default=12000, help="first N Fashion-MNIST training images of the l study")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.mnist_configs = [c.strip() for c in args.mnist_configs.split(",") if c.strip()]
    bad = [c for c in args.configs + args.mnist_configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; choose among {CONFIGS}")
    args.l_values = [int(v) for v in args.l_values.split(",") if v.strip()]
    if args.seeds < 1 or args.epochs < 1:
        ap.error("--seeds and --epochs must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results, var_rows, l_rows, kept, n_train = [], [], [], {}, {}
    datasets = [("fashion", args.configs), ("mnist", args.mnist_configs)]
    for ds, configs in datasets:
        if not configs:
            continue
        train, test = load(ds, args.train_n if ds == "fashion" else args.mnist_train_n, args.test_n)
        n_train[ds] = len(train[1])
        print(f"{ds}: {len(train[1])} train / {len(test[1])} test images", file=sys.stderr, flush=True)
        for c in configs:
            results.append(run_config(c, ds, train, test, args, kept))
        if ds == "fashion":
            if args.var_seeds > 0:
                t0 = time.perf_counter()
                dense = kept.get(("fashion", "dense"))
                if dense is None:  # dense was not among --configs: train it here
                    dense = build("dense", 0)
                    train_eval(dense, train, test, args, 0)
                var_rows = variance_table(dense, args.var_seeds)
                print(f"variance table: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            l_train = tuple(t[:args.l_train_n] for t in train)
            n_train["l_study"] = len(l_train[1])
            for lv in args.l_values:
                forms = sketch_forms(args.l_ratio, l=lv, multiple=max(args.l_values), alloc="even")
                accs, model = [], None
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    model = CNN(layers=forms, seed=seed)
                    accs.append(train_eval(model, l_train, test, args, seed)[0])
                    print(f"  l study l={lv} seed {seed}: {accs[-1]:.2f}%", file=sys.stderr, flush=True)
                l_rows.append({"l": lv, "form": describe(model), "params": n_params(model), "accs": accs,
                               "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                               "layer_ratio": layer_params(CNN()) / layer_params(model)})

    argv_list = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "benchmark": "paper",
        "command": "python bench/paper.py" + "".join(" " + shlex.quote(a) for a in argv_list),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "sketchpass": sp.__version__, **library_revision(),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "seeds": args.seeds, "epochs": args.epochs,
        "train_n": n_train.get("fashion", args.train_n), "mnist_train_n": n_train.get("mnist"),
        "l_train_n": n_train.get("l_study"),
        "test_n": len(test[1]), "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
        "datasets": [d for d, c in datasets if c],
        "wall_s": time.perf_counter() - t_start,
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    verdict = verdicts(results)
    (out / "paper.json").write_text(json.dumps({"meta": meta, "results": results, "variance": var_rows,
                                                "l_study": l_rows, "verdict": verdict}, indent=1) + "\n")
    (out / "paper.md").write_text(markdown(results, var_rows, l_rows, meta, verdict))
    plot(results, meta, out / "paper.png")
    print("\n".join(verdict))
    print(f"wrote {out / 'paper.json'}, {out / 'paper.md'}, {out / 'paper.png'} ({meta['wall_s']:.0f} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
