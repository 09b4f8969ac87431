"""ltbench: reproducible long-tailed recognition benchmarks."""

__version__ = "0.1.0"
