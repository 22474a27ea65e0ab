"""`rnnlab.gradflow` against closed forms, PyTorch's retain_grad, finite differences and the Lyapunov spectrum.

Tests whose argument is named ``cell`` run over every library cell (tests/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab
from rnnlab import gradflow, interop

torch = pytest.importorskip("torch")


def linear_orthogonal(gain, hidden_size=16):
    return rnnlab.RNN(hidden_size, activation="linear", recurrent_init=rnnlab.init.orthogonal(gain))


@pytest.mark.parametrize("gain, seq_len", [(0.5, 3000), (0.9, 3000), (0.97, 10_000)])
def test_grad_norms_linear_orthogonal_exact_slope_far_below_float32(gain, seq_len):
    """W = g·Q: ||∂L/∂h_t|| = g^(T-1-t) ||∂L/∂h_{T-1}|| exactly, even at 1e-900 (float32 underflows near 1e-38)."""
    cell = linear_orthogonal(gain)
    params = cell.init(jax.random.PRNGKey(0), input_size=4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (seq_len, 8, 4))
    measured = np.asarray(jax.jit(lambda p, x: gradflow.grad_norms(cell, p, x))(params, xs), np.float64)
    ys, _ = rnnlab.scan(cell, params, xs)
    last = np.log10(np.linalg.norm(2.0 * np.asarray(ys[-1], np.float64) / 8))
    expected = (seq_len - 1 - np.arange(seq_len)) * np.log10(gain) + last
    assert np.all(np.isfinite(measured))
    np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-4)
    assert measured[0] < -40  # beyond float32's range: a plain backward pass would print 0


def test_jacobian_norms_linear_orthogonal_exploding_where_forward_overflows():
    """Gain 1.5 over 3000 steps: the state itself overflows float32, yet every singular value of ∂h_T/∂h_t is
    1.5^(T-1-t), in log domain."""
    gain, seq_len, k = 1.5, 3000, 3
    cell = linear_orthogonal(gain)
    params = cell.init(jax.random.PRNGKey(0), input_size=4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (seq_len, 4))
    ys, _ = rnnlab.scan(cell, params, xs)
    assert not np.all(np.isfinite(np.asarray(ys)))  # the forward pass overflows float32
    measured = np.asarray(jax.jit(lambda p, x: gradflow.jacobian_norms(cell, p, x, k=k))(params, xs), np.float64)
    # the linear Jacobian does not depend on the state, so overflowed states do not matter
    expected = (seq_len - 1 - np.arange(seq_len))[:, None] * np.log10(gain) * np.ones(k)
    np.testing.assert_allclose(measured, expected, rtol=1e-4, atol=1e-4)


def _torch_retain_grad_norms(cell, params, xs, per_step_loss: bool):
    """log10 ||∂L/∂h_t|| from a PyTorch loop over the same weights, retain_grad on every h_t."""
    module = interop.to_torch(cell, params).double()
    xs = torch.from_numpy(np.asarray(xs, np.float64))
    batch = xs.shape[1]
    h = torch.zeros(1, batch, cell.hidden_size, dtype=torch.float64)
    state = (h, torch.zeros_like(h)) if isinstance(cell, rnnlab.LSTM) else h
    hs = []
    for x in xs:
        _, state = module(x[None], state)
        h = state[0] if isinstance(cell, rnnlab.LSTM) else state
        h.retain_grad()
        hs.append(h)
    loss = sum((h**2).sum() for h in hs) / batch if per_step_loss else (hs[-1] ** 2).sum() / batch
    loss.backward()
    return np.log10([h.grad.norm().item() for h in hs])


@pytest.mark.parametrize("per_step_loss", [False, True], ids=["last-step-loss", "per-step-loss"])
def test_grad_norms_match_torch_retain_grad(cell, per_step_loss):
    if isinstance(cell, rnnlab.RNN) and cell.activation == "linear":
        pytest.skip("torch.nn.RNN has no linear activation; the linear RNN is checked against its closed form")
    params = cell.init(jax.random.PRNGKey(2), input_size=3)
    params = jax.tree_util.tree_map(lambda leaf: leaf * 1.3, params)  # away from the defaults, all paths active
    xs = jax.random.normal(jax.random.PRNGKey(3), (12, 4, 3))
    loss = (lambda hs: jnp.sum(hs**2) / hs.shape[1]) if per_step_loss else None
    measured = gradflow.grad_norms(cell, params, xs, loss=loss)
    expected = _torch_retain_grad_norms(cell, params, xs, per_step_loss)
    np.testing.assert_allclose(np.asarray(measured), expected, atol=2e-5 * 12)


def test_grad_norms_match_finite_differences_float64():
    """∂L/∂h_t by central differences of L under a perturbation added to h_t, in float64."""
    with jax.enable_x64(True):
        cell = rnnlab.GRU(3)
        params = cell.init(jax.random.PRNGKey(0), input_size=2, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 2), jnp.float64)

        def loss_with_nudge(t, nudge):
            h = cell.initial_carry((2,), jnp.float64)
            for s in range(xs.shape[0]):
                h, _ = cell(params, h, xs[s])
                h = h + nudge if s == t else h
            return jnp.sum(h**2) / 2

        eps, expected = 1e-6, []
        for t in range(xs.shape[0]):
            grad = np.zeros((2, 3))
            for index in np.ndindex(2, 3):
                nudge = jnp.zeros((2, 3), jnp.float64).at[index].set(eps)
                grad[index] = (loss_with_nudge(t, nudge) - loss_with_nudge(t, -nudge)) / (2 * eps)
            expected.append(np.log10(np.linalg.norm(grad)))
        measured = gradflow.grad_norms(cell, params, xs)
        assert measured.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(measured), expected, atol=1e-7)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("remat", [None, 5], ids=["stored", "remat"])
def test_derivative_of_grad_norms_where_the_cotangent_is_zero(kind, remat):
    """A loss on some steps only leaves the cotangent exactly zero after them (log10 norm -inf): the derivative of
    the finite norms with respect to the weights is then finite and equal to central differences, in float64 (it
    was nan: log10's and 10^x's 0·inf at the zero cotangent)."""
    with jax.enable_x64(True):
        cell = getattr(rnnlab, kind)(4)
        params = cell.init(jax.random.PRNGKey(0), input_size=3, dtype=jnp.float64)
        xs = jax.random.normal(jax.random.PRNGKey(1), (10, 2, 3), jnp.float64)
        losses = {"window": lambda hs: jnp.sum(hs[:4] ** 2),  # nothing after step 3
                  "steps": lambda hs: jnp.sum(hs[2] ** 2) + jnp.sum(hs[6, 1] ** 3)}  # nothing after step 6

        for name, loss in losses.items():
            def total(p, loss=loss):
                norms = gradflow.grad_norms(cell, p, xs, loss=loss, remat=remat)
                return jnp.sum(jnp.where(jnp.isfinite(norms), norms, 0.0))

            last = 3 if name == "window" else 6
            norms = np.asarray(gradflow.grad_norms(cell, params, xs, loss=loss, remat=remat))
            assert np.all(np.isfinite(norms[:last + 1])) and np.all(norms[last + 1:] == -np.inf), name
            grad = jax.grad(total)(params)
            direction = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape) + 1.0), params)
            along = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                        jax.tree_util.tree_leaves(direction)))
            eps = 1e-6
            nudged = [jax.tree_util.tree_map(lambda p, d, s=s: p + s * eps * d, params, direction) for s in (1, -1)]
            differences = (total(nudged[0]) - total(nudged[1])) / (2 * eps)
            assert np.isfinite(float(along)), name
            np.testing.assert_allclose(float(along), float(differences), rtol=1e-6, err_msg=name)


def test_grad_norms_user_cell_runs_unchanged():
    from tests.user_cell import IndRNN

    cell = IndRNN(4)
    params = cell.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (20, 2, 3))
    measured = gradflow.grad_norms(cell, params, xs)
    # IndRNN's Jacobian is diagonal, so each unit's gradient is a product of scalars: an independent answer.
    hs, _ = rnnlab.scan(cell, params, xs)
    derivative = np.asarray(params["w_h"]) * (1 - np.asarray(hs) ** 2)  # ∂h_t/∂h_{t-1}, elementwise, [T, B, H]
    grad = [2 * np.asarray(hs[-1]) / 2]
    for t in range(19, 0, -1):
        grad.append(grad[-1] * derivative[t])
    expected = np.log10([np.linalg.norm(g) for g in grad[::-1]])
    np.testing.assert_allclose(np.asarray(measured), expected, rtol=1e-5)


def test_grad_norms_exact_zero_is_minus_infinity():
    """A ReLU RNN whose units are all off passes no gradient: log10 0 = -inf, not nan."""
    cell = rnnlab.RNN(4, activation="relu", bias_init=rnnlab.init.constant(-100.0))
    params = cell.init(jax.random.PRNGKey(0), 2)
    measured = np.asarray(gradflow.grad_norms(cell, params, jnp.ones((6, 2))))
    assert np.all(measured == -np.inf)


@pytest.mark.parametrize("remat", [None, 30], ids=["stored", "remat"])
@pytest.mark.parametrize("plain_path", [False, True], ids=["fused", "step_vjp"])
def test_grad_norms_are_nan_where_the_forward_pass_overflowed(remat, plain_path):
    """A ReLU RNN at gain 2 overflows float32 within 300 steps. The default loss on h_T then has no gradient
    anywhere: every value is nan, never -inf (a ReLU's derivative at nan is 0, which would read as vanished). A loss
    on the first 20 states only is still defined: its values there equal those of the 20-step problem, and the later
    ones are exactly zero (-inf)."""
    cell = rnnlab.RNN(16, activation="relu", recurrent_init=rnnlab.init.identity(2.0))
    if plain_path:
        cell = type("PlainRNN", (rnnlab.RNN,), {})(16, activation="relu", recurrent_init=rnnlab.init.identity(2.0))
    params = cell.init(jax.random.PRNGKey(0), 4)
    xs = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (300, 3, 4)))
    ys, _ = rnnlab.scan(cell, params, xs)
    assert np.all(np.isfinite(np.asarray(ys[:20]))) and not np.all(np.isfinite(np.asarray(ys[-1])))

    def prefix_loss(hs):
        return jnp.sum(jnp.square(hs[:20]))

    overflowed = np.asarray(gradflow.grad_norms(cell, params, xs, remat=remat))
    assert np.all(np.isnan(overflowed))
    prefix = np.asarray(gradflow.grad_norms(cell, params, xs, loss=prefix_loss, remat=remat))
    short = np.asarray(gradflow.grad_norms(cell, params, xs[:20], loss=prefix_loss))
    assert np.all(np.isfinite(short))
    np.testing.assert_allclose(prefix[:20], short, rtol=1e-6)
    assert np.all(prefix[20:] == -np.inf)


def test_lyapunov_exponents_linear_orthogonal_are_log_gain():
    cell = linear_orthogonal(0.8, hidden_size=8)
    params = cell.init(jax.random.PRNGKey(0), 2)
    xs = jax.random.normal(jax.random.PRNGKey(1), (200, 2))
    np.testing.assert_allclose(gradflow.lyapunov_exponents(cell, params, xs, k=8), np.log(0.8) * np.ones(8), rtol=1e-5)


@pytest.mark.parametrize("gain, chaotic", [(0.6, False), (3.0, True)])
def test_lyapunov_order_and_chaos_and_growth_rate_of_jacobian(gain, chaotic):
    """tanh RNN: all exponents negative at low gain, the largest positive at high gain; and the backward growth rate
    of the top singular value of ∂h_T/∂h_t equals the top exponent. Chaos makes float32 and float64 trajectories
    part ways, so float64 is compared through rates, not values."""
    cell = rnnlab.RNN(64, recurrent_init=rnnlab.init.scaled_normal(gain))
    params = cell.init(jax.random.PRNGKey(0), 4)
    xs = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (1500, 4))
    exponents = np.asarray(gradflow.lyapunov_exponents(cell, params, xs, k=4))
    assert (exponents[0] > 0.01) if chaotic else np.all(exponents < -0.01)
    top = np.asarray(gradflow.jacobian_norms(cell, params, xs, k=1))[:, 0]
    backward_rate = (top[200] - top[1200]) / 1000 * np.log(10)  # natural log per step, away from both ends
    assert backward_rate == pytest.approx(exponents[0], abs=0.02)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
        exponents64 = np.asarray(gradflow.lyapunov_exponents(cell, params64, jnp.asarray(xs, jnp.float64), k=4))
    np.testing.assert_allclose(exponents, exponents64, atol=0.02)


def _non_normal_linear_rnn(dtype, seq_len, batch):
    """A linear RNN whose W_h = U diag(0.6 … 0.99) Vᵀ (random U, V: far from normal) and inputs, in ``dtype``."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    cell = rnnlab.RNN(16, activation="linear")
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), cell.init(jax.random.PRNGKey(0), input_size=4))
    params["w_h"] = jnp.asarray(u @ np.diag(np.linspace(0.99, 0.6, 16)) @ v.T, dtype)
    xs = jax.random.normal(jax.random.PRNGKey(1), (seq_len,) + batch + (4,)).astype(dtype)
    return cell, params, xs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_dtypes_measure_as_float32_does_on_their_rounded_weights(dtype):
    """A bfloat16 or float16 cell's cotangents run in its dtype, as its own backward pass does; norms, logs and
    scales are kept in float32 (`gradflow.measure_dtype`), and its step Jacobians are taken in float32 at its own
    states. Against float32 on the same rounded weights and inputs (tested above against closed forms and float64):
    log10 norms within 0.03 at T = 2000 (bfloat16: 0.008 measured; a scale summed in bfloat16 was 0.98 off; the
    backward passes differ in arithmetic, so this is a comparison). The linear RNN's Jacobians do not depend on its
    states, so its singular values and Lyapunov exponents must be float32's on the rounded weights: that pins the
    widening to float32 (they had been 53 and 0.12 off with frames moved and summed in bfloat16); their values are
    checked against closed forms in the scaled-identity test below."""
    cell, params, xs = _non_normal_linear_rnn(dtype, 2000, (8,))
    wide = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, xs))
    norms = gradflow.grad_norms(cell, params, xs)
    assert norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, gradflow.grad_norms(cell, *wide), rtol=0, atol=0.03)
    cell, params, xs = _non_normal_linear_rnn(dtype, 1000, ())
    wide = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, xs))
    singular = gradflow.jacobian_norms(cell, params, xs, k=3)
    assert singular.dtype == jnp.float32
    np.testing.assert_allclose(singular, gradflow.jacobian_norms(cell, *wide, k=3), rtol=0, atol=1e-4)
    np.testing.assert_allclose(gradflow.lyapunov_exponents(cell, params, xs, k=3),
                               gradflow.lyapunov_exponents(cell, *wide, k=3), rtol=0, atol=1e-6)


def test_bfloat16_grad_norms_equal_plain_bfloat16_autodiff_over_2000_steps():
    """W = 0.999·Q in bfloat16, T = 2000: the gradient never leaves bfloat16's range, so JAX's own backward pass in
    bfloat16 (∂L/∂h_t as the gradient of a zero added to each h_t, what retain_grad reads) is the reference: within
    0.02 of log10. Renormalising by bfloat16's rounding of 1 / norm, a factor near 1 applied to values on the
    bfloat16 grid, moved every element the same way and drifted 0.48 off by lag 2000."""
    cell = rnnlab.RNN(16, activation="linear", recurrent_init=rnnlab.init.orthogonal(0.999))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.PRNGKey(0), 4))
    xs = (0.1 * jax.random.normal(jax.random.PRNGKey(1), (2000, 8, 4))).astype(jnp.bfloat16)

    def loss(nudges):
        def step(h, x_and_nudge):
            x, nudge = x_and_nudge
            h = x @ params["w_x"] + params["b"] + h @ params["w_h"] + nudge
            return h, None

        h, _ = jax.lax.scan(step, jnp.zeros((8, 16), jnp.bfloat16), (xs, nudges))
        return jnp.sum(jnp.square(h)) / 8

    plain = jax.grad(loss)(jnp.zeros((2000, 8, 16), jnp.bfloat16))
    expected = np.log10(np.linalg.norm(np.asarray(plain, np.float64).reshape(2000, -1), axis=1))
    np.testing.assert_allclose(gradflow.grad_norms(cell, params, xs), expected, rtol=0, atol=0.02)


@pytest.mark.parametrize("activation", ["linear", "relu"])
def test_bfloat16_jacobian_spectra_of_a_scaled_identity_are_exact(activation):
    """W = g·I in bfloat16 (an IRNN below its threshold for ReLU: inputs keep every unit on): every singular value of
    ∂h_{T-1}/∂h_t is g^(T-1-t) and every Lyapunov exponent ln g, for g as bfloat16 rounds 0.99. Frames rounded into
    bfloat16 returned to the same values at every step and were 0.14-0.68 off at T = 1000."""
    cell = rnnlab.RNN(16, activation=activation, recurrent_init=rnnlab.init.identity(0.99))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.PRNGKey(0), 4))
    params["b"] = jnp.full((16,), 50.0, jnp.bfloat16)  # every pre-activation positive: ReLU is the identity here
    xs = jax.random.normal(jax.random.PRNGKey(1), (1000, 4)).astype(jnp.bfloat16)
    gain = float(params["w_h"][0, 0])
    lags = 999 - np.arange(1000)
    np.testing.assert_allclose(gradflow.jacobian_norms(cell, params, xs, k=3),
                               lags[:, None] * np.log10(gain) * np.ones(3), rtol=0, atol=1e-4)
    np.testing.assert_allclose(gradflow.lyapunov_exponents(cell, params, xs, k=3), np.log(gain), rtol=0, atol=1e-6)


def test_bfloat16_grad_norms_equal_torch_retain_grad_in_bfloat16_and_go_on_where_it_underflows():
    """A tanh RNN in bfloat16 against PyTorch's retain_grad loop in bfloat16 on the same weights: within 0.06 of
    log10 wherever torch's gradient is a normal bfloat16 number (0.026 measured; 0.158 while the scale was summed in
    bfloat16), and finite at every step, where torch's becomes subnormal and then zero."""
    cell = rnnlab.RNN(16, activation="tanh")
    params = cell.init(jax.random.PRNGKey(0), input_size=3)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), {**params, "w_h": params["w_h"] * 0.9})
    xs = (0.5 * jax.random.normal(jax.random.PRNGKey(1), (300, 4, 3))).astype(jnp.bfloat16)
    ours = np.asarray(gradflow.grad_norms(cell, params, xs), np.float64)
    weights = {name: torch.tensor(np.asarray(value, np.float32)).to(torch.bfloat16) for name, value in params.items()}
    h = torch.zeros(4, 16, dtype=torch.bfloat16, requires_grad=True)
    hs = []
    for x in torch.tensor(np.asarray(xs, np.float32)).to(torch.bfloat16):
        h = torch.tanh(x @ weights["w_x"] + weights["b"] + h @ weights["w_h"])
        h.retain_grad()
        hs.append(h)
    ((hs[-1].float() ** 2).sum() / 4).backward()
    theirs = np.asarray([np.linalg.norm(h.grad.double().numpy()) for h in hs])
    normal = theirs > float(jnp.finfo(jnp.bfloat16).tiny)
    assert 50 < normal.sum() < len(theirs)  # torch's gradient leaves bfloat16's normal range part of the way
    np.testing.assert_allclose(ours[normal], np.log10(theirs[normal]), rtol=0, atol=0.06)
    assert np.all(np.isfinite(ours))


def test_single_sequence_functions_reject_batches():
    cell = rnnlab.RNN(4)
    params = cell.init(jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match=r"one sequence.*\(5, 3, 2\)"):
        gradflow.jacobian_norms(cell, params, jnp.ones((5, 3, 2)))
    with pytest.raises(ValueError, match="k must lie"):
        gradflow.lyapunov_exponents(cell, params, jnp.ones((5, 2)), k=9)


@pytest.mark.parametrize("per_step_loss", [False, True], ids=["last-step-loss", "per-step-loss"])
def test_remat_gives_the_same_numbers_with_less_memory(per_step_loss):
    cell = rnnlab.LSTM(8)
    params = cell.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (64, 2, 3))
    loss = (lambda hs: jnp.sum(hs**2)) if per_step_loss else None
    plain = gradflow.grad_norms(cell, params, xs, loss=loss)
    # float32 rounding: log10 norms near 0 get an absolute tolerance (1e-6 in log10 is 2.3e-6 relative in the norm).
    np.testing.assert_allclose(gradflow.grad_norms(cell, params, xs, loss=loss, remat=8), plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="remat must be a positive int dividing T = 64"):
        gradflow.grad_norms(cell, params, xs, remat=7)


@pytest.mark.parametrize("kind", ["lstm", "indrnn"])
def test_unrolled_loops_give_the_same_numbers(kind):
    """``unroll`` (how a GPU runs the engine: `rnnlab.native.gpu_flow_unroll`) changes how the loops are written, not
    what they compute: against one step per iteration, with and without remat, through `rnnlab.fused`'s steps (the
    LSTM; every built-in cell's loops are the same code) and a user's cell (IndRNN: its step's vjp)."""
    from tests.user_cell import IndRNN

    cell = {"lstm": rnnlab.LSTM(8), "indrnn": IndRNN(8)}[kind]
    params = cell.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (24, 2, 3))
    carry = cell.initial_carry((2,))
    loss = lambda hs: jnp.sum(hs**2)  # noqa: E731  (a per-step loss: every loop of the engine runs)

    @jax.jit
    def norms(params, xs, carry):  # one program for the four
        return [gradflow.log_domain_norms(cell, params, xs, carry, loss=loss, remat=remat, unroll=unroll)
                for remat in (None, 6) for unroll in (1, 4)]

    plain, unrolled, plain_remat, unrolled_remat = norms(params, xs, carry)
    np.testing.assert_allclose(unrolled, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(unrolled_remat, plain_remat, rtol=1e-6, atol=1e-6)


def test_remat_memory_grows_as_sqrt_of_sequence_length(monkeypatch):
    """XLA's own buffer accounting of the compiled programs: plain storage is linear in T, remat=√T far less. The
    plain engine here is XLA's: the native gradient-flow kernel keeps the same per-step storage in a workspace of
    its own, outside XLA's accounting (`rnnlab.native.flow_workspace_bytes`)."""
    monkeypatch.setenv("RNNLAB_NATIVE", "0")
    cell = rnnlab.RNN(64)
    params = cell.init(jax.random.PRNGKey(0), 4)

    def temp_bytes(seq_len, remat):
        xs = jax.ShapeDtypeStruct((seq_len, 8, 4), jnp.float32)
        compiled = jax.jit(lambda p, x: gradflow.grad_norms(cell, p, x, remat=remat)).lower(params, xs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    carry_bytes = 8 * 64 * 4
    plain = temp_bytes(10_000, None)
    assert plain >= 10_000 * carry_bytes  # every carry is stored
    assert temp_bytes(10_000, 100) < plain / 10


@pytest.mark.parametrize("remat", [None, 10], ids=["stored", "remat"])
def test_float32_weights_on_bfloat16_inputs_measure_as_the_inputs_cast_first(remat):
    """grad_norms with float32 parameters on bfloat16 inputs runs them as one dtype (`rnnlab.scan.in_one_dtype`),
    so the gradient-flow kernel measures them: bit for bit the numbers of the inputs cast to float32 first (the
    promoting plain engine gave the same within 5e-7, and took 72 against 14 ms for the LSTM at 16,500,32,128)."""
    cell = rnnlab.LSTM(16)
    params = cell.init(jax.random.PRNGKey(0), input_size=3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (50, 4, 3)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(gradflow.grad_norms(cell, params, xs, remat=remat),
                                  gradflow.grad_norms(cell, params, xs.astype(jnp.float32), remat=remat))
