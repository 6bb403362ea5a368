"""PiNI on open_clip: noise generators, injection points, few-shot trainer and CLI.

Being built on top of ``pini_kernels``; see the README's Status section.
"""
