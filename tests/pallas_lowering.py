"""Whether this JAX lowers rnnlab's Pallas (Triton) calls for CUDA on a machine without a GPU, as the tests that
check rnnlab's CUDA programs on a CPU do. jax 0.10 does; jax 0.11.2 refuses ("No supported GPU devices found", asking
for an abstract GPU device instead: seen on the device machine's CPU devices, 2026-11-27), and there those tests
skip, as they do where JAX has no Pallas Triton backend.
"""

import functools
import warnings

import jax
import jax.numpy as jnp

from rnnlab.native import pallas

REASON = ("this JAX lowers no Pallas Triton call for CUDA without a GPU (jax 0.11: 'No supported GPU devices "
          "found'), or has no Pallas Triton backend")


@functools.cache
def lowers_for_cuda_here() -> bool:
    """A 16x16 copy as a Pallas call with rnnlab's Triton settings, lowered for CUDA: False where JAX refuses for want
    of a GPU or has no Triton backend; any other error is raised."""
    from jax.experimental import pallas as pl

    if pallas._compiler_params() is None:
        return False

    def copy(x_ref, out_ref):
        out_ref[...] = x_ref[...]

    call = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                          compiler_params=pallas._compiler_params())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            jax.jit(call).trace(jnp.zeros((16, 16), jnp.float32)).lower(lowering_platforms=("cuda",))
    except RuntimeError as error:
        if "No supported GPU devices" in str(error):
            return False
        raise
    return True
