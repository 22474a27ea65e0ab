"""Argument checks shared by the cells and `scan`: each raises at trace time with the argument's name and shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_float_input(name: str, x: jax.Array) -> None:
    """Raise `TypeError` unless ``x`` has a floating dtype (integer inputs silently truncate gradients)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {jnp.result_type(x)}; cast it, e.g. x.astype(jnp.float32).")


def check_input_size(name: str, x: jax.Array, input_size: int) -> None:
    """Raise `ValueError` unless the last axis of ``x`` has ``input_size`` features."""
    if jnp.ndim(x) == 0 or jnp.shape(x)[-1] != input_size:
        raise ValueError(
            f"{name} has shape {jnp.shape(x)}: its last axis must be the input size {input_size} the parameters were "
            f"made for, got {jnp.shape(x)[-1] if jnp.ndim(x) else 'a scalar'}."
        )
