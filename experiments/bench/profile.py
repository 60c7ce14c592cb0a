"""Where a compiled program's time goes, by what the code was doing: a profiler trace of the
program's XLA:CPU thunks, each attributed to the source function that emitted it.

XLA keeps, for every instruction of a compiled program, the Python stack it was traced from
(the ``FileNames``/``FunctionNames``/``FileLocations``/``StackFrames`` tables of the compiled
HLO text, and each instruction's ``stack_frame_id``). :func:`attribute` walks that stack to the
innermost frame in this project (or in optax) and names a category (:func:`category`): the
convolutions, the normalization, the pooling, the optimizers, the seeds, the lattice's slot
plumbing, and so on, split into forward and backward where autodiff's transpose made the
instruction. :func:`profile_categories` traces a few calls with ``jax.profiler`` and sums each
category's thunk time. Instructions with no stack (copies and zero fills that XLA inserted, the
buffers control flow moves) are their own category, "copies and control flow".

Shares are of the summed thunk time: XLA:CPU can run independent thunks on both cores at once,
so the sum may exceed the wall time of a call, which is reported beside it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import NamedTuple

import jax

CONTROL_FLOW = "copies and control flow"
# Instructions whose own thunk encloses others' (the enclosed ones are traced separately).
_CONTAINERS = {"conditional", "while", "call", "tuple", "get-tuple-element", "parameter", "constant", "bitcast"}


class Frame(NamedTuple):
    file: str
    function: str
    line: int


def _table(text: str, title: str) -> dict[int, str]:
    """One of the compiled HLO text's metadata tables: ``{id: the rest of its line}``."""
    match = re.search(rf"^{title}\n((?:\d+ .*\n)+)", text, re.MULTILINE)
    if not match:
        return {}
    rows = (line.split(" ", 1) for line in match.group(1).splitlines())
    return {int(i): rest for i, rest in rows}


def stack_frames(hlo_text: str) -> dict[int, list[Frame]]:
    """Every stack frame id of a compiled HLO text: its frames, innermost first."""
    files = {i: name.strip('"') for i, name in _table(hlo_text, "FileNames").items()}
    functions = {i: name.strip('"') for i, name in _table(hlo_text, "FunctionNames").items()}
    locations = {}
    for i, row in _table(hlo_text, "FileLocations").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", row))
        locations[i] = Frame(files.get(int(fields["file_name_id"]), "?"),
                             functions.get(int(fields["function_name_id"]), "?"), int(fields["line"]))
    parents = {}
    for i, row in _table(hlo_text, "StackFrames").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", row))
        parents[i] = (int(fields["file_location_id"]), int(fields["parent_frame_id"]))
    stacks = {}
    for frame_id in parents:
        stack, seen, current = [], set(), frame_id
        while current in parents and current not in seen:
            seen.add(current)
            location, parent = parents[current]
            if location in locations:
                stack.append(locations[location])
            current = parent
        stacks[frame_id] = stack
    return stacks


def category(stack: list[Frame], op_name: str) -> str:
    """The category of one instruction from its stack (innermost first) and autodiff path."""
    backward = "transpose(" in op_name
    direction = " backward" if backward else " forward"
    for frame in stack:
        path, function = frame.file.replace("\\", "/"), frame.function
        if "/optax/" in path:
            return "loss" if "/losses/" in path else "optimizer"
        if "/esper_jax/" not in path and "/experiments/" not in path:
            continue
        if path.endswith("lattice/ops.py"):
            if "conv" in function or "gradient" in function or function.startswith("_forward"):
                return "convolution" + direction
            if "norm" in function:
                return "normalization" + direction
            if "pool" in function:
                return "pooling" + direction
            if "attention" in function:
                return "attention" + direction
            continue
        if "/lattice/blueprints/" in path:
            return "seeds" + direction
        if path.endswith("lattice/optim.py") or function.startswith(("Lattice.apply_gradients", "Lattice.seed_grad_norms")):
            return "optimizer"
        if "/lattice/hosts/" in path:
            return "host activations and head" + direction
        if "/lattice/" in path:
            return "lattice (slots, blending, lifecycle)"
        if "/data/" in path:
            return "data (sampling, augmentation)"
        if "/esper_jax/env/" in path:
            return "env (validation, rewards, observations)"
        if "/esper_jax/rl/" in path:
            return "PPO (policy, GAE, minibatches)"
        return "other project code"
    return CONTROL_FLOW if not op_name else "other"


def attribute(hlo_text: str) -> dict[str, str]:
    """``{instruction name: category}`` for every leaf instruction of a compiled HLO text. A
    fusion XLA made with no stack of its own (the partial sums it splits a reduction into) takes
    the category of its first operand that has one; copies keep none."""
    stacks = stack_frames(hlo_text)
    out, operands_of = {}, {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*? ([a-z][\w-]*)\((.*?)\)", line)
        if not match or match.group(2) in _CONTAINERS:
            continue
        name, opcode = match.group(1), match.group(2)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        stack = stacks.get(int(frame.group(1)), []) if frame else []
        out[name] = category(stack, op_name.group(1) if op_name else "")
        if out[name] == CONTROL_FLOW and opcode == "fusion":
            operands_of[name] = re.findall(r"%([\w.-]+)", match.group(3))
    for name, operands in operands_of.items():
        out[name] = next((out[o] for o in operands if out.get(o, CONTROL_FLOW) != CONTROL_FLOW), CONTROL_FLOW)
    return out


class Profile(NamedTuple):
    seconds: dict[str, float]   # per call, by category
    wall_s: float               # wall seconds per call
    thunk_s: float              # summed thunk seconds per call (all categories)


def profile_categories(compiled: jax.stages.Compiled, *args, calls: int = 5) -> Profile:
    """Trace ``calls`` calls of the compiled program (``jax.jit(f).lower(*args).compile()``) on
    ``args`` and sum each category's thunk time per call."""
    names = attribute(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(calls):
                out = compiled(*args)
            jax.block_until_ready(out)
        wall = (time.perf_counter() - start) / calls
        trace_files = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
        if not trace_files:
            raise RuntimeError("the profiler wrote no trace")
        with gzip.open(trace_files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            seconds[names[event["name"]]] += event["dur"] * 1e-6 / calls
    return Profile(dict(seconds.most_common()), wall, sum(seconds.values()))


def print_profile(title: str, profile: Profile, threshold: float = 0.01):
    """The categories over ``threshold`` of the thunk time, largest first."""
    print(f"  {title}: {profile.thunk_s * 1e3:.1f} ms of thunks per call (traced wall {profile.wall_s * 1e3:.1f} ms, "
          f"the profiler's own cost included)")
    rest = 0.0
    for name, seconds in profile.seconds.items():
        share = seconds / profile.thunk_s if profile.thunk_s else 0.0
        if share < threshold:
            rest += seconds
            continue
        print(f"    {name:<44} {seconds * 1e3:8.2f} ms {share:6.1%}")
    if rest:
        print(f"    {'(each under ' + format(threshold, '.0%') + ')':<44} {rest * 1e3:8.2f} ms {rest / profile.thunk_s:6.1%}")
