"""A cell written the way a user writes one, in their own file: the library has never heard of it.

IndRNN (Li et al. 2018, "Independently Recurrent Neural Network"): ``h' = tanh(x W_x + w_h ⊙ h + b)``, a diagonal
recurrence. Its recurrent weights are named ``w_h`` so that a sweep's gain scales them; it defines no
``project_inputs``.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class IndRNN:
    hidden_size: int

    def init(self, key, input_size, dtype=jnp.float32):
        key_x, key_h = jax.random.split(key)
        return {
            "w_x": jax.random.normal(key_x, (input_size, self.hidden_size), dtype) / jnp.sqrt(input_size),
            "w_h": jax.random.uniform(key_h, (self.hidden_size,), dtype, 0.5, 1.0),
            "b": jnp.zeros((self.hidden_size,), dtype),
        }

    def initial_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def __call__(self, params, h, x):
        h_new = jnp.tanh(x @ params["w_x"] + params["w_h"] * h + params["b"])
        return h_new, h_new

    def hidden(self, carry):
        return carry
