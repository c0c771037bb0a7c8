"""Compile a Triton kernel for an H100 / H200 (sm_90) without one and read its resource use.

Triton's Linux wheels ship ``ptxas`` and ``cuobjdump``, so CI (no GPU) can catch code that the
interpreter accepts and the compiler rejects, register spills (stack bytes) and low occupancy.
Run in a subprocess without ``TRITON_INTERPRET`` (the tests' ``_SM90_SCRIPT`` strings import this
module with the repository root as their working directory): Triton picks interpreted or compiled
kernels when a ``@triton.jit`` function is defined.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def signature(fn, constexprs: dict, types: dict, *, default_pointer: str | None = None,
              floats=("sm_scale", "dropout_p")) -> dict:
    """Triton's signature of ``fn``: ``constexprs`` by name, ``types`` by name (``"*i32"``,
    ``"fp32"``...), ``floats`` fp32, other upper-case names pointers to ``default_pointer`` (when
    given) and the rest int32."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        elif name in floats:
            out[name] = "fp32"
        elif default_pointer is not None and name.isupper():
            out[name] = "*" + default_pointer
        else:
            out[name] = "i32"
    return out


def resource_usage(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int | None = None) -> dict:
    """Compile ``fn`` for sm_90: its registers and stack bytes per thread, shared memory, warps
    and the blocks that fit on one SM (64 K registers allocated per warp in units of 256; 228 KiB
    shared memory, 1 KiB of it reserved per block; at most 32 blocks)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = max(int(re.search(r"SHARED:(\d+)", usage).group(1)), compiled.metadata.shared)
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(65536 // (per_warp * num_warps), (228 * 1024) // (shared + 1024), 32)
    return dict(stack=int(re.search(r"STACK:(\d+)", usage).group(1)), regs=regs, shared=shared, warps=num_warps,
                blocks_per_sm=blocks)


def run_report(script: str, timeout: int = 600) -> dict:
    """Run a compile script (it prints one JSON report last) without the interpreter, from the
    repository root; the tools must be in this Triton install."""
    import json

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    assert all(os.path.exists(os.path.join(tools, tool)) for tool in ("ptxas", "cuobjdump")), \
        f"this Triton install has no bundled NVIDIA ptxas / cuobjdump under {tools}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
