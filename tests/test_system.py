"""The model protocol on its own: ``System`` with ``BuiltinSystem`` and ``CustomSystem``, and the two
``Linearization`` implementations. References are torch's own modules, autograd, and states built by hand."""

import pytest
import torch
from problems import Problem
from torch import nn

import rnnjac
from rnnjac._builtin_system import BuiltinSystem
from rnnjac._cells import ARCHITECTURES, LayerParams
from rnnjac._custom_system import CustomSystem
from rnnjac._dynamics import Dynamics, as_dynamics
from rnnjac._linearization import DenseLinearization, FactoredLinearization, Linearization
from rnnjac._system import System

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _custom():
    w = torch.randn(4, 4, dtype=F64, generator=_gen(5)) * 0.5
    return rnnjac.CustomCell(lambda s, x: torch.tanh(s @ w.T + x), parameters=[w])


# ----------------------------------------------------------------------------- construction
def test_as_dynamics_picks_the_implementation():
    assert Dynamics is System
    for model in (nn.GRU(2, 3), nn.LSTMCell(2, 3), nn.RNN(2, 3, num_layers=2)):
        assert isinstance(as_dynamics(model), BuiltinSystem)
    for model in (_custom(), lambda s, x: s):
        assert isinstance(as_dynamics(model, state_size=4), CustomSystem)
    system = as_dynamics(nn.GRU(2, 3))
    assert as_dynamics(system) is system


def test_capabilities_of_each_implementation():
    lstm, gru, custom = as_dynamics(nn.LSTM(2, 3)), as_dynamics(nn.GRUCell(2, 3)), as_dynamics(_custom(), state_size=4)
    assert lstm.supports_h_state and lstm.convertible and lstm.has_closed_form
    assert lstm.factored("analytic") and not lstm.factored("autograd")
    assert not custom.supports_h_state and not custom.convertible and not custom.factored("analytic")
    assert not custom.has_closed_form and as_dynamics(rnnjac.CustomCell(lambda s, x: s, lambda s, x: s)).has_closed_form
    assert "c is held fixed" in lstm.state_note("h") and lstm.state_note("full") is None
    assert gru.state_note("h") is None and custom.state_note("h") is None
    assert [n for n, _ in as_dynamics(nn.LSTM(2, 3, num_layers=2)).named_tensors()][:2] == [
        "weight_ih_l0",
        "weight_hh_l0",
    ]
    assert [n for n, _ in gru.named_tensors()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert [n for n, _ in custom.named_tensors()] == ["parameters[0]"]
    assert custom.describe()["architecture"] == "custom" and lstm.describe()["architecture"] == "lstm"


# ----------------------------------------------------------------------------- h0 formats -> flat state
def _by_hand(hs, cs=None):
    """The flat state ``[h_0; c_0; h_1; c_1; ...]`` from per-layer tensors (README, "State vector")."""
    parts = []
    for i, h in enumerate(hs):
        parts += [h] if cs is None else [h, cs[i]]
    return torch.cat(parts, -1)


def test_lstm_module_h0_tuple_round_trip_and_matches_torch():
    m = Problem("lstm", layers=2, proj=2).module()
    system = as_dynamics(m)
    x = torch.randn(3, 1, 3, dtype=F64, generator=_gen(1))
    h0 = torch.randn(2, 3, 2, dtype=F64, generator=_gen(2))
    c0 = torch.randn(2, 3, 5, dtype=F64, generator=_gen(3))
    s0 = system.initial_state((h0, c0), x, unbatched=False)
    torch.testing.assert_close(s0, _by_hand(h0, c0), rtol=0, atol=0)
    for li, (h, c) in enumerate(system.split(s0)):
        assert torch.equal(h, h0[li]) and torch.equal(c, c0[li])
    assert torch.equal(system.initial_state(s0, x, unbatched=False), s0)  # a flat state passes through
    # unbatched (L, H) tuples
    s_u = system.initial_state((h0[:, 0], c0[:, 0]), x[:1], unbatched=True)
    torch.testing.assert_close(s_u, s0[:1], rtol=0, atol=0)
    # one step from that state equals torch's own forward
    _, (hn, cn) = m(x, (h0, c0))
    torch.testing.assert_close(system.step(s0, x[:, 0]), _by_hand(hn, cn), rtol=1e-12, atol=1e-12)


def test_gru_module_h0_layers_format_and_errors():
    m = Problem("gru", layers=3).module()
    system = as_dynamics(m)
    x = torch.randn(2, 1, 3, dtype=F64)
    h0 = torch.randn(3, 2, 5, dtype=F64, generator=_gen(4))
    s0 = system.initial_state(h0, x, unbatched=False)
    torch.testing.assert_close(s0, _by_hand(h0), rtol=0, atol=0)
    torch.testing.assert_close(system.initial_state(h0[:, 1], x[:1], unbatched=True), s0[1:2], rtol=0, atol=0)
    _, hn = m(x, h0)
    torch.testing.assert_close(system.step(s0, x[:, 0]), _by_hand(hn), rtol=1e-12, atol=1e-12)
    assert torch.equal(system.initial_state(None, x, unbatched=False), torch.zeros(2, 15, dtype=F64))
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 2, 5\) \(the module's format\) or \(2, 15\)"):
        system.initial_state(h0[:2], x, unbatched=False)
    with pytest.raises(ValueError, match="h0 as a tuple is the LSTM's"):
        system.initial_state((h0, h0), x, unbatched=False)


def test_cell_h0_formats():
    x = torch.randn(2, 1, 3, dtype=F64)
    lstm_cell = nn.LSTMCell(3, 4).double()
    system = as_dynamics(lstm_cell)
    h, c = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    s0 = system.initial_state((h, c), x, unbatched=False)
    torch.testing.assert_close(s0, torch.cat([h, c], -1), rtol=0, atol=0)
    torch.testing.assert_close(system.initial_state((h[0], c[0]), x[:1], unbatched=True), s0[:1], rtol=0, atol=0)
    torch.testing.assert_close(system.step(s0, x[:, 0]), torch.cat(lstm_cell(x[:, 0], (h, c)), -1))
    with pytest.raises(ValueError, match=r"h0 for an LSTM must be the \(h0, c0\) tuple"):
        system.initial_state(h, x, unbatched=False)
    rnn_cell = as_dynamics(nn.RNNCell(3, 4).double())
    assert torch.equal(rnn_cell.initial_state(h, x, unbatched=False), h)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 4\) \(flat state, D=4\)"):
        rnn_cell.initial_state(h[None], x, unbatched=False)


def test_builtin_initial_state_follows_the_inputs_dtype():
    system = as_dynamics(nn.GRU(3, 4))
    s0 = system.initial_state(torch.ones(1, 2, 4, dtype=F64), torch.zeros(2, 1, 3), unbatched=False)
    assert s0.dtype == torch.float32 and torch.equal(s0, torch.ones(2, 4))


def test_custom_h0_formats_and_errors():
    system = as_dynamics(_custom(), state_size=4)
    x = torch.randn(2, 3, 4, dtype=F64)
    s = torch.randn(2, 4, dtype=F64)
    assert system.initial_state(s, x, unbatched=False) is s
    torch.testing.assert_close(system.initial_state(s[0], x[:1], unbatched=True), s[:1], rtol=0, atol=0)
    assert system.split(s)[0][0] is not None and torch.equal(system.join(system.split(s)), s)
    with pytest.raises(ValueError, match="h0 is required for a custom cell"):
        system.initial_state(None, x, unbatched=False)
    with pytest.raises(ValueError, match="h0 as a tuple is the LSTM's .* for custom"):
        system.initial_state((s, s), x, unbatched=False)
    with pytest.raises(TypeError, match="h0 has dtype torch.float32 but inputs have dtype torch.float64"):
        system.initial_state(s.float(), x, unbatched=False)


# ----------------------------------------------------------------------------- restricted step
@pytest.mark.parametrize("arch,layers,proj", [("lstm", 2, 0), ("lstm", 1, 2), ("gru", 2, 0)])
def test_restricted_step_is_the_full_step_with_c_held(arch, layers, proj):
    system = as_dynamics(Problem(arch, layers=layers, proj=proj).module())
    s = torch.randn(6, system.state_size, dtype=F64, generator=_gen(7))
    x = torch.randn(6, 3, dtype=F64, generator=_gen(8))
    base, full_step = system.restricted_step("full", s)
    assert base is s and torch.equal(full_step(s, x), system.step(s, x))
    base, step = system.restricted_step("h", s)
    idx = system.h_index()
    assert torch.equal(base, s[:, idx])
    z = torch.randn(6, system.h_size, dtype=F64, generator=_gen(9))
    by_hand = s.clone()
    by_hand[:, idx] = z  # h replaced, c held at its recorded value
    torch.testing.assert_close(step(z, x, s), system.step(by_hand, x)[:, idx], rtol=0, atol=0)


def test_custom_restricted_step_is_the_full_step():
    system = as_dynamics(_custom(), state_size=4)
    s, x = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    base, step = system.restricted_step("h", s)
    assert base is s and torch.equal(step(s, x), system.step(s, x))


# ----------------------------------------------------------------------------- sequence_states
SINGLE = [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 2)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("arch,proj", SINGLE)
def test_sequence_states_equal_run(arch, proj, batch_first):
    p = Problem(arch, proj=proj, batch_first=batch_first)
    m, x = p.module(), p.inputs(batch=3, steps=7)
    problem = rnnjac._checks.prepare(m, x)
    system = problem.dyn
    want = system.run(problem.s0, problem.xs)
    fused = system.sequence_states(problem.s0, problem.xs)  # the module's own forward on the CPU
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)
    reused = system.sequence_states(problem.s0, problem.xs, m(x)[0])
    torch.testing.assert_close(reused, want, rtol=1e-12, atol=1e-12)
    # unbatched inputs: the caller's outputs are unbatched too
    x1 = x[0] if batch_first else x[:, 0]
    p1 = rnnjac._checks.prepare(m, x1)
    one = system.sequence_states(p1.s0, p1.xs, m(x1)[0], unbatched=True)
    torch.testing.assert_close(one, system.run(p1.s0, p1.xs), rtol=1e-12, atol=1e-12)


def test_sequence_states_refuses_outputs_it_cannot_use():
    x = torch.randn(2, 4, 3, dtype=F64)
    for model, label in ((Problem("gru", layers=2).module(), "module with 2"), (nn.GRUCell(3, 5).double(), "cell")):
        system = as_dynamics(model)
        s0 = torch.zeros(2, system.state_size, dtype=F64)
        with pytest.raises(ValueError, match=f"only for a single-layer.*a {label}"):
            system.sequence_states(s0, x, torch.zeros(2, 4, 5, dtype=F64))
        torch.testing.assert_close(
            system.sequence_states(s0, x), system.run(s0, x), rtol=1e-12, atol=1e-12
        )  # fused per-layer op vs step loop
    custom = as_dynamics(_custom(), state_size=4)
    with pytest.raises(ValueError, match="a custom with 1 layer"):
        custom.sequence_states(torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, 4, dtype=F64), torch.zeros(2, 3, 4))


def test_lstm_cell_sequence_matches_torch():
    m = Problem("lstm", proj=2).module()
    x = Problem("lstm").inputs(batch=3, steps=6)
    h0, c0 = torch.randn(1, 3, 2, dtype=F64), torch.randn(1, 3, 5, dtype=F64)
    out, (_, c_last) = m(x, (h0, c0))
    hs = torch.cat([h0[0].unsqueeze(1), out], 1)
    p = LayerParams(m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.weight_hr_l0)
    cs = ARCHITECTURES["lstm"].cell_sequence(p, x, hs, c0[0])
    assert cs.shape == (3, 7, 5) and torch.equal(cs[:, 0], c0[0])
    torch.testing.assert_close(cs[:, -1], c_last[0], rtol=1e-12, atol=1e-12)
    for t in range(6):  # each c_t from torch's own forward over the first t+1 steps
        torch.testing.assert_close(cs[:, t + 1], m(x[:, : t + 1], (h0, c0))[1][1][0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- linearisations
@pytest.mark.parametrize("arch,layers,proj", [("lstm", 2, 2), ("gru", 1, 0), ("rnn_tanh", 2, 0), ("lstm", 1, 0)])
@pytest.mark.parametrize("state", ["full", "h"])
def test_factored_and_dense_linearizations_agree(arch, layers, proj, state):
    system = as_dynamics(Problem(arch, layers=layers, proj=proj).module())
    n, d = 6, system.size(state)
    s = torch.randn(n, system.state_size, dtype=F64, generator=_gen(1))
    x = torch.randn(n, 3, dtype=F64, generator=_gen(2))
    fac, den = system.linearize(s, x, "analytic"), system.linearize(s, x, "autograd")
    assert isinstance(fac, FactoredLinearization) and fac.factored
    assert isinstance(den, DenseLinearization) and not den.factored
    # the reference: autograd of the restricted step, independent of both
    base, step = system.restricted_step(state, s)
    ref = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda z, i=i: step(z[None], x[i : i + 1], s[i : i + 1])[0], base[i])
            for i in range(n)
        ]
    )
    q = torch.randn(n, d, 3, dtype=F64, generator=_gen(3))
    for lin in (fac, den):
        torch.testing.assert_close(lin.materialize(state), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.apply(q, state), ref @ q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.apply_transpose(q, state), ref.transpose(1, 2) @ q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.frobenius_sq(state), ref.pow(2).sum((1, 2)), rtol=1e-12, atol=1e-12)
        steps = lin.unbind(3)  # laid out as (B=2, steps=3)
        assert len(steps) == 3 and type(steps[0]) is type(lin)
        torch.testing.assert_close(steps[1].materialize(state), ref.reshape(2, 3, d, d)[:, 1], rtol=1e-12, atol=1e-12)
        cut = lin.detached()
        assert type(cut) is type(lin) and not cut.materialize(state).requires_grad
    assert fac.materialize(state).requires_grad  # references to the module's own weights


def test_custom_linearization_is_dense_from_the_closed_form():
    w = torch.randn(3, 3, dtype=F64)

    def jac(s, x):
        return (1 - torch.tanh(s @ w.T + x) ** 2).unsqueeze(-1) * w

    system = as_dynamics(rnnjac.CustomCell(lambda s, x: torch.tanh(s @ w.T + x), jac), state_size=3)
    s, x = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    lin = system.linearize(s, x, "analytic")
    assert isinstance(lin, DenseLinearization)
    torch.testing.assert_close(lin.materialize(), jac(s, x), rtol=0, atol=0)
    torch.testing.assert_close(system.linearize(s, x, "autograd").materialize(), jac(s, x), rtol=1e-12, atol=1e-12)


def test_converted_copies_are_still_builtin_and_leave_the_model_alone():
    m = nn.LSTM(3, 4, batch_first=True)
    system = as_dynamics(m)
    x = torch.randn(2, 5, 3)
    copy, xs = system.converted(x, None, F64, None)
    assert isinstance(copy, BuiltinSystem) and copy.dtype == F64 and xs.dtype == F64
    assert m.weight_hh_l0.dtype == torch.float32 and system.dtype == torch.float32
    assert system.converted(x, None, None, None) == (system, x)
    custom = as_dynamics(_custom(), state_size=4)
    with pytest.raises(TypeError, match="cannot convert a custom step"):
        custom.converted(torch.zeros(2, 3, 4), None, F64, None)


def test_dense_transpose_is_the_generic_vjp_and_differentiable():
    """``DenseLinearization.apply_transpose`` (one product with ``J^T``) equals the interface's generic vjp route, for
    the full state and the h block, under grad mode and inference mode, and its gradient in ``J`` passes gradcheck."""
    layout = as_dynamics(torch.nn.LSTM(2, 3)).layout
    jac = torch.randn(4, 6, 6, dtype=F64, generator=_gen(7), requires_grad=True)
    lin = DenseLinearization(layout, torch.zeros(4, 6, dtype=F64), torch.zeros(4, 2, dtype=F64), jac)
    for state, d in (("full", 6), ("h", 3)):
        u = torch.randn(4, d, 2, dtype=F64, generator=_gen(8))
        want = Linearization.apply_transpose(lin, u, state)
        torch.testing.assert_close(lin.apply_transpose(u, state), want, rtol=0, atol=1e-15)
        with torch.inference_mode():
            torch.testing.assert_close(lin.detached().apply_transpose(u, state), want.detach(), rtol=0, atol=1e-15)
        transposed = lambda j, u=u, s=state: lin._with(lin.s, lin.x, j).apply_transpose(u, s)  # noqa: E731
        assert torch.autograd.gradcheck(transposed, (jac,))
