"""The dropout keep-mask every fastcse kernel draws: Philox, 16 bits per element, no stored mask.

One ``@triton.jit`` helper, :func:`philox_keep`, shared by the attention kernels
(:mod:`fastcse.kernels.biased_attention`: a stream per (batch, head), rows are queries, columns
keys) and the residual-norm kernels (:mod:`fastcse.kernels.dropout_add_norm`: a stream per call
site, rows are tokens, columns features). The mask is a pure function of (seed, stream, row,
column), never of a kernel's tiles, so a backward pass regenerates its forward's mask whatever
blocks either uses, and a test can draw it on its own.
"""

import triton
import triton.language as tl


@triton.jit
def philox_keep(seed, stream, rows, start_col, n_cols, dropout_p,
                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_COLS) keep-mask of ``rows`` and columns ``start_col + arange(BLOCK_COLS)``.

    Key ``seed + stream``, counter ``row * ceil(n_cols / 8) + col // 8`` (32-bit: callers keep
    ``rows * ceil(n_cols / 8)`` below 2**31); one ``tl.randint4x`` call (four 32-bit words) gives
    the eight columns with the same ``col // 8`` 16 bits each (column 8 o + 2 w + 1 the high half of
    word w, 8 o + 2 w the low half): an eighth of ``tl.rand``'s Philox calls. A column is kept
    when its 16 bits are >= dropout_p * 2**16, so the rate is dropout_p to within 2**-16 (the kept
    values are still scaled by 1 / (1 - dropout_p); FlashAttention's kernels compare 8 bits).
    ``start_col`` must be a multiple of 8 and BLOCK_COLS one of at least 8.
    """
    eights = (n_cols + 7) // 8
    offs_o = start_col // 8 + tl.arange(0, BLOCK_COLS // 8)
    r0, r1, r2, r3 = tl.randint4x(seed + stream, rows[:, None] * eights + offs_o[None, :])
    # join twice: [.., o, a, b] = word 2a + b of group o, so the row-major reshape puts word w of
    # group o at column 4 o + w; then its halves at columns 2 (4 o + w) + 0 / 1 (masked after the
    # shift too: a signed word would shift its sign bit in)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_ROWS, BLOCK_COLS // 2))
    r = tl.reshape(tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF), (BLOCK_ROWS, BLOCK_COLS))
    # 16-bit integers are exact in fp32: keep iff the half >= ceil(dropout_p * 2**16)
    return r.to(tl.float32) >= dropout_p * 65536.0
