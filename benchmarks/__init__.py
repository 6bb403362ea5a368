"""pini_kernels benchmarks.

Run ``pytest benchmarks/ --benchmark-only``, then ``python -m benchmarks.report``.
"""
