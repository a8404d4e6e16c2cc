"""Benchmarks of p2v-fast (`p2v bench`): seconds per frame of every stage, per backend.

- :mod:`benchmarks.bench`: :class:`BenchOptions` and :func:`run_bench` (the measurements and the JSON report)
- :mod:`benchmarks.arch`: the full-size SD2-depth architecture with random weights (``--arch sd2-depth``)
- :mod:`benchmarks.flops`: UNet FLOPs per call, counted on the meta device
- :mod:`benchmarks.timing`: clocks (device-synchronised; CUDA events), spreads, peak memory
- :mod:`benchmarks.hardware`: machine, device, versions and the peak-FLOP/s table
- :mod:`benchmarks.report`: the rich and Markdown tables
"""
