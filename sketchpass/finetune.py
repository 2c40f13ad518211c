"""``sketchpass.finetune``: win back accuracy after a transform by distilling from the original model.

Knowledge distillation (Hinton, Vinyals, Dean: "Distilling the Knowledge in a Neural Network",
arXiv 1503.02531): the student (the transformed model) is trained to reproduce the teacher's outputs
on unlabelled inputs.  For logits the loss is ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (batch mean;
the ``T²`` keeps gradient magnitudes independent of the temperature ``T``); for any other output
``loss="mse"`` uses the mean squared error.  When the batches also carry labels an optional
cross-entropy term ``label_weight · CE(s, y)`` is added; with ``teacher=None`` it is the only term,
which makes :func:`finetune` a plain supervised trainer as well (e.g. for a sketched architecture
trained from scratch).

What is trained (``train=``):

* ``"factors"`` (default) — the trainable factors of the compressed layers and every bias: ``S1``/``S2``
  of :class:`~sketchpass.layers.SKLinear`/``SKConv*`` and both weights of the low-rank chains
  (:class:`~sketchpass.layers.LowRankLinear`/``LowRankConv*``), plus every parameter named ``bias``
  in the model.  Everything else (dense layers kept by the plan, norms, embeddings) stays fixed.
* ``"all"`` — every parameter of the model.
* a list of name globs — the parameters whose ``named_parameters()`` name matches one of them.

The sketches ``U1``/``U2`` are buffers, never parameters: they are never trained.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import call_model, iter_batches, move_batch
from .layers import LowRankConv1d, LowRankConv2d, LowRankLinear, _SKBase
from .progress import progress_bar

LOSSES = ("kl", "mse")
TRAIN_CHOICES = ("factors", "all")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
BN_MODES = ("eval", "train")
_LOW_RANK = (LowRankLinear, LowRankConv1d, LowRankConv2d)
_BN = (nn.modules.batchnorm._BatchNorm,)


# --------------------------------------------------------------------------- helpers
def primary_output(out: Any) -> torch.Tensor:
    """The tensor a loss is computed on: the output itself, ``out["logits"]`` / ``out.logits`` if present,
    else the first tensor of a tuple, list or dict (e.g. a ``transformers`` ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        d = dict(out)
        if isinstance(d.get("logits"), torch.Tensor):
            return d["logits"]
        vals = list(d.values())
    elif isinstance(out, (tuple, list)):
        vals = list(out)
    else:
        raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}; pass loss= a "
                        f"callable (student_out, teacher_out) -> scalar")
    for v in vals:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model output ({type(out).__name__}) contains no tensor; pass loss= a callable")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dim, averaged over all other
    dims (``kind="kl"``), or the mean squared error (``kind="mse"``)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output shape {tuple(student.shape)} differs from the teacher's "
                         f"{tuple(teacher.shape)}; distillation needs outputs of the same shape")
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    T = float(temperature)
    s = F.log_softmax(student.float() / T, dim=-1).reshape(-1, student.shape[-1])
    t = F.log_softmax(teacher.float() / T, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)


def factor_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters ``train="factors"`` trains: ``S1``/``S2`` of sketch layers, the weights
    of low-rank chains, and every ``bias``."""
    names: list[str] = []
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            if p is None:
                continue
            if pname == "bias" or isinstance(mod, _SKBase) and pname in ("S1", "S2"):
                names.append(prefix + pname)
        if isinstance(mod, _LOW_RANK):
            names += [f"{prefix}{n}" for n, _ in mod.named_parameters() if not n.endswith("bias")]
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def _select(model: nn.Module, train) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    if isinstance(train, str):
        if train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {TRAIN_CHOICES} or a list of parameter-name globs, "
                             f"got {train!r}")
        if train == "all":
            chosen = params
        else:
            chosen = {n: params[n] for n in factor_parameter_names(model) if n in params}
            if not chosen:
                raise ValueError("train='factors' found nothing to train: the model has no sketch layers, "
                                 "low-rank chains or biases (is it the output of sketchpass.transform?); "
                                 "use train='all' to train every parameter")
        return chosen
    if isinstance(train, Iterable):
        globs = list(train)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise TypeError(f"train as a list must hold parameter-name globs (str), got {globs!r}")
        chosen = {n: p for n, p in params.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)}
        if not chosen:
            raise ValueError(f"train={globs!r} matches no parameter; names look like "
                             f"{', '.join(list(params)[:5])}")
        return chosen
    raise TypeError(f"train must be 'factors', 'all' or a list of parameter-name globs, got {type(train).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        b = next(model.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


def _split_labels(batch: Any):
    """``(inputs, labels)`` of a labelled batch: the last element of a tuple/list, or ``batch["labels"]``."""
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"labels=True expects batches (inputs..., labels); got a {type(batch).__name__} "
                             f"of length {len(batch)}")
        inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
        return inputs, batch[-1]
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        d = dict(batch)
        if "labels" not in d:
            raise ValueError(f"labels=True with dict batches expects a 'labels' key; found {sorted(d)}")
        y = d.pop("labels")
        return d, y
    raise ValueError(f"labels=True expects batches that are (inputs, labels) tuples or dicts with 'labels'; "
                     f"got a {type(batch).__name__}")


def _is_one_shot(data: Any) -> bool:
    return isinstance(data, Iterator)


def _check_count(name: str, v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    return v


def _check_positive(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
            (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- finetune
def finetune(model: nn.Module, teacher: nn.Module | None = None, data: Any = None, *, steps: int | None = None,
             epochs: int | None = None, lr: float = 1e-3, loss: str | Callable = "kl", temperature: float = 1.0,
             labels: bool | None = None, label_weight: float = 0.0, train: str | Iterable[str] = "factors",
             optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "cosine",
             max_grad_norm: float | None = None, bn: str = "eval", device=None, inplace: bool = False,
             progress: bool | None = None, seed: int | None = None) -> nn.Module:
    """Train ``model`` (usually ``sketchpass.transform``'s output) to match ``teacher`` on ``data``.

    Args:
        model: the student, an ``nn.Module``.  By default a deep copy is trained and returned (passes
            never modify their input); ``inplace=True`` trains ``model`` itself and returns it.
        teacher: the reference model (usually the one passed to ``transform``).  It runs in eval mode
            without gradients and is not modified (its train/eval flag is restored afterwards).
            ``None``: no distillation term; then the batches must carry labels.
        data: the training inputs: an iterable or DataLoader of batches, each a tensor (``model(x)``),
            a tuple/list (``model(*b)``) or a dict (``model(**b)``), as for ``calib=``.  A re-iterable
            (list, DataLoader) is looped over as many times as ``steps``/``epochs`` need; a one-shot
            iterator (generator) can only be used for one pass.
        steps / epochs: how long to train: at most one of them; neither means one epoch.
        lr: peak learning rate.  ``schedule``: ``"cosine"`` (decay to 0 over the run; needs a known
            length: ``steps``, or data with ``len()``) or ``"constant"``.
        loss: ``"kl"`` (logits: temperature-scaled KL, see module docstring), ``"mse"`` (any output), or
            a callable ``(student_out, teacher_out) -> scalar`` given the raw model outputs.
            ``"kl"``/``"mse"`` use :func:`primary_output` of each output (the tensor, ``logits``, or the
            first tensor of a tuple/dict).
        temperature: ``T`` of the KL loss.
        labels: whether each batch is ``(inputs..., y)`` (the last element is the labels) or a dict with a
            ``"labels"`` key.  ``None`` (default): ``True`` when ``label_weight > 0`` or ``teacher`` is
            ``None``.  With ``labels=True`` and ``label_weight=0`` the labels are ignored.
        label_weight: weight of the cross-entropy term on the labels (added to the distillation term).
            With ``teacher=None`` it defaults to 1.
        train: ``"factors"`` (default), ``"all"``, or a list of parameter-name globs (module docstring).
        optimizer: ``"adam"`` (default), ``"adamw"`` or ``"sgd"`` (momentum 0.9); ``weight_decay``.
        max_grad_norm: clip the gradient norm of the trained parameters (``None``: no clipping).
        bn: ``"eval"`` (default) keeps every BatchNorm of the student in eval mode, i.e. its running
            statistics and the teacher's are the same numbers and are not updated by fine-tuning;
            ``"train"`` lets them update (use it when training from scratch).  Other modules (dropout)
            are in train mode during training.
        device: where to train (default: the device of the model's parameters); the teacher runs
            there too (a copy is moved if it lives elsewhere; the original teacher is not moved).
        progress: rich progress bar on stderr (default: if stderr is a TTY).
        seed: ``torch.manual_seed(seed)`` before training (dropout), if given.

    Returns:
        The trained model, in the train/eval mode ``model`` had, on ``device``.  A record of the run is
        attached as ``result.sketchpass_finetune`` (steps, epochs, trained parameter names and count,
        the loss of every step).
    """
    # --- validate at the edge
    if not isinstance(model, nn.Module):
        if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
            raise TypeError("finetune trains PyTorch models only: transform the torch model, fine-tune it, then "
                            "export it to ONNX")
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch nn.Module or None, got {type(teacher).__name__}")
    if data is None:
        raise ValueError("finetune needs data=: an iterable or DataLoader of input batches (no labels needed)")
    if isinstance(data, (torch.Tensor, dict)) or (isinstance(data, tuple) and data and
                                                   all(isinstance(t, torch.Tensor) for t in data)):
        data = [data]  # a single batch
    elif not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable or DataLoader of batches (tensors, tuples or dicts), got "
                        f"{type(data).__name__}")
    steps, epochs = _check_count("steps", steps), _check_count("epochs", epochs)
    if steps is not None and epochs is not None:
        raise ValueError(f"give steps= or epochs=, not both (got steps={steps}, epochs={epochs})")
    lr = _check_positive("lr", lr)
    temperature = _check_positive("temperature", temperature)
    weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
    if max_grad_norm is not None:
        max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable (student_out, teacher_out) -> scalar, "
                         f"got {loss!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    label_weight = _check_positive("label_weight", label_weight, allow_zero=True)
    if teacher is None:
        if labels is False:
            raise ValueError("teacher=None trains on labels only, but labels=False; pass a teacher to distil "
                             "from, or labelled batches (inputs, y)")
        labels = True
        label_weight = label_weight or 1.0
    elif labels is None:
        labels = label_weight > 0
    elif not labels and label_weight > 0:
        raise ValueError(f"label_weight={label_weight} needs labelled batches; set labels=True (batches "
                         f"(inputs..., y) or dicts with 'labels')")
    if teacher is model:
        raise ValueError("teacher is the model being trained; pass the original (uncompressed) model as teacher")
    if _is_one_shot(data) and epochs is not None and epochs > 1:
        raise ValueError(f"epochs={epochs} needs data that can be iterated several times (a list or DataLoader), "
                         f"got a one-shot {type(data).__name__}")
    if seed is not None:
        torch.manual_seed(seed)

    device = torch.device(device) if device is not None else _model_device(model)
    student = model if inplace else copy.deepcopy(model)
    student.to(device)
    if teacher is not None and _model_device(teacher) != device:
        teacher = copy.deepcopy(teacher).to(device)
    was_training = model.training
    chosen = _select(student, train)
    n_trained = sum(p.numel() for p in {id(p): p for p in chosen.values()}.values())
    frozen = {n: p.requires_grad for n, p in student.named_parameters()}
    chosen_ids = {id(p) for p in chosen.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen_ids)
    uniq = list({id(p): p for p in chosen.values()}.values())
    if optimizer == "sgd":
        opt = torch.optim.SGD(uniq, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(uniq, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(uniq, lr=lr, weight_decay=weight_decay)

    per_epoch = len(data) if hasattr(data, "__len__") and not _is_one_shot(data) else None
    if per_epoch == 0:
        raise ValueError("data is empty: it yields no batches")
    if steps is not None:
        total = steps
    else:
        total = per_epoch * (epochs or 1) if per_epoch is not None else None
    sched = None
    if schedule == "cosine" and total is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    n_epochs = epochs or (1 if steps is None else None)

    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    student.train()
    if bn == "eval":
        for mod in student.modules():
            if isinstance(mod, _BN):
                mod.eval()
    losses: list[float] = []
    step, epoch = 0, 0
    try:
        with progress_bar("fine-tuning" if teacher is not None else "training", total, progress) as adv:
            while (n_epochs is None or epoch < n_epochs) and (steps is None or step < steps):
                seen = 0
                for batch in iter_batches(data):
                    if steps is not None and step >= steps:
                        break
                    seen += 1
                    batch = move_batch(batch, device)
                    y = None
                    if labels:
                        batch, y = _split_labels(batch)
                    s_out = call_model(student, batch)
                    terms = []
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = call_model(teacher, batch)
                        if callable(loss):
                            terms.append(loss(s_out, t_out))
                        else:
                            terms.append(distillation_loss(primary_output(s_out), primary_output(t_out).detach(),
                                                           loss, temperature))
                    if y is not None and label_weight > 0:
                        logits = primary_output(s_out)
                        terms.append(label_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                                    y.reshape(-1)))
                    total_loss = sum(terms)
                    if not torch.is_tensor(total_loss) or total_loss.dim() != 0:
                        raise ValueError("the loss must be a scalar tensor (check loss=)")
                    if not torch.isfinite(total_loss):
                        bad = float(total_loss.detach())
                        raise FloatingPointError(f"the loss became {bad} at step {step}; lower lr= (now {lr:g}) "
                                                 f"or set max_grad_norm=")
                    opt.zero_grad(set_to_none=True)
                    total_loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(uniq, max_grad_norm)
                    opt.step()
                    if sched is not None:
                        sched.step()
                    step += 1
                    losses.append(float(total_loss.detach()))
                    adv(1, f"loss {losses[-1]:.4g}")
                if seen == 0:
                    if step == 0:
                        raise ValueError("data is empty: it yields no batches")
                    break
                epoch += 1
                if _is_one_shot(data):
                    if steps is not None and step < steps:
                        warnings.warn(f"data was a one-shot iterator and ran out after {step} of {steps} steps; "
                                      f"pass a list or DataLoader to loop over it", RuntimeWarning, stacklevel=2)
                    break
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(frozen.get(n, True))
        if teacher is not None:
            teacher.train(teacher_was_training)
        student.train(was_training)
    student.sketchpass_finetune = {
        "steps": step, "epochs": epoch, "trained_parameters": sorted(chosen), "trained_count": n_trained,
        "loss": (loss if isinstance(loss, str) else getattr(loss, "__name__", "callable")),
        "label_weight": label_weight, "train": train if isinstance(train, str) else list(train), "lr": lr,
        "losses": losses,
    }
    return student
