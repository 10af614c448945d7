"""``fusedact.patch(model)``: make an existing model's activations fused, in place; nothing else changes.

These things happen, each only where fusedact can prove it computes the same function:

1. **Activation modules** (``nn.ReLU``, ``nn.GELU(approximate=...)``, ``nn.LeakyReLU(negative_slope)``,
   ``nn.ReLU6``, ``nn.Hardtanh``, ``nn.Hardswish``, ``nn.Hardsigmoid``, ``nn.Softplus``, ..., the objects
   Hugging Face's ``ACT2FN`` builds such as ``GELUActivation`` or ``NewGELUActivation``, BLOOM's
   ``BloomGelu``, and timm's) are replaced by the ``fusedact.nn`` module of the same kind and settings; the
   learned ``XIELUActivation`` (Apertus) by ``fusedact.nn.XIELU`` on its own Parameters and buffers.
   Classes are matched exactly: a subclass may override ``forward``, so it is left alone.
2. **Bias folding**: where a ``nn.Linear``, ``nn.Conv1d/2d/3d`` or Hugging Face ``Conv1D`` with a bias feeds
   an activation directly, the layer skips its bias and the activation adds it in its kernel (one read,
   one write instead of two of each). "Directly" is read from the code: adjacent children of a plain
   ``nn.Sequential``, or a parent whose ``forward`` is ``h = self.fc(h); h = self.act(h)`` or
   ``self.act(self.fc(h))`` with each attribute used once there (GPT-2's and BERT's MLPs, timm's ``Mlp``,
   CLIP's, ...). A classifier's ``Linear -> Softmax(dim=-1)`` (or ``LogSoftmax``) folds the same way.
   The bias ``Parameter`` stays where it was, so ``state_dict`` keys and values, checkpoints and optimizers
   see no difference; the layer's class becomes a subclass of its own that only changes ``forward``, so
   ``isinstance(layer, nn.Linear)`` still holds. A ``Linear`` subclass that does not override ``forward``, or
   whose ``forward`` adds the bias last as transformers' ``FalconLinear`` does, folds as a Linear.
3. **Gated MLPs** whose ``forward`` is ``self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
   (Llama, Mistral, Qwen2/3, Gemma and the many models that copy that MLP) run the gated kernel:
   SwiGLU for SiLU, GeGLU for GELU, ReGLU for ReLU, with ``gate_proj``/``up_proj`` biases folded, on
   ``fusedact.mlp``'s lean block (``lean_mlp=True``, the default; also Phi-3's packed MLP).
4. **Gated products** ``act(gate) * up`` anywhere in a forward (``gated_forward``, read with ``products``):
   Phi-3's packed ``gate_up_proj`` split with ``chunk(2, dim=-1)`` (both halves read in place), T5 v1.1's
   ``wi_0``/``wi_1``, timm's ``SwiGLU``/``GluMlp``, Falcon-H1's scaled gate (the number the kernel's
   ``gate_scale``), ``F.silu(w1(x)) * w3(x)``.
5. **Mixture-of-experts experts** of transformers 5 (Mixtral, Qwen2/3-MoE, DeepSeek-V3: one 3-D
   ``gate_up_proj``) run the packed gated kernel in every implementation their dispatcher picks (``experts``).
6. **Two-layer MLPs** ``fc2(act(fc1(x)))`` whose fc1 bias was folded (GPT-2's, ViT's, CLIP's, timm's ``Mlp``,
   ``Linear -> activation -> Linear`` in an ``nn.Sequential``) run the lean block (``lean_mlp``), which keeps
   x and ``fc1(x)`` for backward; where a call cannot (an active dropout between, hooks, wrappers, DTensor
   weights) the modules are called as the code calls them.

Activations a forward calls as functions (``F.gelu(x)``, ``torch.tanh``, ``scores.sigmoid()``) cannot be
swapped from outside: the report lists them with where they are called (``function_calls``).

Anything else is left as it is and the report says why (an activation-like class fusedact does not know,
a layer shared between two places, a forward it cannot read). ``unpatch(model)`` restores the original
modules and classes. Patching twice is harmless.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 2))
    >>> report = fusedact.patch(model)
    >>> [(change.path, change.action) for change in report.changes]
    [('1', 'fold_bias'), ('(root)', 'lean_mlp')]
    >>> model[1]
    FoldedBias(gelu, approximate='tanh', bias of Linear, dim=-1)
    >>> type(model).__name__  # runs model[0] -> model[2] as one lean block
    'LeanSequential'

The package has one module per rule (``gated_mlp``, ``experts``, ``gated_forward``, ``bias_folding``,
``lean_mlp``, ``activation_swap``), each with its proof, rewrite and undo and its own tests
(``tests/patching/``);
``driver`` walks the model and asks each rule in turn (``RULES``). Shared: ``kinds`` (which activation a
module is), ``layers`` (bias-skipping layers, ``FoldedBias``), ``source`` (reading code), ``rewrite``
(compiling a rewritten function), ``products`` (gated products in code), ``context`` (changes and undo).

Save a patched model with ``state_dict()`` (it loads into the unpatched model and back); pickling the
whole module object of a patched gated MLP is not supported (its class is made at patch time).
"""

from .driver import RULES, patch, unpatch
from .kinds import activation_kind, fused_module, looks_like_activation
from .layers import (
    Conv1dBiasInActivation,
    Conv2dBiasInActivation,
    Conv3dBiasInActivation,
    FoldedBias,
    LinearBiasInActivation,
)
from .lean_mlp import LeanSequential
from .report import Change, Left, PatchReport

# The public classes are named where users import them from (reprs, pickles of plain folded layers).
for _public in (Change, Left, PatchReport, FoldedBias, LinearBiasInActivation, Conv1dBiasInActivation):
    _public.__module__ = __name__
for _public in (Conv2dBiasInActivation, Conv3dBiasInActivation, LeanSequential):
    _public.__module__ = __name__
del _public

__all__ = [
    "RULES",
    "Change",
    "Conv1dBiasInActivation",
    "Conv2dBiasInActivation",
    "Conv3dBiasInActivation",
    "FoldedBias",
    "LeanSequential",
    "Left",
    "LinearBiasInActivation",
    "PatchReport",
    "activation_kind",
    "fused_module",
    "looks_like_activation",
    "patch",
    "unpatch",
]
