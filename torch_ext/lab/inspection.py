"""``fusedact inspect``: every activation of a model, layer by layer.

For each activation module: its path, class, kind and settings as ``fusedact.patching.activation_kind``
recognizes them (``("gelu", {"approximate": "tanh"})``, ``("leaky_relu", {"negative_slope": 0.2})``; a
``fusedact.nn.BiasAct`` too), and whether fusedact already runs it: a ``fusedact.nn`` module, or one
``fusedact.patch`` put there (``FoldedBias``, which adds the bias of the layer before it). Modules that
``fusedact.patching.looks_like_activation`` but that are not recognized are listed too, with kind ``None``:
``patch`` and ``swap`` leave them alone.

Activations the code calls as functions (``F.gelu(x)``, ``torch.tanh``, ``scores.sigmoid()``), which no
module shows, are listed with the function, file and line, and the modules whose ``forward`` calls them
(``fusedact.patching.function_calls``: read from each module's code, nothing is run).

Hugging Face models also name their activation in the config (``hidden_act``, ``activation_function``,
``hidden_activation``, ``dense_act_fn``, ...). Those names are listed with the kind they map to and how many
modules of that kind the model has: none means the activation is called functionally.

    >>> report = inspect_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(approximate="tanh")))
    >>> [(row["path"], row["kind"], row["params"], row["fused"]) for row in report["activations"]]
    [('1', 'gelu', {'approximate': 'tanh'}, False)]
"""

from collections import Counter
from typing import Optional

from torch import nn

from .. import nn as fused_nn
from ..patching import activation_kind, function_calls, looks_like_activation

# Hugging Face config attributes that name an activation (nested configs are searched too). Not T5's
# feed_forward_proj ("gated-gelu"): it names the MLP's shape, and T5 derives dense_act_fn from it.
CONFIG_KEYS = (
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "activation",
    "dense_act_fn",
    "projector_hidden_act",
    "act_fn",
)
_NESTED_CONFIGS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")


def is_fused(module: nn.Module) -> bool:
    """Whether fusedact runs ``module``: one of fusedact's own modules (``fusedact.nn``, or ``FoldedBias``
    from ``fusedact.patch``)."""
    return type(module).__module__.split(".")[0] == "fusedact"


def module_kind(module: nn.Module) -> Optional[tuple[str, dict]]:
    """``(kind, settings)`` of an activation module: ``fusedact.patching.activation_kind``, and the
    activation of a ``fusedact.nn.BiasAct`` (an activation with its own bias). None for anything else."""
    if isinstance(module, fused_nn.BiasAct):
        return module.activation, dict(module.params)
    return activation_kind(module)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_rows(model: nn.Module) -> list[dict]:
    """One row per activation module, in ``named_modules`` order (a module shared by several paths is listed
    once per path, with ``shared_with`` naming the first)."""
    rows, first_path = [], {}
    for path, module in model.named_modules(remove_duplicate=False):
        kind = module_kind(module)
        if kind is None and not looks_like_activation(module):
            continue
        name, params = kind if kind is not None else (None, {})
        rows.append(
            {
                "path": path or "(root)",
                "class": _class_name(module),
                "kind": name,
                "params": dict(params),
                "fused": is_fused(module),
                "shared_with": first_path.get(id(module)),
            }
        )
        first_path.setdefault(id(module), rows[-1]["path"])
    return rows


def _config_kind(value) -> Optional[tuple]:
    """The kind a Hugging Face activation name maps to (through ``ACT2FN`` and ``activation_kind``)."""
    if not isinstance(value, str):
        return None
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        return None
    try:
        module = ACT2FN[value]
    except KeyError:
        return None
    return activation_kind(module)


def config_activations(model: nn.Module, rows: Optional[list] = None) -> list[dict]:
    """The activations a Hugging Face ``model.config`` names: key, value, kind, and how many of the model's
    modules are of that kind (0: the model calls it as a function). ``rows``: ``activation_rows(model)``."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    kinds = Counter(row["kind"] for row in (activation_rows(model) if rows is None else rows))
    found, pending = [], [("", config)]
    while pending:
        prefix, current = pending.pop(0)
        for key in CONFIG_KEYS:
            value = getattr(current, key, None)
            if isinstance(value, str):
                kind = _config_kind(value)
                found.append(
                    {
                        "key": prefix + key,
                        "value": value,
                        "kind": kind[0] if kind else None,
                        "params": dict(kind[1]) if kind else {},
                        "modules": kinds.get(kind[0], 0) if kind else 0,
                    }
                )
        for nested in _NESTED_CONFIGS:
            child = getattr(current, nested, None)
            if child is not None and hasattr(child, "to_dict") and child is not current:
                pending.append((f"{prefix}{nested}.", child))
    return found


def function_call_rows(model: nn.Module) -> list[dict]:
    """One row per activation the code of ``model``'s modules calls as a function: ``{"call", "kind",
    "where", "code", "in", "modules"}`` (``in``: ``Class.function``; ``modules``: the paths that run it)."""
    return [
        {
            "call": call.call,
            "kind": call.kind,
            "where": call.where,
            "code": call.code,
            "in": f"{call.module}.{call.function}",
            "modules": list(call.paths),
        }
        for call in function_calls.find(model)
    ]


def inspect_model(model: nn.Module) -> dict:
    """Every activation of ``model``: ``{"model", "parameters", "activations": [row, ...], "counts",
    "fused", "function_calls": [...], "config": [...]}`` (as in the module docstring)."""
    rows = activation_rows(model)
    return {
        "model": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "activations": rows,
        "counts": dict(Counter(kind_label(row) for row in rows)),
        "fused": sum(row["fused"] for row in rows),
        "function_calls": function_call_rows(model),
        "config": config_activations(model, rows),
    }


def kind_label(row: dict) -> str:
    """``"relu"``, ``"gelu(approximate=tanh)"``, or ``"unrecognized"``: a row's kind with its settings."""
    if row["kind"] is None:
        return "unrecognized"
    if not row["params"]:
        return row["kind"]
    return f"{row['kind']}({', '.join(f'{key}={value}' for key, value in row['params'].items())})"


def format_inspection(report: dict, title: Optional[str] = None) -> str:
    """The report as the command prints it: a summary line, the table, the config's activations."""
    rows = report["activations"]
    counts = ", ".join(f"{count} {label}" for label, count in report["counts"].items()) or "none"
    lines = [
        f"{title or report['model']}: {report['model']}, {report['parameters']:,} parameters; "
        f"{len(rows)} activation modules ({counts}), {report['fused']} fused",
    ]
    if rows:
        table = [("path", "kind", "settings", "fused", "class")]
        for row in rows:
            settings = ", ".join(f"{key}={value}" for key, value in row["params"].items()) or "-"
            kind = row["kind"] or "? (not recognized)"
            path = row["path"] + (f" (= {row['shared_with']})" if row["shared_with"] else "")
            table.append((path, kind, settings, "yes" if row["fused"] else "no", row["class"]))
        widths = [max(len(line[column]) for line in table) for column in range(4)]
        lines.append("")
        for index, line in enumerate(table):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths + [0], strict=True)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths + [5]))
    if report.get("function_calls"):
        lines += ["", "called as functions in the code (not modules: no swap reaches them):"]
        for call in report["function_calls"]:
            modules = call["modules"]
            shown = ", ".join(modules[:3]) + (f", ... ({len(modules)} modules)" if len(modules) > 3 else "")
            lines.append(
                f"  {call['call']} ({call['kind']}) at {call['where']} in {call['in']}: {call['code']}  [{shown}]"
            )
    if report["config"]:
        lines += ["", "named in the Hugging Face config:"]
        for entry in report["config"]:
            if entry["kind"] is None:
                where = "not an activation fusedact knows"
            elif entry["modules"]:
                where = f"{entry['kind']}: {entry['modules']} module(s) above"
            else:
                where = f"{entry['kind']}: no module of that kind, so the model calls it as a function"
            lines.append(f"  {entry['key']} = {entry['value']!r} -> {where}")
    return "\n".join(lines)
