"""Recomputing a cheap activation in backward instead of keeping it for backward.

A transformer MLP is ``dense_out(act(dense_in(x)))``. Autograd keeps two ``(tokens, intermediate)``
tensors for backward: ``h = dense_in(x)`` (the activation's own input, saved by GELU and most
other activations) and ``act(h)`` (saved by ``dense_out`` for its weight gradient). The second is
a pointwise function of the first, so it can be recomputed when ``dense_out``'s backward asks for
it: one elementwise kernel over ``h`` in backward, and about a sixth of a BERT layer's saved
bytes gone (BERT-base under bf16 autocast: 6 KiB of the layer's ~35 KiB per token).

:func:`recompute_saved` does that with saved-tensor hooks, so the modules are still called as
modules (their hooks run, DeepSpeed ZeRO-3's parameter gathering among them) and every op is the
one the model would run: the recomputed tensor is bitwise the forward's (the same deterministic
kernel on the same input).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch


def _identity(t: torch.Tensor) -> tuple:
    """What makes a saved tensor ``t`` itself: autograd may hand the pack hook a fresh Python
    wrapper of it, never a copy. Its storage cannot be reused by another tensor while ``t`` is
    alive, which it is for as long as the hooks are on."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _graph_keeps(output: torch.Tensor, inputs: tuple) -> bool:
    """Whether the backward graph between ``inputs`` and ``output`` saves every one of ``inputs``
    (GELU and SiLU save their input; ReLU only its output, so recomputing it from its input
    would keep more, not less)."""
    wanted = {_identity(t) for t in inputs}
    stop = {t.grad_fn for t in inputs}
    seen, todo, found = set(), [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved value this node cannot hand out: not one of ours
                continue
            if isinstance(value, torch.Tensor) and _identity(value) in wanted:
                found.add(_identity(value))
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found == wanted


# fn -> whether its graph keeps its inputs: decided once per activation (a module, weakly held,
# or a function; builtins take no weak references and live forever anyway)
_KEEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_KEEPS_BUILTIN: dict = {}


def _keeps_inputs(fn: Callable, output: torch.Tensor, inputs: tuple) -> bool:
    try:
        cache = _KEEPS
        keeps = cache.get(fn)
    except TypeError:
        cache = _KEEPS_BUILTIN
        keeps = cache.get(fn)
    if keeps is None:
        keeps = cache[fn] = _graph_keeps(output, inputs)
    return keeps


class _Recipe:
    """What is stored instead of the tensor: the function and its inputs."""

    __slots__ = ("fn", "inputs")

    def __init__(self, fn: Callable, inputs: tuple):
        self.fn, self.inputs = fn, inputs


@contextlib.contextmanager
def recompute_saved(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor):
    """While active, any op that saves ``output`` for backward stores ``fn(*inputs)`` instead,
    called again when backward unpacks it.

    ``output`` must be ``fn(*inputs)``, ``fn`` deterministic and pointwise-cheap, and ``inputs``
    unchanged until backward (autograd's own version counters check the tensors kept for ``fn``'s
    backward; ``inputs`` are kept alive by the recipe). Other saved tensors pass through.

    It does nothing where it would not save memory, or cannot: when ``fn``'s own backward does not
    keep ``inputs`` (decided from the graph on ``fn``'s first call and remembered), without grad,
    and under ``torch.compile``, whose partitioner makes its own recompute choices.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or output.grad_fn is None:
        yield
        return
    if not _keeps_inputs(fn, output, inputs):
        yield
        return

    # the hooks are kept with every tensor they pack, until backward: they hold the output's
    # identity, never the output itself (that would keep it alive, which is what this removes)
    target = _identity(output)

    def pack(x: torch.Tensor):
        return _Recipe(fn, inputs) if _identity(x) == target else x

    def unpack(saved):
        # grad mode is whatever backward runs under: off, or on for create_graph (then fn's graph
        # is built and a second derivative stays exact)
        return saved.fn(*saved.inputs) if isinstance(saved, _Recipe) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
