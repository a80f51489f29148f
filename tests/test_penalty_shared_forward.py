"""The penalties' linearisation from the recorded trajectory (``BuiltinSystem.linearize_states``): nothing the
forward computed is computed again (next states read from the trajectory, the LSTM gates kept from the forward),
with values and derivatives checked against independent references (``linearize`` at the gathered points, the
step loop with autograd Jacobians, finite differences); and the ``compile=`` option with its fallback."""

from __future__ import annotations

import shutil

import pytest
import torch
from problems import Problem

import rnnjac
import rnnjac._cells as cells
import rnnjac._elementwise as elementwise_mod
import rnnjac._fused_rows as fused_rows
from rnnjac._builtin_system import BuiltinSystem
from rnnjac._checks import prepare
from rnnjac.errors import RnnjacWarning
from rnnjac.regularizers import JacobianPenalty, forward_with_states, jacobian_penalty, lyapunov_penalty

F64 = torch.float64
CONFIGS = [
    (arch, layers, proj)
    for arch in ("rnn_tanh", "rnn_relu", "gru", "lstm")
    for layers in (1, 2)
    for proj in (0, 2)
    if proj == 0 or arch == "lstm"
]


def _ids(c):
    return f"{c[0]}-L{c[1]}" + (f"-proj{c[2]}" if c[2] else "")


def _setup(arch, layers, proj, batch=3, steps=6):
    p = Problem(arch, layers=layers, proj=proj, input_size=2, hidden=4)
    return p.module(seed=3), p.inputs(batch=batch, steps=steps, seed=4)


def _reference(model, x, fn, **kw):
    """``fn`` on the model's step as a custom cell: trajectory by the step loop, Jacobians by autograd."""
    problem = prepare(model, x)
    dyn = problem.dyn
    cell = rnnjac.CustomCell(lambda s, xt: dyn.step(s, xt))
    return fn(cell, problem.xs, problem.s0, batch_first=True, **kw)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [slice(0, 6), slice(1, 6, 2)], ids=["all", "stride2"])
def test_linearize_states_equals_linearize_at_the_gathered_points(config, steps):
    m, x = _setup(*config)
    problem = prepare(m, x)
    states, gates = problem.dyn.fused_states_and_gates(problem.s0, problem.xs)
    s = states[:, :-1][:, steps].reshape(-1, states.shape[-1])
    want = problem.dyn.linearize(s, problem.xs[:, steps].reshape(s.shape[0], -1))
    for g in (gates, None):
        got = problem.dyn.linearize_states(states, problem.xs, steps, g)
        for c_got, c_want in zip(got.coefs, want.coefs, strict=True):
            assert c_got.keys() == c_want.keys()
            for k in c_want:
                torch.testing.assert_close(c_got[k], c_want[k], rtol=1e-12, atol=1e-12, msg=k)
        torch.testing.assert_close(got.materialize(), want.materialize(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [("lstm", 2, 2), ("lstm", 2, 0), ("gru", 2, 0)], ids=_ids)
def test_penalty_reuses_the_forwards_gates(monkeypatch, config):
    m, x = _setup(*config)
    out, states = forward_with_states(m, x)
    assert BuiltinSystem.recall_gates(states) is not None
    calls = []
    real = cells._pre
    monkeypatch.setattr(cells, "_pre", lambda *a: calls.append(1) or real(*a))
    got = jacobian_penalty(m, x, states=states)
    assert calls == []  # no gate GEMM: the forward's gates and next states are reused
    torch.testing.assert_close(got, _reference(m, x, jacobian_penalty), rtol=1e-10, atol=1e-10)
    # a view or an in-place change of the states: the gates are not trusted, recomputed from the states
    assert BuiltinSystem.recall_gates(states.detach()) is None
    states2 = states.detach().clone()
    BuiltinSystem.remember_gates(states2, [None, None])  # nothing to keep: not registered
    assert BuiltinSystem.recall_gates(states2) is None
    _, states3 = forward_with_states(m, x)
    with torch.no_grad():
        states3.add_(0.0)
    assert BuiltinSystem.recall_gates(states3) is None
    calls.clear()
    torch.testing.assert_close(jacobian_penalty(m, x, states=states3), got, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2  # recomputed: one _pre per layer


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_single_layer_exact_penalty_reads_what_the_forward_kept(monkeypatch, arch):
    """The exact Frobenius penalty of one CPU GRU/LSTM layer runs on the layer's record (:mod:`rnnjac._fused_rows`),
    every step and strided; its values and gradients against the step loop are checked below."""
    m, x = _setup(arch, 1, 0)
    _, states = forward_with_states(m, x)
    calls, real = [], fused_rows._Rows.apply
    monkeypatch.setattr(fused_rows._Rows, "apply", lambda *a: calls.append((a[4], a[6])) or real(*a))
    jacobian_penalty(m, x, states=states)
    jacobian_penalty(m, x, states=states, time_stride=2)
    kind = fused_rows._GRU if arch == "gru" else fused_rows._LSTM
    assert calls == [(slice(0, 6, 1), kind), (slice(0, 5, 2), kind)]
    if arch == "lstm":  # the caller's own forward (outputs=): the rebuilt gates and cell states form a record too
        got = jacobian_penalty(m, x, outputs=m(x)[0])
        assert calls[-1] == (slice(0, 6, 1), kind)
        torch.testing.assert_close(got, _reference(m, x, jacobian_penalty), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_values_and_gradients_of_every_kind_equal_the_step_loop(config):
    m, x = _setup(*config)
    _, states = forward_with_states(m, x)
    params = list(m.parameters())
    for fn, kw in (
        (jacobian_penalty, {}),
        (jacobian_penalty, {"time_stride": 2}),
        (jacobian_penalty, {"kind": "spectral", "n_iter": 3}),
        (jacobian_penalty, {"kind": "end_to_end"}),
        (lyapunov_penalty, {"k": 2, "warmup": 1}),
    ):
        if config[0] == "rnn_relu" and fn is lyapunov_penalty:
            continue  # this relu net has a step with J = 0 (every unit off): log 0, the reference raises too
        got = fn(m, x, states=states, generator=torch.Generator().manual_seed(5), **kw)
        want = _reference(m, x, fn, generator=torch.Generator().manual_seed(5), **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{fn.__name__} {kw}")
        # relu: phi' is piecewise constant, so W_ih, b_ih and b_hh may not reach the value at all (gradient 0)
        g_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
        g_want = torch.autograd.grad(want, params, allow_unused=True)
        for a, b, p in zip(g_got, g_want, params, strict=True):
            a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"{fn.__name__} {kw}")
    if config[1] == 1:  # the caller's own forward (outputs=): the same gates are rebuilt once
        got = jacobian_penalty(m, x, outputs=m(x)[0])
        torch.testing.assert_close(got, _reference(m, x, jacobian_penalty), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] != "rnn_relu"], ids=_ids)
def test_gradcheck_and_gradgradcheck_through_the_shared_forward(config):
    m, x = _setup(*config, batch=2, steps=3)
    x = x.clone().requires_grad_(True)
    names = ["weight_ih_l0", "weight_hh_l0"] + ([f"weight_hr_l{config[1] - 1}"] if config[2] else [])
    ws = [getattr(m, n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *ws, lyapunov=True):
        params = dict(m.named_parameters()) | dict(zip(names, ws, strict=True))
        with torch.nn.utils.stateless._reparametrize_module(m, params):
            _, states = forward_with_states(m, x)
            pen = jacobian_penalty(m, x, states=states)
            if lyapunov:
                pen = pen + lyapunov_penalty(m, x, states=states, k=2, generator=torch.Generator().manual_seed(0))
            return pen

    assert torch.autograd.gradcheck(f, (x, *ws))
    assert torch.autograd.gradgradcheck(lambda *a: f(*a, lyapunov=False), (x, *ws))


def _fresh_compile_state(monkeypatch):
    monkeypatch.setattr(elementwise_mod, "_COMPILED", {})
    monkeypatch.setattr(elementwise_mod, "_FAILED", {})


@pytest.mark.parametrize("where", ["wrap", "call"])
def test_compile_falls_back_with_one_warning(monkeypatch, where):
    _fresh_compile_state(monkeypatch)

    def broken(fn, **kw):
        if where == "wrap":
            raise RuntimeError("no compiler here")
        return lambda *a: (_ for _ in ()).throw(RuntimeError("C++ compile failed"))

    monkeypatch.setattr(torch, "compile", broken)
    m, x = _setup("gru", 1, 0)
    _, states = forward_with_states(m, x)
    want = jacobian_penalty(m, x, states=states)
    with pytest.warns(RnnjacWarning, match="could not compile gru_gate_rows.*run eagerly"):
        got = jacobian_penalty(m, x, states=states, compile=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(elementwise_mod._FAILED) == {elementwise_mod.gru_gate_rows}  # the values; no backward ran
    got2 = JacobianPenalty("frobenius", compile=True)(m, x, states=states)  # no second warning (error filter)
    torch.testing.assert_close(got2, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="compile= must be True or False; got 'yes'"):
        jacobian_penalty(m, x, compile="yes")
    with pytest.raises(TypeError, match="double_backward must be True or False; got 1"):
        forward_with_states(m, x, double_backward=1)


_FUSED_PENALTIES = {  # penalty, options, the functions it hands to torch.compile
    "spectral": (jacobian_penalty, {"kind": "spectral", "n_iter": 4}, {"_power_directions", "_squared_image"}),
    "spectral_bf16": (
        jacobian_penalty,
        {"kind": "spectral", "n_iter": 4, "power_dtype": torch.bfloat16},
        {"_power_directions", "_squared_image"},
    ),
    "projection": (jacobian_penalty, {"estimator": "projection", "n_proj": 3}, {"_squared_coimage"}),
    "lyapunov": (lyapunov_penalty, {"k": 2, "warmup": 1, "reortho_every": 2}, {"_tangent"}),
    "end_to_end": (jacobian_penalty, {"kind": "end_to_end"}, {"_tangent"}),
    "end_to_end_projection": (
        jacobian_penalty,
        {"kind": "end_to_end", "estimator": "projection", "n_proj": 2},
        {"_cotangent"},
    ),
}


def _compiled_names() -> set:
    return {(slot if callable(slot) else slot[0]).__name__ for slot in elementwise_mod._COMPILED}


@pytest.mark.parametrize("kind", list(_FUSED_PENALTIES))
def test_compiled_penalties_trace_through_dynamo(monkeypatch, kind):
    """With ``compile=True`` the spectral penalty's power iterations and value, the projection estimate and the
    per-step ``J_t Q`` of the Lyapunov and end-to-end penalties are whole-linearisation functions handed to
    ``torch.compile``; here with the ``aot_eager`` backend (dynamo's tracing and AOTAutograd's graphs, eager
    kernels: no C++ compiler needed). Same values and gradients as the eager code from the same random directions,
    for a GRU and a stacked LSTM, and for the spectral penalty also after a change of batch and of hidden size in
    the same process (a layout size that dynamo had made symbolic broke the trace: one static compiled copy per
    structure now); nothing falls back; a custom cell is never compiled."""
    _fresh_compile_state(monkeypatch)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    fn, kw, names = _FUSED_PENALTIES[kind]
    cases = [("gru", 1, 4, 3), ("lstm", 2, 4, 3)]  # arch, layers, H, batch
    if kind == "spectral":  # then a new batch size and a new hidden size, one process
        cases += [("lstm", 2, 4, 5), ("lstm", 2, 6, 3)]
    for arch, layers, hidden, batch in cases:
        m = Problem(arch, layers=layers, input_size=2, hidden=hidden).module(seed=3).float()
        x = Problem(arch, layers=layers, input_size=2, hidden=hidden).inputs(batch=batch, steps=6, seed=4).float()
        params = list(m.parameters())
        got = []
        for compile in (False, True):
            _, states = forward_with_states(m, x)
            val = fn(m, x, states=states, compile=compile, generator=torch.Generator().manual_seed(5), **kw)
            got.append((val, torch.autograd.grad(val, params)))
        tol = {"rtol": 2e-2, "atol": 1e-3} if kind == "spectral_bf16" else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got[1][0], got[0][0], **tol)
        for a, b in zip(got[1][1], got[0][1], strict=True):
            torch.testing.assert_close(a, b, **tol)
    assert elementwise_mod._FAILED == {}
    assert names <= _compiled_names()
    _fresh_compile_state(monkeypatch)
    cell = rnnjac.CustomCell(lambda s, xt: torch.tanh(s + xt.sum(-1, keepdim=True)))
    fn(cell, x, torch.zeros(batch, 2), compile=True, **kw)
    assert elementwise_mod._COMPILED == {}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_compiled_path_equals_eager_on_the_smallest_case(monkeypatch, arch):
    """Compiling takes ~30 s per function on a 2-core CPU: one layer only, the row form's values and its hand-written
    backward by the pre-activations (:mod:`rnnjac._fused_rows`), every step and every other step; for the LSTM also
    the spectral penalty's fused power iterations and value."""
    _fresh_compile_state(monkeypatch)
    m, x = _setup(arch, 1, 0, batch=2, steps=5)
    params = list(m.parameters())
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    kind = fused_rows._GRU if arch == "gru" else fused_rows._LSTM
    for stride in (1, 2):
        values, grads = [], []
        for compile in (False, True):  # a fresh forward each: the compiled backward runs once (first order only)
            _, states = forward_with_states(m, x)
            if compile and not compiler:  # a machine without a C++ compiler: the documented fallback, one warning
                with pytest.warns(RnnjacWarning, match="could not compile"):
                    values.append(jacobian_penalty(m, x, states=states, compile=compile, time_stride=stride))
            else:
                values.append(jacobian_penalty(m, x, states=states, compile=compile, time_stride=stride))
            grads.append(torch.autograd.grad(values[-1], params))
        if compiler:
            assert elementwise_mod._FAILED == {}, elementwise_mod._FAILED
            want = {kind.rows, kind.vjp_whole} | ({kind.vjp_joined} if stride > 1 else set())
            assert set(elementwise_mod._COMPILED) == want
        torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if arch == "gru":  # the spectral functions are the same for every cell (compiling them costs ~30 s): LSTM only
        return
    spectral = []  # the spectral penalty's fused power iterations and value (one compiled function each)
    for compile in (False, True):
        _, states = forward_with_states(m, x)
        gen = torch.Generator().manual_seed(0)
        if compile and not compiler:
            with pytest.warns(RnnjacWarning, match="could not compile"):
                val = jacobian_penalty(m, x, kind="spectral", states=states, compile=True, generator=gen)
        else:
            val = jacobian_penalty(m, x, kind="spectral", states=states, compile=compile, generator=gen)
        spectral.append((val, torch.autograd.grad(val, params)))
    if compiler:
        assert {"_power_directions", "_squared_image"} <= _compiled_names()
    torch.testing.assert_close(spectral[1][0], spectral[0][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(spectral[1][1], spectral[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_cudnn_weight_compaction_warning_silenced_for_this_module_only():
    """cuDNN warns that one layer's weights are not the module's flat buffer (always true for a layer of a stack,
    where its advice cannot apply): silenced where rnnjac's stack calls the op, nowhere else."""
    import warnings

    import rnnjac._builtin_system as bs

    text = "RNN module weights are not part of single contiguous chunk of memory. ..."
    with warnings.catch_warnings(record=True) as seen:
        bs._silence_compaction_warning()  # as _fused_layer does before a cuDNN call
        bs._silence_compaction_warning()  # added once only
        assert sum(f[1] is not None and f[1].pattern == bs._COMPACTION for f in warnings.filters) == 1
        warnings.warn_explicit(text, UserWarning, bs.__file__, 1, module=bs.__name__)
        warnings.warn_explicit(text, UserWarning, "user.py", 1, module="user")
    assert [str(w.message) for w in seen] == [text]


@pytest.mark.parametrize("arch,layers", [("gru", 1), ("gru", 2), ("lstm", 1)])
def test_shared_outputs_refuse_in_place_edits(arch, layers):
    """The outputs of forward_with_states are views of the states the penalty reads: an in-place edit (a mask,
    say) would change the penalty silently, so torch refuses it for every layout."""
    m, x = _setup(arch, layers, 0)
    out, states = forward_with_states(m, x)
    with pytest.raises(RuntimeError, match="view"):
        out.mul_(0.5)
