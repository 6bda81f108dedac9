"""``bench train --ops``: where a compiled step's time goes, by the model operation each kernel runs.

A ``jax.profiler`` trace of a few steps records every kernel (a thunk of XLA:CPU's runtime, a kernel on a GPU) by
its HLO instruction name; the compiled program's text maps each name to the ``op_name`` of the JAX operation it
came from (``jit(train_step)/transpose(jvp(UNet))/up2/ConvNormReLU_0/Conv_0/conv_general_dilated``). Summed by
pass (forward, or backward: ``transpose(…)``) and the operation's last component, that says which parts of the
network cost what; kernels without an op_name (layout copies, index maps XLA adds) are summed by their fusion kind.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable

# `%name = type[shape]{layout} op(...), ..., metadata={op_name="..." ...}` in the compiled program's text
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ', re.M)
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', re.M)


def instructions(hlo_text: str) -> set[str]:
    """The instruction names of a compiled program's text: the kernels a trace can name (the runtime's own spans
    — executing, waiting, parsing arguments — are not among them)."""
    return set(_INSTRUCTION.findall(hlo_text))


def op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: op_name} of a compiled program's text."""
    return {m.group(1): m.group(2) for m in _OP_NAME.finditer(hlo_text)}


def category(kernel: str, names: dict[str, str]) -> str:
    """'forward conv_general_dilated', 'backward reduce_sum', … for a kernel with an op_name; else its fusion kind
    ('transpose_copy_fusion', 'wrapped_iota', …)."""
    op = names.get(kernel)
    if op is None:
        return re.sub(r"\.\d+$", "", kernel)
    return ("backward " if "transpose(" in op else "forward ") + op.rsplit("/", 1)[-1]


def kernel_ms(trace_events, kernels: set[str], steps: int) -> dict[str, float]:
    """ms a step of each of ``kernels`` among a trace's complete events."""
    totals: dict[str, float] = collections.defaultdict(float)
    for event in trace_events:
        if event.get("ph") == "X" and event.get("name") in kernels:
            totals[event["name"]] += event["dur"] / 1e3 / steps
    return dict(totals)


def op_table(kernels: dict[str, float], names: dict[str, str]) -> list[tuple[str, float]]:
    """(category, ms a step), the costliest first."""
    totals: dict[str, float] = collections.defaultdict(float)
    for kernel, ms in kernels.items():
        totals[category(kernel, names)] += ms
    return sorted(totals.items(), key=lambda item: -item[1])


def profile_step(step: Callable[[], None], hlo_text: str, steps: int = 3) -> list[tuple[str, float]]:
    """The op table of ``steps`` calls of ``step`` (which must block until its step is done)."""
    import jax
    with tempfile.TemporaryDirectory(prefix="carvana_ops_") as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(steps):
                step()
        traces = glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True)
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no trace into {logdir}")
        with gzip.open(traces[0]) as f:
            events = json.load(f)["traceEvents"]
    return op_table(kernel_ms(events, instructions(hlo_text), steps), op_names(hlo_text))
