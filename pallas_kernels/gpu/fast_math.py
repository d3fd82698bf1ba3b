"""Elementwise math for the Pallas-Triton kernels where ``jnp``'s lowering costs issue slots.

``jnp.exp`` on float32 lowers to libdevice's accurate ``expf`` (range reduction and a polynomial: ~8 SASS
instructions per element); :func:`exp` is one multiply and the hardware ``ex2`` (MUFU.EX2, within 2 ulp), which is
what the softmax statistics need. Measured offline (``python -m experiments.bench.softmax_xent_sass``, sm_90):
the two-pass statistics kernel's loops go from 47.5 to 35.8 instructions per logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOG2_E = 1.4426950408889634  # exp(y) = exp2(y * log2(e))


def exp(y: jax.Array) -> jax.Array:
    """exp(y) as exp2(y * log2(e)): one multiply (an FMA where a subtraction precedes it) and the hardware ex2."""
    return jnp.exp2(y * LOG2_E)
