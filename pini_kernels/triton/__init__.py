"""The "triton" backend: Triton kernels of each op, with the same function names as the native
backend (``pini_kernels/native.py``), one module per table of ``pini_kernels/kernel_tables.py``.
Imported only when the backend is used: Triton is Linux-only.

- ``noise_stream.py``: ``NoiseKernels`` (``noise_forward``) and the ``@triton.jit`` helpers that
  draw the stream inside the other kernels;
- ``inject.py``: ``InjectKernels`` (``inject_forward`` / ``inject_backward``);
- ``logits_loss.py``: ``LossKernels`` (``cosines`` / ``loss_stats`` / ``loss_stats_grad`` /
  ``loss_grad``, and ``normalize`` / ``normalize_backward`` from ``normalize.py``, the row
  kernels of the per-sample flow), the logits' and the loss's;
- ``launch.py``: block sizes, warps and grids of the row-by-column kernels.
"""
