"""Input Jacobians B_t = ds_t/dx_t: closed forms against torch.func on the module's own forward, finite
differences through verify(wrt="inputs"), exact answers of custom cells, layouts and streaming."""

import pytest
import torch
from torch.func import jacrev

import rnnjac
from rnnjac._checks import prepare
from rnnjac._input_jacobians import input_jacobian_stream

ARCHS = {
    "rnn_tanh": lambda **kw: torch.nn.RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: torch.nn.RNN(nonlinearity="relu", **kw),
    "gru": lambda **kw: torch.nn.GRU(**kw),
    "lstm": lambda **kw: torch.nn.LSTM(**kw),
    "lstm_proj": lambda **kw: torch.nn.LSTM(proj_size=2, **kw),
}


def _model(arch, layers, bias, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch](input_size=3, hidden_size=4, num_layers=layers, bias=bias, batch_first=True).double()


def _module_step(module, x_t, hx):
    """One step of the module's own forward: the flat state (layer-major, [h; c] per LSTM layer) and hx."""
    _, hx = module(x_t.unsqueeze(1), hx)
    if isinstance(hx, tuple):
        h, c = hx
        flat = torch.cat([torch.cat([h[li], c[li]], -1) for li in range(h.shape[0])], -1)
    else:
        flat = torch.cat(list(hx), -1)
    return flat, hx


def _reference(module, x):
    """B_t by torch.func.jacrev of the module's own one-step forward, from the module's own states."""
    b, steps, _ = x.shape
    lstm = isinstance(module, torch.nn.LSTM)
    hdim = module.proj_size or module.hidden_size
    h = torch.zeros(module.num_layers, b, hdim, dtype=x.dtype)
    hx = (h, torch.zeros(module.num_layers, b, module.hidden_size, dtype=x.dtype)) if lstm else h
    out = []
    for t in range(steps):
        jac = jacrev(lambda xt, hx=hx: _module_step(module, xt, hx)[0])(x[:, t])  # (B, D, B, I)
        out.append(torch.stack([jac[i, :, i] for i in range(b)]))
        _, hx = _module_step(module, x[:, t], hx)
    return torch.stack(out, 1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_closed_form_equals_torch_func_on_the_modules_forward(arch, layers, bias):
    module = _model(arch, layers, bias)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    got = rnnjac.input_jacobians(module, x, method="analytic")
    want = _reference(module, x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()


@pytest.mark.parametrize("cell", [torch.nn.RNNCell, torch.nn.GRUCell, torch.nn.LSTMCell])
def test_cells_closed_form_equals_torch_func(cell):
    torch.manual_seed(1)
    module = cell(3, 5).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    got = rnnjac.input_jacobians(module, x, method="analytic")
    want = rnnjac.input_jacobians(module, x, method="autograd")
    assert torch.allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("state", ["full", "h"])
def test_verify_wrt_inputs_passes_against_finite_differences(arch, state):
    module = _model(arch, 2, True, seed=3)
    ds = rnnjac.verify(module, torch.randn(2, 5, 3, dtype=torch.float64), state=state, wrt="inputs")
    assert ds.attrs["passed"] == 1, ds.attrs["worst_block"]
    assert ds.attrs["wrt"] == "inputs"
    assert float(ds.fd_max_abs_error.max()) < 1e-8


def test_verify_wrt_inputs_directional_passes():
    module = _model("lstm_proj", 2, True, seed=4)
    ds = rnnjac.verify(
        module,
        torch.randn(3, 4, 3, dtype=torch.float64),
        wrt="inputs",
        directions=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert ds.attrs["passed"] == 1 and ds.attrs["mode"] == "directional"


@pytest.mark.parametrize("directions", [None, 2])
def test_verify_wrt_inputs_catches_a_wrong_input_jacobian(monkeypatch, directions):
    import rnnjac._fd as fd

    real = fd.step_input_jacobians
    monkeypatch.setattr(fd, "step_input_jacobians", lambda *a, **k: real(*a, **k) * 1.001)
    ds = rnnjac.verify(
        _model("gru", 2, True), torch.randn(2, 4, 3, dtype=torch.float64), wrt="inputs", directions=directions
    )
    assert ds.attrs["passed"] == 0
    assert ("column input[" in ds.attrs["worst_block"]) if directions is None else ("B" in ds.attrs["worst_block"])


def test_verify_default_is_the_state_jacobian():
    ds = rnnjac.verify(_model("gru", 1, True), torch.randn(2, 4, 3, dtype=torch.float64))
    assert ds.attrs["wrt"] == "state" and "column layer" in ds.attrs["worst_block"]


def test_verify_rejects_an_unknown_wrt():
    with pytest.raises(ValueError, match="wrt must be one of 'state', 'inputs'; got 'x'"):
        rnnjac.verify(_model("gru", 1, True), torch.randn(2, 4, 3, dtype=torch.float64), wrt="x")


def test_custom_cell_gives_its_exact_input_jacobian():
    torch.manual_seed(2)
    w, u = torch.randn(4, 4, dtype=torch.float64) * 0.5, torch.randn(4, 3, dtype=torch.float64)
    cell = rnnjac.CustomCell(lambda s, x: torch.tanh(s @ w.T + x @ u.T))
    x, h0 = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    got = rnnjac.input_jacobians(cell, x, h0)
    states = rnnjac.trajectory(cell, x, h0)[:, 1:]
    want = (1 - states**2).unsqueeze(-1) * u
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert rnnjac.verify(cell, x, h0, wrt="inputs").attrs["passed"] == 1


def test_h_state_is_the_h_rows_and_layouts_agree():
    module = _model("lstm", 2, True)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    full, h = rnnjac.input_jacobians(module, x), rnnjac.input_jacobians(module, x, state="h")
    idx = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    assert torch.equal(h, full[:, :, idx])
    unbatched = rnnjac.input_jacobians(module, x[0])  # (T, I) -> (T, D, I)
    assert torch.allclose(unbatched, full[0], rtol=0, atol=1e-14)
    tb = rnnjac.input_jacobians(module, x.transpose(0, 1), batch_first=False)
    assert torch.allclose(tb, full, rtol=0, atol=1e-14)


def test_streamed_chunks_equal_one_chunk():
    problem = prepare(_model("gru", 2, True), torch.randn(3, 7, 3, dtype=torch.float64))
    whole = torch.cat([c.b for c in input_jacobian_stream(problem, 7)], 1)
    chunks = list(input_jacobian_stream(problem, 3))
    assert [c.t0 for c in chunks] == [0, 3, 6]
    assert torch.allclose(torch.cat([c.b for c in chunks], 1), whole, rtol=0, atol=1e-14)


def test_differentiable_like_the_autograd_path():
    module = _model("lstm", 2, True)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    grads = []
    for method in ("analytic", "autograd"):
        module.zero_grad()
        rnnjac.input_jacobians(module, x, method=method).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_bad_inputs_are_refused_before_work():
    module = _model("gru", 1, True)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    x[1, 2, 0] = float("nan")
    with pytest.raises(rnnjac.NonFiniteError, match="inputs contain NaN/Inf, first at step t=3"):
        rnnjac.input_jacobians(module, x)
    with pytest.raises(ValueError, match="input_size=3"):
        rnnjac.input_jacobians(module, torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="state must be one of"):
        rnnjac.input_jacobians(module, torch.randn(2, 4, 3, dtype=torch.float64), state="c")
