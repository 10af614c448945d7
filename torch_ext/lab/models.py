"""What ``MODEL`` may name on the lab's command line, and how it becomes an ``nn.Module`` (random weights,
nothing downloaded):

- a built-in tiny transformers model (``TINY_MODELS``: ``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``, ...),
  a few tens of thousands of parameters with the real architecture's activations;
- a local directory holding a transformers ``config.json`` (or the file itself): the model it describes,
  built with ``AutoModel.from_config``;
- ``module:callable`` or ``path/to/file.py:callable``: whatever the callable returns (an ``nn.Module``);
- otherwise a timm model name, built with ``timm.create_model(name, pretrained=False)``.

    >>> model = load_model("tiny-gpt2")
    >>> type(model).__name__
    'GPT2Model'
"""

import difflib
import importlib
import importlib.util
import json
import os
import sys

import torch
from torch import nn

from .specs import LabError

# name -> (transformers config class, its keyword arguments): the real architecture, tiny sizes.
TINY_MODELS = {
    "tiny-llama": (
        "LlamaConfig",
        dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    "tiny-gpt2": (
        "GPT2Config",
        dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "tiny-bert": (
        "BertConfig",
        dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    ),
    "tiny-t5": (
        "T5Config",
        dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    ),
    "tiny-vit": (
        "ViTConfig",
        dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
    ),
}

_MODEL_FORMS = (
    "MODEL is a built-in tiny transformers model ({tiny}), a local transformers config directory or config.json, "
    "module:callable (or path/to/file.py:callable) returning an nn.Module, or a timm model name"
)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LabError("transformers models need transformers: pip install transformers") from None
    if not transformers.utils.is_torch_available():  # (transformers 5 under torch 2.5: configs only)
        raise LabError(
            f"transformers {transformers.__version__} runs no models beside torch {torch.__version__}: "
            "install a newer torch, or a transformers that supports this one"
        )
    return transformers


def _from_config(config) -> nn.Module:
    transformers = _transformers()
    try:
        return transformers.AutoModel.from_config(config)
    except ValueError as error:  # a config type with no base model class
        raise LabError(f"cannot build a model from {type(config).__name__}: {error}") from None


def tiny_model(name: str) -> nn.Module:
    """One of ``TINY_MODELS``, built from its config with random weights."""
    class_name, settings = TINY_MODELS[name]
    return _from_config(getattr(_transformers(), class_name)(**settings))


def config_model(path: str) -> nn.Module:
    """The transformers model a local config directory (or ``config.json`` file) describes."""
    transformers = _transformers()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise LabError(f"{path} is a directory without a config.json")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        try:
            with open(path) as file:
                settings = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            raise LabError(f"cannot read a transformers config from {path}: {error}") from None
        if "model_type" not in settings:
            raise LabError(f"{path} has no model_type: not a transformers config")
        config = transformers.AutoConfig.for_model(**settings)
    return _from_config(config)


def callable_model(text: str) -> nn.Module:
    """``module:callable`` or ``file.py:callable``: the module it returns (or names)."""
    location, _, attribute = text.rpartition(":")
    try:
        if location.endswith(".py") or os.sep in location:
            if not os.path.isfile(location):
                raise LabError(f"no such file: {location}")
            spec = importlib.util.spec_from_file_location(os.path.basename(location)[:-3] or "model", location)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # As `python -m`, find modules of the current directory also when run as the `fusedact` script.
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(location)
    except ImportError as error:
        raise LabError(f"cannot import {location!r}: {error}") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise LabError(f"{location!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    model = target if isinstance(target, nn.Module) else target() if callable(target) else target
    if not isinstance(model, nn.Module):
        raise LabError(f"{text} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def timm_model(name: str) -> nn.Module:
    """A timm model with random weights (``pretrained=False``: nothing is downloaded)."""
    try:
        import timm
    except ImportError:
        raise LabError(
            f"unknown model {name!r}: not a built-in, a config path or module:callable, and timm (for timm "
            f"model names) is not installed. " + _MODEL_FORMS.format(tiny=", ".join(TINY_MODELS))
        ) from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LabError(f"unknown model {name!r}{hint}. " + _MODEL_FORMS.format(tiny=", ".join(TINY_MODELS))) from None
    return timm.create_model(name, pretrained=False)


def load_model(text: str) -> nn.Module:
    """``MODEL`` as the command line takes it (see the module docstring) -> an ``nn.Module``."""
    if text in TINY_MODELS:
        return tiny_model(text)
    if os.path.exists(text):
        return config_model(text)
    if ":" in text:
        return callable_model(text)
    if text.startswith("tiny-"):
        close = difflib.get_close_matches(text, list(TINY_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LabError(f"unknown built-in model {text!r}{hint}; the built-ins are: {', '.join(TINY_MODELS)}")
    return timm_model(text)
