"""Triton kernels of fastcse, installed as ``fastcse.kernels``.

One op per file: the ``@triton.jit`` kernels, their host launchers and the ``torch.library``
registration live together. Users reach them through ``fastcse`` (``fastcse.info_nce``,
``fastcse.apply_rotary``), which also hold the chunked and eager PyTorch twins.
"""
