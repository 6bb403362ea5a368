"""pini_kernels benchmarks: ``pytest benchmarks/ --benchmark-only``, then ``python -m benchmarks.report``."""
