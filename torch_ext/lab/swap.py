"""``fusedact swap``: replace every activation of one kind with another, and say what changed.

The kinds are those ``fusedact inspect`` shows (``fusedact.patching.activation_kind``: torch.nn, Hugging Face,
timm and fusedact modules alike); each match is replaced, in place, by the fusedact module
``fusedact.patching.fused_module`` builds for the target, so the swapped activation runs fused. A
``fusedact.nn.BiasAct`` becomes a ``BiasAct`` of the target that keeps the same bias ``Parameter``. A module
instance shared by several paths is replaced by one new instance at all of them.

A model ``fusedact.patch`` has changed is unpatched for the swap and patched again after it (with ``patch``'s
defaults), so the new activation gets the preceding layer's bias folded in or a Llama-style MLP's gated
kernel wherever the old one had them, and ``fusedact.unpatch`` afterwards gives the swapped, unpatched model.

Elementwise kinds swap among themselves, gated ones (``glu``, ``swiglu``, ``geglu``, ``reglu``: they halve
the last dimension) only with each other. Activations a model calls as functions (a Hugging Face config's
``hidden_act`` with no module) cannot be swapped this way; ``inspect`` lists them.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [(change["path"], change["after"]) for change in swap(model, "relu", "leaky_relu", negative_slope=0.1)]
    [('1', 'LeakyReLU(negative_slope=0.1)')]
"""

import difflib
from collections import Counter
from dataclasses import asdict
from typing import Optional, Union

import torch
from torch import nn

from .. import functional, patching
from .. import nn as fused_nn
from .inspection import activation_rows, config_activations, kind_label
from .specs import ALIASES, GATED, ActivationSpec, LabError, check_activation, parse_activation

# Kinds an activation module may have (``activation_kind``): fusedact's functions, and the modules with a
# weight or a dim of their own.
SOURCE_KINDS = tuple(dict.fromkeys((*functional.ACTIVATIONS, "prelu", "softmax", "log_softmax")))


def source_filter(source: Union[str, ActivationSpec]) -> tuple[str, Optional[dict]]:
    """``"relu"`` -> every relu; ``"gelu:approximate=tanh"`` (or ``"gelu_tanh"``) -> only gelus with
    exactly those settings. An unknown kind is a ``LabError`` naming the valid ones."""
    if isinstance(source, ActivationSpec):
        return source.name, dict(source.params)
    name, _, rest = source.strip().partition(":")
    if rest or name in ALIASES:
        spec = parse_activation(source)
        return spec.name, dict(spec.params)
    if name not in SOURCE_KINDS:
        close = difflib.get_close_matches(name, SOURCE_KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LabError(f"unknown activation kind {name!r}{hint}; choose from: {', '.join(SOURCE_KINDS)}")
    return name, None


def _matches(row: dict, name: str, params: Optional[dict]) -> bool:
    if row["kind"] != name:
        return False
    return params is None or all(row["params"].get(key) == value for key, value in params.items())


def _device_and_dtype(model: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _replacement(old: nn.Module, spec: ActivationSpec) -> nn.Module:
    """The fusedact module computing ``spec`` where ``old`` was (keeping a bias ``old`` adds)."""
    if isinstance(old, fused_nn.BiasAct):
        new = fused_nn.BiasAct(old.num_features, spec.name, dim=old.dim, **spec.params)
        new.bias = old.bias  # the same Parameter: same state_dict key and value
        return new
    if isinstance(old, patching.FoldedBias):  # only where unpatch could not restore it (copied records)
        return patching.FoldedBias(spec.name, spec.params, old.bias_of, old.dim)
    try:
        return patching.fused_module(spec.name, **spec.params)
    except (TypeError, ValueError) as error:
        raise LabError(f"cannot build a fusedact module for {spec.label}: {error}") from None


def _replace(model: nn.Module, name: str, source_params: Optional[dict], spec: ActivationSpec) -> list:
    device, dtype = _device_and_dtype(model)
    replacements: dict[int, nn.Module] = {}
    changes = []
    for row in activation_rows(model):
        if not _matches(row, name, source_params):
            continue
        if row["path"] == "(root)":
            raise LabError("the model itself is the activation: there is no parent to put the new one in")
        old = model.get_submodule(row["path"])
        if id(old) not in replacements:
            new = _replacement(old, spec)
            if device is not None:
                new = new.to(device=device, dtype=dtype)  # a PReLU's weight; the others hold no tensors
            new.train(old.training)
            replacements[id(old)] = new
        parent_path, _, child = row["path"].rpartition(".")
        setattr(model.get_submodule(parent_path), child, replacements[id(old)])
        changes.append(
            {"path": row["path"], "class": row["class"], "before": repr(old), "after": repr(replacements[id(old)])}
        )
    return changes


def _swap(
    model: nn.Module, source: Union[str, ActivationSpec], target: Union[str, ActivationSpec], params: dict
) -> tuple[list, Optional[patching.PatchReport]]:
    """The changes, and the report of patching the model again when it was patched."""
    name, source_params = source_filter(source)
    if isinstance(target, str):
        target = parse_activation(target)
    spec = check_activation(ActivationSpec(target.name, {**target.params, **params}))
    if (name in GATED) != spec.gated:
        gated, other = (spec.label, name) if spec.gated else (name, spec.label)
        raise LabError(
            f"{gated} is gated (it halves the last dimension), {other} is not: gated activations "
            f"({', '.join(sorted(GATED))}) swap only with each other"
        )
    undone = patching.unpatch(model)
    try:
        changes = _replace(model, name, source_params, spec)
    finally:
        repatched = patching.patch(model) if undone else None
    return changes, repatched


def swap(model: nn.Module, source: Union[str, ActivationSpec], target: Union[str, ActivationSpec], **params) -> list:
    """Replace, in ``model``, every activation of kind ``source`` by the fusedact module for ``target``.

    ``source``: a kind (``"relu"``), or a kind with settings (``"gelu:approximate=tanh"``) to match only
    those. ``target``: an activation spec (``"leaky_relu:negative_slope=0.2"``) or a name with ``params``.
    Returns one ``{"path", "class", "before", "after"}`` per replaced path (empty when nothing matched).
    A patched model is patched again after the swap (module docstring).
    """
    return _swap(model, source, target, params)[0]


def _kind_counts(rows: list) -> dict:
    return dict(Counter(row["kind"] or "unrecognized" for row in rows))


def _patch_summary(report: patching.PatchReport) -> dict:
    return {
        "changes": [asdict(change) for change in report.changes],
        "left": [asdict(item) for item in report.left],
        "text": str(report),
    }


def swap_model(model: nn.Module, source: str, target: str, patch: bool = False) -> dict:
    """What the command does: ``swap`` (an error if nothing matched, naming the kinds the model has), then
    with ``patch=True`` ``fusedact.patch`` on the result. Returns the changes, the kinds before and after,
    the activations the config names that the model calls as functions (so not swapped), and the patch
    report (also when the model was patched before and so patched again)."""
    rows_before = activation_rows(model)
    functional_before = [
        entry for entry in config_activations(model, rows_before) if entry["kind"] and not entry["modules"]
    ]
    changes, repatched = _swap(model, source, target, {})
    if not changes:
        present = Counter(kind_label(row) for row in rows_before)
        listing = ", ".join(f"{label} x{count}" for label, count in present.items()) or "no activation modules"
        raise LabError(f"no activation of kind {source!r} in {type(model).__name__}; it has: {listing}")
    patch_report = repatched
    if patch and patch_report is None:
        patch_report = patching.patch(model)
    return {
        "model": type(model).__name__,
        "source": source,
        "target": parse_activation(target).label if isinstance(target, str) else target.label,
        "changes": changes,
        "kinds_before": _kind_counts(rows_before),
        "kinds_after": _kind_counts(activation_rows(model)),
        "functional": functional_before,
        "repatched": repatched is not None,
        "patch": None if patch_report is None else _patch_summary(patch_report),
    }


def format_swap(report: dict) -> str:
    """The report as the command prints it."""
    lines = [f"{report['model']}: {report['source']} -> {report['target']}, {len(report['changes'])} replaced", ""]
    width = max(len(change["path"]) for change in report["changes"])
    for change in report["changes"]:
        lines.append(f"  {change['path'].ljust(width)}  {change['before']}  ->  {change['after']}")

    def counts(kinds: dict) -> str:
        return ", ".join(f"{count} {kind}" for kind, count in kinds.items()) or "none"

    lines += [
        "",
        f"activations before: {counts(report['kinds_before'])}",
        f"activations after:  {counts(report['kinds_after'])}",
    ]
    for entry in report["functional"]:
        lines.append(f"not swapped: config {entry['key']} = {entry['value']!r} is called as a function, not a module")
    if report["patch"] is not None:
        why = "the model was patched, so it is patched again" if report["repatched"] else "--patch"
        lines += ["", f"fusedact.patch ({why}):", report["patch"]["text"]]
    return "\n".join(lines)
