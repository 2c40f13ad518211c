"""Saving and loading compressed PyTorch models with their plan (DESIGN §2).

A model the torch pass emits carries its plan as the attribute ``sketchpass_plan`` (a
:class:`~sketchpass.plan.Plan`), and its ``state_dict()`` has one more entry, ``sketchpass_plan_json``: the
plan's JSON as a ``uint8`` tensor (a state-dict hook; it is not a buffer, so ``.to()`` and
``named_buffers()`` do not see it, and ``small.load_state_dict(sd)`` drops it).  So every ordinary way of
saving the weights saves the plan with them: ``torch.save(small.state_dict(), f)`` and Hugging Face
``small.save_pretrained(d)`` (safetensors).  The sketch matrices ``U`` are non-persistent buffers
(regenerated from the plan's seed), so what is saved is the effective parameters, the plan and the model's
other persistent buffers.

:func:`load` rebuilds the compressed model from such a save without recompressing: it takes the
uncompressed model (given, or — for a Hugging Face folder — built from its ``config.json``), puts in each
factored layer's module as the plan says (same class, sizes, seed and sketch keys), loads the saved
weights into it and checks that they fit exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .plan import Plan

PLAN_KEY = "sketchpass_plan_json"


def _encode(plan: Plan) -> torch.Tensor:
    return torch.tensor(list(plan.to_json(indent=None).encode("utf-8")), dtype=torch.uint8)


def _put_plan(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the module's current plan, as a ``uint8`` tensor of its JSON."""
    plan = getattr(module, "sketchpass_plan", None)
    if isinstance(plan, Plan):
        state_dict[prefix + PLAN_KEY] = _encode(plan)


def _drop_plan(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the stored plan is not a weight (``small.load_state_dict(sd)`` stays strict)."""
    state_dict.pop(prefix + PLAN_KEY, None)


def drop_stale_quantizer(model: nn.Module) -> str | None:
    """A transformers model loaded from a quantized checkpoint keeps its quantizer (``hf_quantizer``,
    ``config.quantization_config``) even when its weights were expanded to float — a GGUF file loaded with
    ``dtype=torch.float32`` — and ``save_pretrained`` then refuses it ("quantized with gguf and is not
    serializable").  When every parameter of ``model`` is a plain floating-point ``nn.Parameter``, nothing of the
    quantization is left: the marks are removed (in place; ``model`` is the pass's result, its config its own)
    and a note says so; otherwise ``None`` and nothing changes."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    if not all(type(p) is nn.Parameter and p.is_floating_point() for p in model.parameters()):
        return None
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(getattr(config, "quant_method", None), "value", getattr(config, "quant_method", "?"))
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if attr in vars(model):
            setattr(model, attr, value)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    return (f"the input model was marked as quantized ({method}) by transformers, but its weights are floating "
            "point: the result is a plain float model (no quantization_config; save_pretrained works)")


def attach_plan(model: nn.Module, plan: Plan) -> None:
    """Set ``model.sketchpass_plan`` and make every ``state_dict()`` of the model carry it (module docstring)."""
    model.sketchpass_plan = plan
    if _put_plan not in model._state_dict_hooks.values():
        model.register_state_dict_post_hook(_put_plan)
    if not any(getattr(h, "hook", h) is _drop_plan for h in model._load_state_dict_pre_hooks.values()):
        model.register_load_state_dict_pre_hook(_drop_plan)


def plan_from_state(state: dict, where: str) -> Plan:
    raw = state.pop(PLAN_KEY, None)
    if raw is None:
        raise ValueError(f"{where} holds no sketchpass plan (no {PLAN_KEY!r} entry): it was not saved from a model "
                         "sketchpass emitted (save small.state_dict() or small.save_pretrained() of the model "
                         "sp.transform / sp.apply returned)")
    try:
        return Plan.from_json(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where}: its stored sketchpass plan cannot be read ({exc})") from None


def _read_folder(path: Path) -> dict:
    """The state dict of a ``save_pretrained`` folder (safetensors or ``pytorch_model.bin``, sharded or not)."""
    index = [path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"]
    files: list[Path] = []
    for ix in index:
        if ix.is_file():
            files = sorted({path / f for f in json.loads(ix.read_text())["weight_map"].values()})
            break
    else:
        files = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()][:1]
    if not files:
        raise ValueError(f"{str(path)!r} holds no saved weights (no model.safetensors or pytorch_model.bin): not a "
                         "save_pretrained folder")
    state: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f), device="cpu"))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _hf_model(path: Path, state: dict) -> nn.Module:
    """The uncompressed model of a ``save_pretrained`` folder, built from its ``config.json``."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json: pass model= (the uncompressed model the weights "
                         "came from)")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{str(path)!r} is a Hugging Face folder: install transformers to load it, or pass model=") \
            from None
    config = transformers.AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{str(path)!r}: config.json names no model class transformers has ({arch!r}); pass "
                         "model= (the uncompressed model the weights came from)")
    model = cls(config)
    dtypes = {t.dtype for t in state.values() if torch.is_floating_point(t)}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    return model.eval()


def _check_dense(name: str, mod: nn.Module, spec) -> None:
    w = getattr(mod, "weight", None)
    want = spec.d_out * (spec.d_in // max(spec.groups, 1)) * math.prod(spec.kernel or ())
    if not isinstance(w, torch.Tensor) or w.numel() != want:
        got = "no weight" if not isinstance(w, torch.Tensor) else f"a weight of shape {tuple(w.shape)}"
        raise ValueError(f"the plan's layer {name!r} ({spec.op} {spec.d_in}→{spec.d_out}) does not match the "
                         f"model's module there ({type(mod).__name__} with {got}): the plan was made for another "
                         "model")


def rebuild(model: nn.Module, plan: Plan) -> nn.Module:
    """Put into ``model`` (in place) the factored modules the plan chose, with fresh weights."""
    from .fx.rewrite import set_module
    from .layers import form_module

    dist = plan.options.get("dist", "rademacher")
    for lp in plan.layers:
        d = lp.decision
        if d.method not in ("svd", "sketch"):
            continue
        if lp.spec.source != "module":
            raise ValueError(f"layer {lp.spec.name!r} was a functional use ({lp.spec.source}) rewritten in an fx "
                             "graph; such a model cannot be rebuilt from its class: save the whole emitted module "
                             "with torch.save(small) instead")
        try:
            dense = model.get_submodule(lp.spec.name)
        except AttributeError:
            raise ValueError(f"the plan's layer {lp.spec.name!r} is not a module of the given "
                             f"{type(model).__name__}: the plan was made for another model") from None
        _check_dense(lp.spec.name, dense, lp.spec)
        w = dense.weight
        mod = form_module(lp.spec, d.method, d.size, d.l or 1, dtype=w.dtype, device=w.device, name=lp.spec.name,
                          seed=plan.seed, dist=dist)
        mod.train(dense.training)
        set_module(model, lp.spec.name, mod)
    return model


def _hf_names(model: nn.Module, state: dict) -> dict:
    """``state`` with the keys renamed as transformers renames a checkpoint's keys when it loads one
    (``save_pretrained`` writes some models' weights under their original checkpoint names: Mixtral's
    ``block_sparse_moe`` for ``mlp``, ...); keys the model has are left as they are, and weight conversions other
    than renamings (which merge tensors) are not applied.  Unchanged without transformers' conversion mappings
    (transformers 4)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return state
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for: its names are its own
        return state
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    if not renames:
        return state
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in own:
            key, _ = rename_source_key(key, renames, [])
        out[key] = value
    return out


def _take_experts_apart(model: nn.Module, state: dict) -> None:
    """Fused experts modules (:mod:`sketchpass.fx.experts`) that the saved model holds taken apart (their weights
    saved per expert): taken apart in ``model`` too (in place), so that the saved weights fit."""
    from .fx.experts import is_fused, unfuse

    wanted = {path for path, mod in model.named_modules() if path and is_fused(mod)
              and any(k.startswith(path + ".up.") for k in state)}
    if wanted:
        unfuse(model, check=False, only=wanted)


def load(source, model: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in ``source`` (a ``save_pretrained`` folder or a ``torch.save``'d state
    dict) rebuilt from its stored plan and weights, without recompressing.  ``model``: the uncompressed model
    the weights came from (not modified; needed for a state-dict file, optional for a Hugging Face folder,
    which is rebuilt from its ``config.json``)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"sp.load takes a path to a folder or file, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".onnx":
        from .onnx.load import load as load_onnx

        return load_onnx(path)
    if path.is_dir():
        state = _read_folder(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle / zip errors of many kinds: not a saved state dict
            raise ValueError(f"{str(path)!r} is not a torch.save'd state dict ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict: save "
                             "small.state_dict()")
    plan = plan_from_state(state, repr(str(path)))
    if model is None:
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} holds the compressed weights and their plan but not the model's code: "
                             "pass model= (the uncompressed model they came from)")
        out = _hf_model(path, state)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model= must be an nn.Module, got {type(model).__name__}")
        out = copy.deepcopy(model)
    if path.is_dir():
        state = _hf_names(out, state)
    _take_experts_apart(out, state)
    rebuild(out, plan)
    own = out.state_dict(keep_vars=True)
    missing, unexpected = out.load_state_dict(state, strict=False)
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in missing if id(own[k]) not in loaded]  # a tied copy (lm_head ↔ embedding) is loaded
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''}"] if unexpected else [])
        raise ValueError(f"the weights in {str(path)!r} do not fit the model their plan describes ({'; '.join(parts)})")
    attach_plan(out, plan)
    return out
