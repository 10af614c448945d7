"""Optional packages the tests use where installed."""

import importlib.util

import pytest


def _transformers_models() -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    from fusedact import _hub_kernels

    _hub_kernels.import_installed_kernels()  # (a worker process may import this before fusedact)
    import transformers

    return transformers.utils.is_torch_available()


# transformers 5 needs torch >= 2.6 for its models and, under torch 2.5 (the oldest fusedact supports),
# imports with them disabled: only configs and tokenizers.
TRANSFORMERS_MODELS = _transformers_models()
needs_transformers_models = pytest.mark.skipif(
    not TRANSFORMERS_MODELS, reason="transformers' models do not run here (not installed, or not beside this torch)"
)


def transformers_with_models():
    """transformers, where its models run beside this torch, else a skip (the whole module's at module level)."""
    transformers = pytest.importorskip("transformers")
    if not TRANSFORMERS_MODELS:
        pytest.skip(f"transformers {transformers.__version__} runs no models beside this torch",
                    allow_module_level=True)  # fmt: skip
    return transformers
