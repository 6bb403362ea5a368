"""The "triton" backend: Triton kernels of each op, with the same function names as the native
backend (``pini_kernels/native.py``). Imported only when the backend is used: Triton is Linux-only.

- ``noise_stream.py``: the noise stream (``noise_forward``) and the ``@triton.jit`` helpers that
  draw it inside the other kernels;
- ``inject.py``: ``inject_forward`` / ``inject_backward``;
- ``cosine.py``: ``normalize`` / ``normalize_backward`` / ``loss_stats`` / ``loss_stats_grad`` /
  ``loss_grad``;
- ``launch.py``: block sizes, warps and grids of the row-by-column kernels.
"""
