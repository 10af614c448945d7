"""Gated products in a function's code, ``act(gate) * up``, rewritten to call the gated kernel.

Shared by the rules that rewrite code with gated products (``gated_forward``: any module's ``forward``;
``experts``: a mixture-of-experts block's expert loop and gate). A **site** is a multiplication in the code
one of whose operands is an activation applied to something:

- ``self.act(G) * U`` or ``U * self.act(G)``, ``self.act`` a module attribute (Llama's ``act_fn``, timm's
  ``act``); or ``F.silu(G) * U`` with a function the gated kernel computes (``silu``, ``gelu``, ``relu``,
  ``sigmoid``: resolved through the function's globals, one positional argument, no keyword);
- through a variable: ``h = self.act(G)`` earlier in the same block, ``h`` read nowhere else (T5's
  ``hidden_gelu``); the activation then moves from that statement to the product;
- **packed**: ``g, u = E.chunk(2, dim=-1)`` is what reaches ``self.act(g) * u`` (Phi-3's ``gate_up_proj``,
  the MoE experts): the kernel reads both halves of ``E`` in place, and its gradient is ``E``'s, packed.

``act(G) * U`` is ``gated(G, U)`` by definition; ``gated`` rounds once where eager rounds twice. The
rewritten code calls ``self._fusedact_gated(site, ...)`` with the operands in their original order (so they
are evaluated in the original order too); what runs there is decided per module at patch time
(``plan``: the activation's kind, the biases folded) and checked at run time: where the tensors are not
what the kernel takes (different shapes that broadcast, dtypes, a chunk across another dim), the original
expression runs instead. Where ``G`` (or ``U``) is ``self.layer(x)`` alone, or a variable holding only that,
and ``layer`` is a Linear read nowhere else, its bias can be added in the kernel (``fold_bias``).
"""

import ast
import copy
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .context import Context, has_hooks
from .kinds import GATED, activation_kind, function_kind
from .layers import bias_like, bias_skipping_class
from .rewrite import can_compile, compile_function
from .source import (
    SIMPLE_STATEMENTS,
    attribute_uses,
    blocks,
    function_tree,
    only_reader,
    reaching_definition,
    self_attribute,
    single_call,
    walk_scope,
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Site:
    """One gated product found in the code."""

    index: int
    line: int  # in the original source file
    activation: str  # how the code names it: "self.act_fn", "F.silu"
    attribute: Optional[str]  # the module attribute that is the activation, or None for a function
    function: Optional[tuple]  # (kind, settings) of the function, resolved at patch time
    gate_operand_first: bool  # act(G) * U (True) or U * act(G)
    gate_layer: Optional[str]  # the self.<layer> whose output alone is G (its bias may fold), if any
    up_layer: Optional[str]
    packed_gate_first: Optional[bool]  # None: two tensors; else halves of one chunk, the gate first or second
    gate_width: Optional[str] = None  # the self.<layer> whose output width G has (scaled or not), if known
    up_width: Optional[str] = None
    # act(G * s) (True) or act(s * G) (False), s a number attribute or constant: the kernel's gate_scale
    gate_scale_right: Optional[bool] = None


@dataclass(frozen=True)
class Rewrite:
    """A function with its gated products rewritten, and the sites (indices ``start`` on)."""

    function: object
    sites: tuple


# --- Finding sites ------------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> Optional[list]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _resolve(node: ast.AST, function, local_names: set):
    """The object a dotted global name (``F.silu``, ``torch.sigmoid``) denotes, read without calling anything."""
    parts = _dotted(node)
    if parts is None or parts[0] in local_names:
        return None
    namespace = function.__globals__
    builtins = namespace.get("__builtins__", {})
    if parts[0] in namespace:
        value = namespace[parts[0]]
    elif isinstance(builtins, dict) and parts[0] in builtins:
        value = builtins[parts[0]]
    else:
        return None
    for part in parts[1:]:
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _local_names(tree: ast.FunctionDef) -> set:
    arguments = tree.args
    names = {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}
    names |= {a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    return names


def _activation_call(node: ast.AST, self_name: str, function, local_names: set) -> Optional[tuple]:
    """``self.act(G)`` or ``F.silu(G)``: (label, attribute or None, function kind or None, G)."""
    if not (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords):
        return None
    if isinstance(node.args[0], ast.Starred):
        return None
    attribute = self_attribute(node.func, self_name)
    if attribute is not None:
        return f"self.{attribute}", attribute, None, node.args[0]
    kind = function_kind(_resolve(node.func, function, local_names))
    if kind is not None:
        return ".".join(_dotted(node.func)), None, kind, node.args[0]
    return None


def _chunk(node: ast.AST, self_name: str) -> Optional[tuple]:
    """``E.chunk(2, dim=D)`` or ``E.chunk(2, D)`` with ``D`` -1 or ``self.attribute``: (E, D)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "chunk"):
        return None
    arguments = list(node.args)
    keywords = {keyword.arg: keyword.value for keyword in node.keywords}
    if set(keywords) - {"chunks", "dim"} or any(isinstance(a, ast.Starred) for a in arguments):
        return None
    chunks = arguments.pop(0) if arguments else keywords.pop("chunks", None)
    dim = arguments.pop(0) if arguments else keywords.pop("dim", None)
    if arguments or not (isinstance(chunks, ast.Constant) and chunks.value == 2):
        return None
    minus_one = isinstance(dim, ast.UnaryOp) and isinstance(dim.op, ast.USub) and getattr(dim.operand, "value", 0) == 1
    if not minus_one and self_attribute(dim, self_name) is None:
        return None
    return node.func.value, dim


def _scalar(node: ast.AST, self_name: str) -> bool:
    """``self.attribute`` or a number constant: what may be a scalar on the gate (checked a number per call)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    return self_attribute(node, self_name) is not None


def _scaled(gate: ast.AST, self_name: str) -> Optional[tuple]:
    """``G * s`` or ``s * G`` with ``s`` a ``_scalar``: (G, s, whether s is on the right)."""
    if not (isinstance(gate, ast.BinOp) and isinstance(gate.op, ast.Mult)):
        return None
    if _scalar(gate.right, self_name):
        return gate.left, gate.right, True
    if _scalar(gate.left, self_name):
        return gate.right, gate.left, False
    return None


class _Reader:
    """One function's code, read for sites: ``sites()`` lists (Site, product node, edit) in code order."""

    def __init__(self, tree: ast.FunctionDef, function, start: int, activations: frozenset) -> None:
        self.tree, self.function, self.start, self.activations = tree, function, start, activations
        self.self_name = tree.args.args[0].arg
        self.local_names = _local_names(tree)
        self.counts = attribute_uses(tree)

    def sites(self) -> list:
        found = []
        offset = self.function.__code__.co_firstlineno - 1  # the parsed source starts at the def (or decorator)
        for block in blocks(self.tree):
            for index, statement in enumerate(block):
                if not isinstance(statement, SIMPLE_STATEMENTS):
                    continue
                for node in walk_scope(statement):
                    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                        continue
                    for gate_operand_first in (True, False):
                        activated, up = (node.left, node.right) if gate_operand_first else (node.right, node.left)
                        site = None if isinstance(up, ast.Constant) else self._site(activated, up, block, index)
                        if site is not None:
                            fields, edit = site
                            line = node.lineno + offset
                            found.append(
                                (
                                    Site(self.start + len(found), line, *fields[:3], gate_operand_first, *fields[3:]),
                                    node,
                                    edit,
                                )
                            )
                            break
        return found

    def _activation(self, node: ast.AST) -> Optional[tuple]:
        call = _activation_call(node, self.self_name, self.function, self.local_names)
        return call if call is None or call[1] is None or call[1] in self.activations else None

    def _layer_of(self, expression: ast.AST, block: list, index: int) -> Optional[str]:
        """The layer whose output alone ``expression`` is: ``self.layer(x)``, or a variable holding only that."""
        if isinstance(expression, ast.Name):
            definition = reaching_definition(block, index, expression.id)
            if definition is None or not only_reader(self.tree, block, definition, expression.id, expression):
                return None
            statement = block[definition]
            if not isinstance(statement.targets[0], ast.Name):
                return None
            expression = statement.value
        call = single_call(expression, self.self_name)
        return call[0] if call and self.counts.get(call[0]) == 1 else None

    def _width_of(self, expression: ast.AST, block: list, index: int, depth: int = 0) -> Optional[str]:
        """The layer whose output width ``expression`` has: ``self.layer(x)``, that times or over a scalar
        attribute or constant (Falcon-H1's ``gate_proj(x) * gate_multiplier``), or a variable assigned one."""
        if depth > 4:
            return None
        if isinstance(expression, ast.Name):
            definition = reaching_definition(block, index, expression.id)
            statement = None if definition is None else block[definition]
            if statement is None or not isinstance(statement.targets[0], ast.Name):
                return None
            return self._width_of(statement.value, block, definition, depth + 1)
        if isinstance(expression, ast.BinOp) and isinstance(expression.op, (ast.Mult, ast.Div)):
            for side, other in ((expression.left, expression.right), (expression.right, expression.left)):
                scalar = _scalar(other, self.self_name)
                if scalar and (width := self._width_of(side, block, index, depth + 1)):
                    return width
            return None
        call = single_call(expression, self.self_name)
        return call[0] if call else None

    def _site(self, activated: ast.AST, up: ast.AST, block: list, index: int) -> Optional[tuple]:
        """((label, attribute, function kind, gate layer, up layer, packed gate first, gate width, up width),
        edit), or None."""
        call, temporary = self._activation(activated), None
        if call is None and isinstance(activated, ast.Name):  # h = self.act(G) earlier, h read only here
            definition = reaching_definition(block, index, activated.id)
            if definition is not None and isinstance(block[definition].targets[0], ast.Name):
                call = self._activation(block[definition].value)
                if call is not None and only_reader(self.tree, block, definition, activated.id, activated):
                    temporary = block[definition]
                else:
                    call = None
        if call is None:
            return None
        label, attribute, kind, gate = call
        if temporary is None and isinstance(gate, ast.Name) and isinstance(up, ast.Name) and gate.id != up.id:
            definition = reaching_definition(block, index, gate.id)
            if definition is not None and definition == reaching_definition(block, index, up.id):
                statement = block[definition]
                names = [n.id for n in getattr(statement.targets[0], "elts", ())]
                chunk = _chunk(statement.value, self.self_name)
                if chunk is not None and sorted(names) == sorted([gate.id, up.id]):
                    gate_first = names[0] == gate.id
                    return (label, attribute, kind, None, None, gate_first), (
                        "packed",
                        activated,
                        gate,
                        up,
                        (statement, chunk),
                    )
        # act(G * s) in the product itself: G is the kernel's gate, s its gate_scale (Falcon-H1's multiplier).
        scaled = None if temporary is not None else _scaled(gate, self.self_name)
        unscaled = gate if scaled is None else scaled[0]
        # A gate read at an earlier statement (a temporary's) folds only as self.layer(x) itself.
        gate_layer = (
            None if temporary is not None and isinstance(gate, ast.Name) else self._layer_of(unscaled, block, index)
        )
        up_layer = self._layer_of(up, block, index)
        gate_at = index if temporary is None else block.index(temporary)
        widths = (self._width_of(gate, block, gate_at), self._width_of(up, block, index))
        fields = (label, attribute, kind, gate_layer, up_layer, None, *widths, scaled and scaled[2])
        if scaled is not None:
            return fields, ("scaled", activated, gate, up, scaled)
        return fields, ("temporary" if temporary is not None else "direct", activated, gate, up, temporary)


# --- Rewriting ------------------------------------------------------------------------------------------------


class _Replace(ast.NodeTransformer):
    def __init__(self, replacements: dict) -> None:
        self.replacements = replacements

    def visit(self, node):
        if id(node) in self.replacements:  # and the sites inside its operands (a product within a gate)
            return self.generic_visit(self.replacements.pop(id(node)))
        return super().visit(node)


def _method(self_name: str, name: str, arguments: list) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name(self_name, ast.Load()), name, ast.Load()), arguments, [])


def activation_attributes(module: nn.Module) -> frozenset:
    """The names of ``module``'s children that are activations a gated kernel computes: which ``self.x(...)``
    in its code can be the activated operand of a product."""
    return frozenset(name for name, child in module.named_children() if (activation_kind(child) or ("",))[0] in GATED)


@functools.cache
def rewrite(function, start: int = 0, activations: frozenset = frozenset()) -> Optional[Rewrite]:
    """``function`` with each gated product it has calling the gated kernel, or None where it has none (or
    its code cannot be read or recompiled). ``activations``: the attributes that are activation modules (a
    product of two layers' outputs is not a site); functions are resolved from the code. Sites are numbered
    from ``start``."""
    original = function_tree(function)
    if original is None or not original.args.args or not can_compile(function, original):
        return None
    tree = copy.deepcopy(original)
    found = _Reader(tree, function, start, activations).sites()
    if not found:
        return None
    self_name = tree.args.args[0].arg
    replacements, packed_names, insertions = {}, {}, []
    for site, node, (form, activated, gate, up, extra) in found:
        if form == "packed":
            statement, (source, dim) = extra
            if id(statement) not in packed_names:  # one chunk may feed two products (timm's GluMlp)
                name = f"_fusedact_packed_{site.index}"
                packed_names[id(statement)] = name
                insertions.append((statement, ast.Assign([ast.Name(name, ast.Store())], source)))
                statement.value.func.value = ast.Name(name, ast.Load())
            activation = activated.func
            operands = [activation, gate, up] if site.gate_operand_first else [up, activation, gate]
            packed = ast.Name(packed_names[id(statement)], ast.Load())
            call = _method(self_name, "_fusedact_gated_packed", [ast.Constant(site.index), packed, dim, *operands])
        elif form == "scaled":  # act(G * s) -> G, s as the code evaluates them, s the kernel's gate_scale
            unscaled, scale, right = extra
            gate_operands = [unscaled, scale] if right else [scale, unscaled]
            activation = activated.func
            operands = [activation, *gate_operands, up] if site.gate_operand_first else [up, activation, *gate_operands]
            call = _method(self_name, "_fusedact_gated_scaled", [ast.Constant(site.index), *operands])
        else:
            if form == "temporary":  # h = self.act(G) -> h = G: the activation runs at the product now
                activation, extra.value = extra.value.func, extra.value.args[0]
                gate_operand = activated
            else:
                activation, gate_operand = activated.func, gate
            operands = [activation, gate_operand, up] if site.gate_operand_first else [up, activation, gate_operand]
            call = _method(self_name, "_fusedact_gated", [ast.Constant(site.index), *operands])
        replacements[id(node)] = ast.copy_location(call, node)
    tree = _Replace(replacements).visit(tree)
    for block in blocks(tree):
        for statement, assignment in insertions:
            if statement in block:
                block.insert(block.index(statement), ast.copy_location(assignment, statement))
    return Rewrite(compile_function(function, tree), tuple(site for site, _, _ in found))


# --- What runs at a site ----------------------------------------------------------------------------------


def _fits(gate, up) -> bool:
    """Whether the gated kernel takes these two operands as they are (else the original expression runs)."""
    return (
        isinstance(gate, Tensor)
        and isinstance(up, Tensor)
        and gate.dim() > 0
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.dtype in _DTYPES
        and gate.device == up.device
    )


class GatedProducts:
    """The methods a rewritten function calls at its sites; mixed into the patched module's class.

    ``_fusedact_sites`` (class) describes the code; ``_fusedact_products`` (instance, from ``plan``) maps a
    site to ``(activation, settings, gate bias layer, up bias layer)``, or None to run the original there.
    """

    _fusedact_sites: tuple = ()

    def _fusedact_gated(self, site: int, first, second, third):
        spec = self._fusedact_sites[site]
        act, gate, up = (first, second, third) if spec.gate_operand_first else (second, third, first)
        return self._fusedact_site(site, act, gate, up, None)

    def _fusedact_gated_scaled(self, site: int, first, second, third, fourth):
        """``act(G * s) * U`` (or with ``s * G``, ``U * act(...)``): ``gated(G, U, gate_scale=s)`` where ``s``
        is a number; anything else (a tensor ``s``) runs the original expression."""
        spec = self._fusedact_sites[site]
        if spec.gate_operand_first:
            act, left, right, up = first, second, third, fourth
        else:
            up, act, left, right = first, second, third, fourth
        gate, scale = (left, right) if spec.gate_scale_right else (right, left)
        return self._fusedact_site(site, act, gate, up, scale)

    def _fusedact_site(self, site: int, act, gate, up, scale):
        """One two-tensor site: the gated kernel where the operands fit it, else the original expression
        (with the biases folded here added as the layers would have, and the scale as the code applies it)."""
        spec, state = self._fusedact_sites[site], self._fusedact_products[site]
        gate_bias = up_bias = None
        scale_number = scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool))
        if state is not None:
            activation, params, gate_layer, up_layer = state
            gate_bias = None if gate_layer is None else bias_like(gate_layer, gate)
            up_bias = None if up_layer is None else bias_like(up_layer, up)
            if scale_number and _fits(gate, up):
                gate_scale = {} if scale is None else {"gate_scale": scale}
                return F.gated(gate, up, gate_bias, up_bias, activation, **gate_scale, **params)
        if gate_bias is not None:  # folded at patch time: the layers left their biases to this site
            gate = gate + gate_bias
        if up_bias is not None:
            up = up + up_bias
        if scale is not None:
            gate = gate * scale if spec.gate_scale_right else scale * gate
        return act(gate) * up if spec.gate_operand_first else up * act(gate)

    def _fusedact_gated_packed(self, site: int, packed, dim, first, second, third):
        spec = self._fusedact_sites[site]
        act, gate, up = (first, second, third) if spec.gate_operand_first else (second, third, first)
        state = self._fusedact_products[site]
        if (
            state is not None
            and isinstance(packed, Tensor)
            and packed.dim() > 0
            and dim in (-1, packed.dim() - 1)
            and packed.shape[-1] % 2 == 0
            and packed.dtype in _DTYPES
        ):
            activation, params = state[:2]
            return F.gated_packed(packed, None, activation, gate_first=spec.packed_gate_first, **params)
        return act(gate) * up if spec.gate_operand_first else up * act(gate)


# --- Per module: what each site runs ------------------------------------------------------------------------


@dataclass
class Plan:
    """What ``plan`` decided for one module: per site its state, and the layers whose biases fold."""

    products: dict
    folds: list  # (layer, bias-skipping class)

    def kinds(self) -> list:
        return sorted({state[0] for state in self.products.values() if state is not None})


def _site_activation(module: nn.Module, site: Site, context: Context) -> Optional[tuple]:
    if site.attribute is not None:
        act = getattr(module, site.attribute, None)
        if not isinstance(act, nn.Module) or has_hooks(act):
            return None
        kind = activation_kind(act)
    else:
        kind = site.function
    if kind is None or kind[0] not in GATED or not context.selected(kind[0]):
        return None
    return GATED[kind[0]], dict(kind[1])


def _width(module: nn.Module, name: Optional[str]) -> Optional[int]:
    layer = getattr(module, name, None) if name else None
    width = getattr(layer, "out_features", None) if isinstance(layer, nn.Module) else None
    if width is None and type(layer).__name__ == "Conv1D":  # transformers' (GPT-2's): weight [in, out]
        width = getattr(layer, "nf", None)
    return width if isinstance(width, int) else None


def _same_widths(module: nn.Module, site: Site) -> bool:
    """Whether the code proves both operands the same width: the halves of one chunk, or the outputs of two
    layers of the same width (> 1). Anything else may broadcast (SqueezeExcite's ``x * gate(x_se)``,
    Qwen2-MoE's ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``): the site is not claimed. Leading
    dimensions (a scale attribute that broadcasts) are checked at each call (``_fits``)."""
    if site.packed_gate_first is not None:
        return True
    gate, up = _width(module, site.gate_width), _width(module, site.up_width)
    return gate is not None and gate == up and gate > 1


def _foldable(module: nn.Module, name: Optional[str], context: Context, taken: set) -> Optional[tuple]:
    layer = getattr(module, name, None) if name else None
    if not context.fold_bias or not isinstance(layer, nn.Module) or id(layer) in taken:
        return None
    if getattr(layer, "bias", None) is None or not context.single_path(layer) or has_hooks(layer):
        return None
    target = bias_skipping_class(layer)
    if target is None or target[1] != -1:
        return None
    taken.add(id(layer))
    return layer, target[0]


def plan(module: nn.Module, sites: tuple, context: Context) -> Optional[Plan]:
    """Per site of ``module``'s rewritten code: the kernel's activation and the biases it adds, or None where
    the original expression must run (an activation the gated kernel does not compute, one with hooks, a kind
    not asked for). None when no site runs the kernel."""
    products, folds, taken = {}, [], set()
    for site in sites:
        activation = _site_activation(module, site, context)
        if activation is None or not _same_widths(module, site):
            products[site.index] = None
            continue
        gate = _foldable(module, site.gate_layer, context, taken)
        up = _foldable(module, site.up_layer, context, taken)
        folds += [fold for fold in (gate, up) if fold is not None]
        products[site.index] = (*activation, gate and gate[0], up and up[0])
    if not any(state is not None for state in products.values()):
        return None
    return Plan(products, folds)


def apply(module: nn.Module, fused_class: type, chosen: Plan, context: Context) -> None:
    """Make ``module`` run its rewritten code as ``chosen`` says (recorded for ``unpatch``)."""
    for layer, bias_skipping in chosen.folds:
        context.set_class(layer, bias_skipping)
    context.set_class(module, fused_class, _fusedact_products=chosen.products)
