"""The package's XLA:CPU flag (``esper_jax.YNN_FLAG``): set on import, before any backend starts,
so compiled CPU dots are XLA's own rather than YNNPACK fusions; a user's own setting wins. Each
case runs in a fresh process, since XLA reads its flags once per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import esper_jax, jax, jax.numpy as jnp, os
text = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 72)), jnp.ones((72, 16))).compile().as_text()
print(os.environ["XLA_FLAGS"])
print("ynn" in text.lower())
"""


def probe(xla_flags: str | None) -> tuple[str, bool]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, ynn = out.stdout.strip().splitlines()[-2:]
    return flags, ynn == "True"


@pytest.mark.skipif(__import__("jax").default_backend() != "cpu", reason="an XLA:CPU flag")
def test_the_package_turns_ynnpack_dots_off_and_keeps_a_users_choice():
    flags, ynn = probe(None)
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=" and not ynn
    flags, ynn = probe("--xla_cpu_multi_thread_eigen=true")
    assert flags == "--xla_cpu_multi_thread_eigen=true --xla_cpu_experimental_ynn_fusion_type=" and not ynn
    # the user asks for YNNPACK's dots: kept, and the flag really is what decides
    flags, ynn = probe("--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=individual_dot" and ynn
