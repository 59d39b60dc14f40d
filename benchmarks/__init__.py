"""Benchmarks, run by hand: ``python -m benchmarks NAME [options]`` (``python -m benchmarks`` lists them).

Each benchmark is a module ``benchmarks/<name>.py`` with a ``main(argv) -> int`` function and a module docstring
whose first line describes it. Every figure is printed beside its baseline and the ratio, measured in one run.
"""
