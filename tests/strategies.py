"""Shared Hypothesis strategies and small helpers for the seed-lattice tests.

Lifecycle requests are drawn as plain data (:class:`Request`) so the same request can be
applied to the plain functions, to their jitted versions and to a vmapped batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from esper_jax.lattice import blending
from esper_jax.lattice.lifecycle import GateConfig
from esper_jax.lattice.slots import format_slot_id

# ------------------------------------------------------------------------------ slots

rows_cols = st.integers(min_value=0, max_value=10_000)
slot_coords = st.tuples(rows_cols, rows_cols)
slot_ids = slot_coords.map(lambda rc: format_slot_id(*rc))

# ------------------------------------------------------------------------------ gate presets

GATE_PRESETS: dict[str, GateConfig] = {
    "default": GateConfig(),
    "default_auto": GateConfig(auto_advance=True),
    "permissive": GateConfig.permissive(),  # auto_advance on
    "permissive_manual": GateConfig.permissive(auto_advance=False),
    "strict": GateConfig.strict(),
    "strict_auto": GateConfig.strict(auto_advance=True),
}
assert GATE_PRESETS["permissive"].auto_advance and not GATE_PRESETS["default"].auto_advance

gate_preset_names = st.sampled_from(sorted(GATE_PRESETS))


@st.composite
def gate_configs(draw) -> GateConfig:
    """A preset, sometimes with shorter timings so random sequences reach the later stages."""
    gates = GATE_PRESETS[draw(gate_preset_names)]
    if draw(st.integers(0, 3)) > 0:  # 3 times in 4: with the preset's default timings a random
        # sequence of 25 requests can hardly get a seed through 10 training epochs and beyond
        gates = dataclasses.replace(
            gates,
            min_training_epochs=draw(st.integers(0, 3)),
            min_holding_epochs=draw(st.integers(0, 2)),
            embargo_epochs=draw(st.integers(0, 3)),
        )
    return gates


# ------------------------------------------------------------------------------ requests

KINDS = ("germinate", "advance", "set_alpha_target", "prune", "fossilize", "tick", "record")
SLOT_KINDS = frozenset({"germinate", "advance", "set_alpha_target", "prune", "fossilize"})
MEASUREMENTS = ("contribution", "contribution_measured", "improvement", "seed_grad_norm", "host_grad_norm")


@dataclasses.dataclass(frozen=True)
class Request:
    kind: str
    slot: int = 0
    blueprint: int = 0
    blend_style: int = 0
    tempo: int = 0
    target: float = 0.0
    ramp: bool = False
    # name -> np.ndarray of shape [S] (float32, or bool for contribution_measured); None: not given
    measurements: Any = None

    def __repr__(self):  # compact, readable falsifying examples
        if self.kind == "germinate":
            return f"germinate(slot={self.slot}, bp={self.blueprint}, style={self.blend_style}, tempo={self.tempo})"
        if self.kind == "set_alpha_target":
            return f"set_alpha_target(slot={self.slot}, target={self.target!r})"
        if self.kind == "prune":
            return f"prune(slot={self.slot}, ramp={self.ramp})"
        if self.kind in ("advance", "fossilize"):
            return f"{self.kind}(slot={self.slot})"
        if self.kind == "record":
            given = {k: v.tolist() for k, v in (self.measurements or {}).items() if v is not None}
            return f"record({given})"
        return "tick()"


INTERESTING_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-12, 1e-8, 0.5, 1.0, 2e3]

alpha_targets = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, -0.0, 0.25, 0.5, 1.0, 1.0 + 1e-6, 1.5]),
    st.floats(-0.5, 1.5, width=32),
)
# Gradient norms: mostly healthy, sometimes zero, exploding or non-finite.
grad_norms = st.one_of(st.floats(0.0, 10.0, width=32), st.sampled_from(INTERESTING_FLOATS))
contributions = st.one_of(st.floats(-2.0, 3.0, width=32), st.sampled_from(INTERESTING_FLOATS + [-1.0]))
improvements = st.one_of(st.floats(-1.0, 2.0, width=32), st.sampled_from(INTERESTING_FLOATS))


def _per_slot(values, num_slots, dtype=np.float32):
    return st.lists(values, min_size=num_slots, max_size=num_slots).map(lambda xs: np.asarray(xs, dtype))


@functools.lru_cache(maxsize=None)
def measurement_dicts(num_slots: int, complete: bool = False):
    """Keyword arguments for ``record_measurements``; ``complete`` gives every one of them."""
    parts = {
        "contribution": _per_slot(contributions, num_slots),
        "contribution_measured": _per_slot(st.booleans(), num_slots, bool),
        "improvement": _per_slot(improvements, num_slots),
        "seed_grad_norm": _per_slot(grad_norms, num_slots),
        "host_grad_norm": _per_slot(grad_norms, num_slots),
    }
    if not complete:
        parts = {k: st.one_of(st.none(), v) for k, v in parts.items()}
    return st.fixed_dictionaries(parts)


@functools.lru_cache(maxsize=None)
def requests(num_slots: int, num_blueprints: int, complete_measurements: bool = False):
    """One lifecycle request on a status of ``num_slots`` slots, out-of-range values included."""
    slot = st.one_of(st.integers(0, num_slots - 1), st.integers(-2, num_slots + 1))
    germinate = st.builds(
        Request,
        kind=st.just("germinate"),
        slot=slot,
        blueprint=st.one_of(st.integers(0, num_blueprints - 1), st.integers(-2, num_blueprints + 1)),
        blend_style=st.one_of(st.integers(0, len(blending.BLEND_STYLES) - 1), st.integers(-2, len(blending.BLEND_STYLES) + 1)),
        tempo=st.one_of(st.integers(0, len(blending.TEMPOS) - 1), st.integers(-2, len(blending.TEMPOS) + 1)),
    )
    advance = st.builds(Request, kind=st.just("advance"), slot=slot)
    fossilize = st.builds(Request, kind=st.just("fossilize"), slot=slot)
    set_target = st.builds(Request, kind=st.just("set_alpha_target"), slot=slot, target=alpha_targets)
    prune = st.builds(Request, kind=st.just("prune"), slot=slot, ramp=st.booleans())
    tick = st.just(Request(kind="tick"))
    record = st.builds(Request, kind=st.just("record"), measurements=measurement_dicts(num_slots, complete_measurements))
    # Ticks and advances are over-represented so random sequences get past the gates.
    return st.one_of(germinate, advance, advance, set_target, prune, fossilize, tick, tick, tick, tick, record, record)


def request_sequences(num_slots: int, num_blueprints: int, max_size: int = 25, complete_measurements: bool = False):
    return st.lists(requests(num_slots, num_blueprints, complete_measurements), min_size=1, max_size=max_size)


def weighted(*options):
    """Choose among ``(weight, strategy)`` pairs in proportion to the weights (one_of is not weighted)."""
    return st.sampled_from([strategy for weight, strategy in options for _ in range(weight)]).flatmap(lambda s: s)


# --- requests guided by the current state ------------------------------------------------
# Purely random requests rarely get a seed past G2 (ten healthy epochs in TRAINING). A guided
# request looks at one slot (usually the most advanced seed) and mostly asks for what would move
# it on, with measurements that usually pass the gates; random requests are still mixed in.

healthy_grad_norms = st.floats(1 / 128, 50.0, width=32)
positive_contributions = st.one_of(st.floats(-0.5, 3.0, width=32), st.floats(0.75, 3.0, width=32))


@functools.lru_cache(maxsize=None)
def _healthy_record(num_slots: int):
    return st.builds(
        Request,
        kind=st.just("record"),
        measurements=st.fixed_dictionaries({
            "contribution": _per_slot(positive_contributions, num_slots),
            "contribution_measured": st.just(np.ones(num_slots, bool)),
            "improvement": _per_slot(st.floats(0.0, 2.0, width=32), num_slots),
            "seed_grad_norm": _per_slot(healthy_grad_norms, num_slots),
            "host_grad_norm": _per_slot(healthy_grad_norms, num_slots),
        }),
    )


def _guided(slot: int, state: dict, gates: GateConfig, num_blueprints: int, intent: str):
    from esper_jax.lattice.lifecycle import Stage  # local: keep this module light to import

    num_slots = len(state["stage"])
    view = {name: values[slot] for name, values in state.items()}
    stage = Stage(int(view["stage"]))
    tick = st.just(Request(kind="tick"))
    advance = st.just(Request(kind="advance", slot=slot))
    fossilize = st.just(Request(kind="fossilize", slot=slot))
    record = _healthy_record(num_slots)
    prune = st.builds(Request, kind=st.just("prune"), slot=st.just(slot), ramp=st.booleans())
    retarget = st.builds(Request, kind=st.just("set_alpha_target"), slot=st.just(slot),
                         target=st.one_of(st.floats(1 / 16, 1.0, width=32), st.just(1.0)))
    if stage == Stage.DORMANT:
        return st.builds(
            Request, kind=st.just("germinate"), slot=st.just(slot),
            blueprint=st.integers(0, num_blueprints - 1),
            blend_style=st.integers(0, len(blending.BLEND_STYLES) - 1),
            tempo=st.integers(0, len(blending.TEMPOS) - 1),
        )
    if stage == Stage.FOSSILIZED:  # nothing moves it; anything may be asked of it
        return requests(num_slots, num_blueprints, complete_measurements=True).map(
            lambda r: dataclasses.replace(r, slot=slot) if r.kind in SLOT_KINDS else r
        )
    ramp_out = st.just(Request(kind="prune", slot=slot, ramp=True))
    if view["pruning"]:  # a ramped prune: time moves it on; every other request must be refused
        return weighted((6, tick), (2, prune), (1, advance), (1, fossilize), (1, retarget))
    if stage not in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING):
        return tick  # PRUNED, EMBARGOED, RESETTING: time heals
    # ``best`` moves the seed on. Early stages are passed quickly (the chaos intent covers them);
    # in BLENDING and HOLDING requests also come too early or change course, at the edges of
    # the gates, where an off-by-one in the library would show.
    if stage == Stage.GERMINATED:
        return weighted((16, advance), (1, prune))
    if stage == Stage.TRAINING:
        healthy = view["seed_grad_norm"] > 1e-3 and np.isfinite(view["host_grad_norm"]) and view["improvement"] >= 0.5
        best = record if not healthy else (tick if view["epochs_in_stage"] < gates.min_training_epochs else advance)
        return weighted((16, best), (1, advance), (1, prune))
    if intent == "ramp" and view["alpha"] > 0:
        return weighted((8, ramp_out), (1, tick), (1, retarget), (1, fossilize))
    if stage == Stage.BLENDING:
        best = tick if view["alpha_step"] < view["alpha_steps"] else advance
        return weighted((10, best), (2, advance), (2, retarget), (1, ramp_out), (1, prune), (1, fossilize), (1, record))
    measured = view["contribution_measured"] and view["contribution"] > gates.min_contribution
    best = record if not measured else (tick if view["epochs_in_stage"] < gates.min_holding_epochs else fossilize)
    return weighted((8, best), (2, fossilize), (2, retarget), (1, advance), (1, ramp_out), (1, tick), (1, record))


INTENTS = ("grow", "ramp", "chaos")
intents = st.sampled_from(("grow", "grow", "ramp", "ramp", "chaos"))  # mostly going somewhere


def next_request(state: dict, gates: GateConfig, num_blueprints: int, complete_measurements: bool = False,
                 intent: str = "grow"):
    """A request for the status ``state`` (field name -> per-slot numpy array).

    ``intent`` colours a whole sequence: ``grow`` mostly moves the most advanced seed on along
    the happy path, ``ramp`` does the same but ramps seeds out once they are blended in, and
    ``chaos`` is mostly random requests.
    """
    num_slots = len(state["stage"])
    progress = np.where(state["stage"] <= 5, state["stage"], -1)  # happy-path stages, FOSSILIZED included
    progress = np.where(state["stage"] == 5, -1, progress)
    focus = int(np.argmax(progress))
    slot = weighted((4, st.just(focus)), (1, st.integers(0, num_slots - 1)))
    guided = slot.flatmap(lambda k: _guided(k, state, gates, num_blueprints, intent))
    random = requests(num_slots, num_blueprints, complete_measurements)
    tick = st.just(Request(kind="tick"))  # time passes for every slot: cool-downs and schedules
    if intent == "chaos":
        return weighted((1, guided), (1, tick), (3, random))
    return weighted((8, guided), (1, random))
