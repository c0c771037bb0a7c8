"""The layering rule of docs/ARCHITECTURE.md, checked: arrows point down only.

1. ``kernels/`` (installed as ``fastcse.kernels``) imports nothing of the engine: no ``fastcse``
   module outside ``fastcse.kernels``, at module level or inside functions.
2. The losses never import the training program.
3. The pure-PyTorch twins load and run where Triton is not installed.

(1) reads the source with ``ast``, so imports inside functions, which no import-time check sees,
count too. (2) and (3) run in a fresh interpreter, so that what this test session has already
imported hides nothing.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
KERNELS_PACKAGE = "fastcse.kernels"


# --------------------------------------------------------------------------------------------
# a static reader of imports
# --------------------------------------------------------------------------------------------


def _resolve_relative(name: str, level: int, package: str) -> str:
    """``from ..x import y`` in ``package``: level 1 is the package itself, each extra dot one up."""
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        return name  # beyond the top package: Python refuses it; reported as written
    anchor = parts[:len(parts) - (level - 1)]
    return ".".join(anchor + ([name] if name else []))


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """Every module a source file may import, as ``(line, dotted name)``, wherever it sits.

    ``from a.b import c`` gives ``a.b.c`` (``c`` may be a submodule or an attribute: either way
    the file depends on ``a.b``). ``importlib.import_module("...")`` and ``__import__("...")``
    calls with a literal name count as imports.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(base, node.level, package)
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                name = node.args[0].value
                if name.startswith("."):
                    dots = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(name[dots:], dots, package)
                found.append((node.lineno, name))
    return found


def _is_engine(name: str) -> bool:
    """A ``fastcse`` module outside the kernel layer (``fastcse`` itself included)."""
    in_fastcse = name == "fastcse" or name.startswith("fastcse.")
    in_kernels = name == KERNELS_PACKAGE or name.startswith(KERNELS_PACKAGE + ".")
    return in_fastcse and not in_kernels


# The training program: the trainer itself (and anything named after it: fastcse.training...),
# its configuration and checkpoints, the methods that drive the loss, and DeepSpeed.
_TRAINING_MODULES = ("fastcse.config", "fastcse.checkpoint", "fastcse.methods", "fastcse.step",
                     "fastcse.optim", "fastcse.ds_config", "fastcse.build", "fastcse.runlog")


def _is_training_program(name: str) -> bool:
    top_two = ".".join(name.split(".")[:2])
    return (top_two.startswith("fastcse.train") or top_two in _TRAINING_MODULES
            or name.split(".")[0] == "deepspeed")


def test_the_import_reader_sees_every_form():
    """The checks below are only as good as this reader: every way a kernel file could reach the
    engine is caught, and the kernel layer's own imports are not."""
    source = textwrap.dedent('''
        import torch
        import triton.language as tl
        import fastcse.kernels.rope
        from fastcse.kernels._triton_utils import interpreted
        from . import infonce_chunks
        from .rope import rotary_triton
        from fastcse import kernels
        import fastcse.infonce
        from fastcse._triton_utils import interpreted

        def lazy():
            from fastcse.infonce import chunked_backward
            from .. import train
            from ..losses import info_nce
            import importlib
            importlib.import_module("fastcse.models.biased")
            __import__("fastcse.rotary")
            importlib.import_module("fastcse.kernels.infonce")
    ''')
    names = [name for _, name in imported_names(source, KERNELS_PACKAGE)]
    assert "fastcse.kernels.infonce_chunks" in names and "fastcse.kernels.rope.rotary_triton" in names
    assert sorted(n for n in names if _is_engine(n)) == sorted([
        "fastcse.infonce", "fastcse._triton_utils.interpreted", "fastcse.infonce.chunked_backward",
        "fastcse.train", "fastcse.losses.info_nce", "fastcse.models.biased", "fastcse.rotary"])
    assert _is_training_program("fastcse.train") and _is_training_program("fastcse.training.loop")
    assert _is_training_program("deepspeed.runtime") and _is_training_program("fastcse.config")
    assert not _is_training_program("fastcse.distributed") and not _is_training_program("fastcse.infonce")


# --------------------------------------------------------------------------------------------
# 1. kernels/ stands on nothing of the engine
# --------------------------------------------------------------------------------------------


def _kernel_files() -> list[Path]:
    return sorted(KERNELS.rglob("*.py"))


def test_kernels_import_nothing_of_the_engine():
    files = _kernel_files()
    # the op families must be there: an empty scan would prove nothing
    assert {"infonce.py", "rope.py", "biased_attention.py"} <= {f.name for f in files}
    offences = []
    for path in files:
        sub = path.relative_to(KERNELS).parent.parts
        package = ".".join((KERNELS_PACKAGE, *sub))
        for line, name in imported_names(path.read_text(), package):
            if _is_engine(name):
                offences.append(f"kernels/{path.relative_to(KERNELS)}:{line} imports {name}")
    assert not offences, "kernels/ must import torch, triton and fastcse.kernels only:\n" + "\n".join(offences)


# --------------------------------------------------------------------------------------------
# 2. the losses never import the training program
# --------------------------------------------------------------------------------------------

_LOSS_MODULES = ("losses", "infonce")


@pytest.mark.parametrize("module", _LOSS_MODULES)
def test_losses_do_not_name_the_training_program(module):
    """Static: also the imports inside functions, which run only on some calls."""
    path = REPO / "fastcse" / f"{module}.py"
    offences = [f"fastcse/{module}.py:{line} imports {name}"
                for line, name in imported_names(path.read_text(), "fastcse") if _is_training_program(name)]
    assert not offences, "\n".join(offences)


_LOSSES_SCRIPT = r'''
import json, sys
import torch
import fastcse.infonce
import fastcse.losses
from fastcse.losses import InfoNCELoss, info_nce

# one call through each public path, so that imports made at call time are loaded too
a, p, h = (torch.randn(6, 8, requires_grad=True) for _ in range(3))
info_nce(a, p, h, hard_negative_weight=0.5, gather_across_ranks=True, backend="chunked").backward()
InfoNCELoss()(a, p).backward()
print(json.dumps(sorted(sys.modules)))
'''


def _run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_losses_do_not_pull_in_the_training_program():
    """Dynamic: through every fastcse module the losses load (transitively), at import and call time."""
    result = _run_python(_LOSSES_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "fastcse.losses" in loaded and "fastcse.infonce" in loaded
    training = [name for name in loaded if _is_training_program(name)]
    assert not training, f"importing and calling the losses loaded the training program: {training}"


# --------------------------------------------------------------------------------------------
# 3. the pure-PyTorch twins load and run without Triton
# --------------------------------------------------------------------------------------------

_NO_TRITON_SCRIPT = r'''
import importlib.abc, json, sys


class NoTriton(importlib.abc.MetaPathFinder):
    """Makes ``import triton`` fail as it does where Triton is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_layering)", name=name)
        return None


sys.meta_path.insert(0, NoTriton())
for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
    del sys.modules[name]

import torch

import fastcse.biased_attention as ba
import fastcse.infonce as nce
import fastcse.models.biased  # noqa: F401  the patched T5 / DeBERTa modules load too
import fastcse.rotary as rotary
from fastcse.kernels._triton_utils import triton_available

report = {"triton_available": triton_available()}


def max_diff(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


f64 = dict(dtype=torch.float64)
batch, heads, seqlen, head_dim, entries = 2, 2, 11, 8, 6
q, k, v = (torch.randn(batch, heads, seqlen, head_dim, **f64, requires_grad=True) for _ in range(3))
row = torch.randn(1, heads, 1, 2 * seqlen - 1, **f64, requires_grad=True)
pos_key, pos_query = (torch.randn(heads, entries, head_dim, **f64, requires_grad=True) for _ in range(2))
c2p, p2c = (torch.randint(0, entries, (2 * seqlen - 1,)) for _ in range(2))
mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, 7])[:, None]
grad_out = torch.randn(batch, heads, seqlen, head_dim, **f64)
report["attention_auto"] = ba.resolve_backend("auto", q)

t5 = dict(row_table=row, row_index=torch.arange(2 * seqlen - 1), key_padding_mask=mask)
outs = [ba.biased_attention(q, k, v, **t5, backend=b) for b in ("auto", "eager")]
grads = [torch.autograd.grad(o, (q, k, v, row), grad_out) for o in outs]
report["t5_diff"] = max(max_diff([outs[0]], [outs[1]]), max_diff(grads[0], grads[1]))

deberta = dict(pos_key=pos_key, c2p_index=c2p, pos_query=pos_query, p2c_index=p2c, key_padding_mask=mask,
               scale=2.5)
outs = [ba.disentangled_attention(q, k, v, **deberta, backend=b) for b in ("chunked", "eager")]
grads = [torch.autograd.grad(o, (q, k, v, pos_key, pos_query), grad_out) for o in outs]
report["deberta_diff"] = max(max_diff([outs[0]], [outs[1]]), max_diff(grads[0], grads[1]))

a, p, h = (torch.randn(9, 16, **f64, requires_grad=True) for _ in range(3))
report["loss_auto"] = nce.resolve_backend("auto", a.device, a.dtype)
losses = [nce.info_nce(a, p, h, hard_negative_weight=0.3, backend=b, chunk_rows=4) for b in ("auto", "eager")]
grads = [torch.autograd.grad(loss, (a, p, h)) for loss in losses]
report["loss_diff"] = max(max_diff([losses[0]], [losses[1]]), max_diff(grads[0], grads[1]))

rq, rk = torch.randn(2, 5, 2, 8, **f64), torch.randn(2, 5, 1, 8, **f64)
# float64 angles, so the rotation keeps norms to rounding (fp32 cos / sin would not)
theta = torch.arange(5, **f64)[:, None] * rotary.rotary_inv_freq(8)[None, :]
report["rotary_auto"] = rotary.resolve_backend("auto", rq)
rotated = rotary.apply_rotary(rq, rk, theta.cos(), theta.sin())
report["rotary_norm_diff"] = float((rotated[0].norm(dim=-1) - rq.norm(dim=-1)).abs().max())

report["triton_loaded"] = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
# the blocker works: the Triton kernel module itself cannot load here
try:
    import fastcse.kernels.biased_attention  # noqa: F401
    report["kernel_module_blocked"] = False
except ModuleNotFoundError:
    report["kernel_module_blocked"] = True
print(json.dumps(report))
'''


def test_pure_pytorch_twins_run_without_triton():
    """With ``import triton`` failing, the chunked and eager tiers of the attention op and of the
    loss (and rotary's eager tier) import, are what ``auto`` picks, and agree in float64."""
    result = _run_python(_NO_TRITON_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kernel_module_blocked"], "the Triton blocker did not block: this test proves nothing"
    assert report["triton_available"] is False and report["triton_loaded"] == []
    assert report["attention_auto"] == "chunked" and report["loss_auto"] == "chunked"
    assert report["rotary_auto"] == "eager"
    for name in ("t5_diff", "deberta_diff", "loss_diff"):
        assert report[name] < 1e-12, f"{name}: chunked vs eager differ by {report[name]:.2e}"
    assert report["rotary_norm_diff"] < 1e-12
