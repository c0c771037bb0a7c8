"""Triton kernels of fastcse, installed as ``fastcse.kernels``.

One op family per file: the ``@triton.jit`` kernels, their host launchers and the
``torch.library`` registration live together (``infonce``, ``rope``, ``biased_attention``,
``dropout_add_norm``); ``philox_dropout`` holds the dropout mask the attention and norm kernels share.
Two modules here import no Triton, so the engine can use them where Triton is not installed:
``_triton_utils`` (is Triton there, is it interpreted) and ``infonce_chunks`` (the loss's row-chunk
loop, shared by the chunked and Triton tiers).

The layer stands on torch, triton and ``fastcse.kernels`` only, never on the engine
(``tests/test_layering.py``). Users reach the kernels through ``fastcse`` (``fastcse.info_nce``,
``fastcse.apply_rotary``, ``fastcse.biased_attention``), whose per-op modules hold the input
checks, the eager references, the chunked twins and the dispatch.
"""
