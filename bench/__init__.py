"""Benchmark harness for fusedact: ``python -m bench --help``.

The code lives in ``bench/__main__.py`` (``main(argv)`` runs it); this package imports nothing, so that
``python -m bench`` runs that module exactly once.
"""
