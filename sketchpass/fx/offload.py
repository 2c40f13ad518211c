"""Models dispatched or offloaded by ``accelerate`` (``from_pretrained(device_map=..., offload_folder=...)``,
``accelerate.cpu_offload``, ``disk_offload``, ``dispatch_model``).

Such a model's offloaded weights are not in its modules: they sit on the ``meta`` device and an
``AlignDevicesHook`` on the module loads them from its ``weights_map`` (CPU tensors, or memory-mapped files of
an offload folder) for each forward and drops them after.  The pass needs real weights (it reads every
layer's weight to fit it, runs blocks alone, copies modules), so it works on a **gathered copy**: the model
copied with its hooks shared rather than copied (a weights map is not duplicated wholesale), every tensor still
on ``meta`` filled with a copy of its value in its hook's weights map, the hooks removed from the copy and every
tensor moved to the CPU.  The user's model is not modified (it keeps its hooks and its offloaded weights), and
shares no tensor with the result.  The gathered copy is the pass's own, so its working copy shares its tensors
(:func:`sketchpass.fx.trace.capture` with ``owned``) instead of copying them again: the pass holds the weights
once — read from disk, copied from the CPU weights map or from the GPUs — and the CPU must hold them.  The
compressed model is returned without hooks, on the CPU."""

from __future__ import annotations

import copy

from torch import nn


def hooked(model: nn.Module) -> bool:
    """Does ``accelerate`` manage any module of ``model`` (an ``_hf_hook``)?"""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def _align_hooks(hook) -> list:
    inner = getattr(hook, "hooks", None)  # SequentialHook
    hooks = list(inner) if inner is not None else [hook]
    return [h for h in hooks if hasattr(h, "weights_map")]


def _read_fresh(weights_map, name: str) -> bool:
    """Does reading ``name`` from ``weights_map`` give a new tensor (read from an offload folder's file), rather
    than one the map holds (a CPU weights map is the user's own tensors)?"""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    key = name
    while isinstance(weights_map, PrefixedDataset):
        key = weights_map.prefix + key
        weights_map = weights_map.dataset
    return isinstance(weights_map, OffloadedWeightsLoader) and key not in weights_map.state_dict


def _put(module: nn.Module, name: str, value) -> None:
    """Set the parameter or buffer ``name`` (dotted) of ``module`` to ``value`` itself, without a copy (accelerate's
    ``set_module_tensor_to_device`` copies it once more: a second copy of the largest tensor at the peak)."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value.to(owner._buffers[leaf].dtype)


def gathered(model: nn.Module) -> tuple[nn.Module, str]:
    """A hook-free CPU copy of an ``accelerate``-managed model, and a note for the plan (module docstring)."""
    from accelerate.hooks import remove_hook_from_module

    memo = {}
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is not None:
            memo[id(hook)] = hook  # shared: a CPU weights map must not be copied with the model
    work = copy.deepcopy(model, memo)
    offloaded = 0
    devices = {str(t.device) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"}
    for m in work.modules():
        for h in _align_hooks(getattr(m, "_hf_hook", None)):
            if h.weights_map is None:
                continue
            tensors = list(m.named_parameters(recurse=h.place_submodules))
            tensors += list(m.named_buffers(recurse=h.place_submodules))
            for name, t in tensors:
                if t.device.type == "meta":
                    if name not in h.weights_map:
                        raise ValueError(f"accelerate offloaded {name!r} of {type(m).__name__} but its weights map "
                                         "does not hold it: the model's weights cannot be gathered")
                    # a copy, unless read afresh from a file: a CPU weights map holds the user's own tensors, which
                    # what the pass hands back (the compressed model keeps the dense layers' weights of this copy)
                    # must not share
                    value = h.weights_map[name]
                    if not _read_fresh(h.weights_map, name):
                        value = value.clone()
                    _put(m, name, value.to("cpu"))
                    offloaded += 1
    # the hooks go without detach_hook (which would put offloaded weights back on their original device):
    # remove_hook_from_module then only restores every module's own forward
    for m in work.modules():
        m.__dict__.pop("_hf_hook", None)
    remove_hook_from_module(work, recurse=True)
    still = [n for n, t in list(work.named_parameters()) + list(work.named_buffers()) if t.device.type == "meta"]
    if still:
        raise ValueError(f"{len(still)} tensors of the model are on the meta device and no accelerate hook holds "
                         f"their values (first: {still[0]}): load the model's weights first")
    work.to("cpu")
    tie = getattr(work, "tie_weights", None)
    if callable(tie):  # weights a transformers model ties (lm_head to the embedding) were filled one by one
        tie()
    work.__dict__.pop("hf_device_map", None)  # transformers' record of the dispatch: no longer true
    where = f"; the rest on {', '.join(sorted(devices))}" if devices else ""
    note = (f"accelerate-managed model ({offloaded} tensors offloaded{where}): the pass works on a gathered "
            "copy on the CPU (offloaded weights read from the hooks' weights maps; the input model keeps its "
            "hooks); the compressed model is returned without hooks, on the CPU")
    return work, note


def real_tensors(model: nn.Module) -> None:
    """Refuse a model with weights on the meta device that no hook holds (nothing to fit)."""
    meta = [n for n, t in model.named_parameters() if t.device.type == "meta"]
    if meta:
        raise ValueError(f"{len(meta)} parameters of the model are on the meta device (first: {meta[0]}): load its "
                         "weights first (from_pretrained, load_state_dict(assign=True)) or let accelerate offload "
                         "them")
