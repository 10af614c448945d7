"""Benchmark harness for fusedact: ``python -m bench --help``; ``bench/NOTES.md`` for the GPU run.

One story, one module each, read in this order:

- ``cases.py``: the ops, the providers (fusedact, eager, torch.compile, Liger), shapes, minimal byte
  counts, inputs, the float64 reference and every provider's errors;
- ``timing.py``: ``do_bench`` quantiles on the GPU, a wall-clock timer on the CPU, the copy bandwidth;
- ``sweep.py``: one op x dtype x shape, every provider and mode, into records;
- ``memory.py``: peak training memory and step time of two MLP blocks;
- ``linear.py``: the bias in the GEMM, eager ``act(F.linear(a, W, b))`` against fusedact after the same GEMM;
- ``overhead.py``: host time per call on a tiny tensor, and one call taken apart layer by layer;
- ``report.py``: environment, tables, the issue's targets, JSON / CSV / markdown / PNG, progress;
- ``__main__.py``: the command line (``main(argv)``);
- ``ptx_report.py``: registers, spills and load widths of every kernel compiled for sm_90, no GPU needed.
- ``e2e.py``: one training step of a small Llama and a ViT, unpatched vs patched vs compiled;
- ``gpu_run.py``: the whole GPU run in one call, each part time-boxed (``--dry-run`` on the CPU).

This package imports nothing itself, so that ``python -m bench`` runs ``__main__`` exactly once.
"""
