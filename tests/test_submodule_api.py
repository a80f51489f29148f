"""``submodule=`` on the public functions: the recurrent core of a larger model, fed what the model feeds it.

Every result must equal the hand-written call on the submodule with the inputs computed by the model's own
layers in front of it (an independent reference: those layers called directly, in the submodule's own layout).
"""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
from rnnjac.regularizers import JacobianPenalty, input_output_penalty, jacobian_penalty, lyapunov_penalty


class EncoderGRU(nn.Module):
    """Batch-first inputs, a sequence-first GRU inside: the layout trap of a hand-written call."""

    def __init__(self):
        super().__init__()
        self.encoder, self.gru, self.readout = nn.Linear(5, 3), nn.GRU(3, 8), nn.Linear(8, 2)

    def forward(self, x):  # x: (B, T, 5)
        h, _ = self.gru(torch.tanh(self.encoder(x)).transpose(0, 1))
        return self.readout(h.transpose(0, 1))

    def core_inputs(self, x):  # what the GRU receives, in its own (T, B, I) layout
        return torch.tanh(self.encoder(x)).transpose(0, 1).detach()


class LitLSTM(nn.Module):
    """A Lightning-style module: an LSTM core with a learned initial state."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(4, 3), nn.LSTM(3, 6, batch_first=True), nn.Linear(6, 1)
        self.h0, self.c0 = nn.Parameter(0.5 * torch.randn(1, 1, 6)), nn.Parameter(0.5 * torch.randn(1, 1, 6))

    def initial_state(self, batch):
        return self.h0.expand(1, batch, 6).contiguous(), self.c0.expand(1, batch, 6).contiguous()

    def forward(self, x):
        out, _ = self.rnn(self.embed(x), self.initial_state(x.shape[0]))
        return self.head(out)

    def training_step(self, batch, batch_idx):  # pragma: no cover (the Lightning hook; not called here)
        return self(batch).pow(2).mean()


class TakeOutput(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def nested_lstm():
    """A 2-layer LSTM inside nn.Sequential wrappers: dotted name ``1.0.rnn``."""
    return nn.Sequential(
        nn.Linear(4, 3), nn.Sequential(TakeOutput(nn.LSTM(3, 5, num_layers=2, batch_first=True))), nn.Linear(5, 2)
    )


def _cases():
    torch.manual_seed(0)
    enc, lit, nest = EncoderGRU().double(), LitLSTM().double(), nested_lstm().double()
    x5 = torch.randn(3, 30, 5, dtype=torch.float64)
    x4 = torch.randn(3, 30, 4, dtype=torch.float64)
    with torch.no_grad():
        return {
            "encoder_gru": (enc, x5, "gru", enc.gru, enc.core_inputs(x5), None),
            "lightning_lstm": (lit, x4, "rnn", lit.rnn, lit.embed(x4), lit.initial_state(3)),
            "nested_2layer_lstm": (nest, x4, "1.0.rnn", nest[1][0].rnn, nest[0](x4), None),
        }


CASES = _cases()


def _gen():
    return torch.Generator().manual_seed(3)


def _assert_same_dataset(a, b):
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name_given", [True, False])
def test_spectra_equal_the_hand_written_call(case, name_given):
    model, x, name, core, core_x, h0 = CASES[case]
    sub = name if name_given else None
    got = rnnjac.spectra(model, x, k=4, eigenvalues=True, end_to_end=True, generator=_gen(), submodule=sub)
    want = rnnjac.spectra(core, core_x, h0, k=4, eigenvalues=True, end_to_end=True, generator=_gen())
    _assert_same_dataset(got, want)
    assert got.attrs["submodule"] == name and "submodule" not in want.attrs


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_functions_equal_the_hand_written_call(case):
    model, x, name, core, core_x, h0 = CASES[case]
    bf_ref = core_x if getattr(core, "batch_first", False) else core_x.transpose(0, 1)
    assert torch.equal(rnnjac.trajectory(model, x, submodule=name), rnnjac.trajectory(core, core_x, h0))
    J = rnnjac.jacobians(model, x, submodule=name)
    assert torch.equal(J, rnnjac.jacobians(core, core_x, h0))
    assert J.shape[:2] == bf_ref.shape[:2]  # (B, T): batch and time not swapped
    chunks = [j for _, j in rnnjac.iter_jacobians(model, x, time_chunk=7, submodule=name)]
    ref_chunks = [j for _, j in rnnjac.iter_jacobians(core, core_x, h0, time_chunk=7)]
    assert torch.equal(torch.cat(chunks, 1), torch.cat(ref_chunks, 1))
    torch.testing.assert_close(torch.cat(chunks, 1), J, rtol=1e-12, atol=1e-14)  # chunked run: rounding only
    fd = rnnjac.finite_difference_jacobians(model, x, submodule=name)
    assert torch.equal(fd, rnnjac.finite_difference_jacobians(core, core_x, h0))


@pytest.mark.parametrize("case", list(CASES))
def test_verify_and_lyapunov_spectrum_record_the_submodule(case):
    model, x, name, core, core_x, h0 = CASES[case]
    got = rnnjac.verify(model, x, submodule=name)
    want = rnnjac.verify(core, core_x, h0)
    _assert_same_dataset(got, want)
    assert got.attrs["passed"] == 1 and got.attrs["submodule"] == name
    le = rnnjac.lyapunov_spectrum(model, x, k=3, warmup=5, generator=_gen(), submodule=name)
    _assert_same_dataset(le, rnnjac.lyapunov_spectrum(core, core_x, h0, k=3, warmup=5, generator=_gen()))
    assert le.attrs["submodule"] == name


def test_fixed_points_from_trajectories_of_the_core():
    model, x, name, core, core_x, h0 = CASES["encoder_gru"]
    traj = rnnjac.trajectory(model, x, submodule=name)
    x_star = torch.tanh(model.encoder(torch.zeros(5, dtype=torch.float64))).detach()  # the core's constant input
    got = rnnjac.fixed_points(model, x_star, traj, n_initial=20, generator=_gen(), submodule=name)
    want = rnnjac.fixed_points(core, x_star, rnnjac.trajectory(core, core_x), n_initial=20, generator=_gen())
    _assert_same_dataset(got, want)
    assert got.sizes["fixed_point"] >= 1 and got.attrs["submodule"] == "gru"
    auto = rnnjac.fixed_points(model, x_star, traj, n_initial=20, generator=_gen())  # auto-detected
    _assert_same_dataset(auto, want)


@pytest.mark.parametrize("case", list(CASES))
def test_penalties_equal_the_hand_written_call_and_spare_the_encoder(case):
    model, x, name, core, core_x, h0 = CASES[case]
    got = jacobian_penalty(model, x, submodule=name)
    assert torch.equal(got, jacobian_penalty(core, core_x, h0))
    lyap = lyapunov_penalty(model, x, k=2, generator=_gen(), submodule=name)
    assert torch.equal(lyap, lyapunov_penalty(core, core_x, h0, k=2, generator=_gen()))
    module_penalty = JacobianPenalty("end_to_end", weight=0.5, submodule=name)
    assert torch.equal(module_penalty(model, x), 0.5 * jacobian_penalty(core, core_x, h0, kind="end_to_end"))
    model.zero_grad(set_to_none=True)
    (got + lyap).backward()
    assert all(p.grad is not None for p in core.parameters())
    # the captured inputs (and h0) are detached: no other parameter, before or after the core, gets a gradient
    others = [p for p in model.parameters() if not any(p is q for q in core.parameters())]
    assert others and all(p.grad is None for p in others)


def test_outputs_with_a_whole_model_is_refused():
    model, x, name, *_ = CASES["encoder_gru"]
    with pytest.raises(ValueError, match="outputs=.*leave them None"):
        jacobian_penalty(model, x, outputs=model(x), submodule=name)


def test_two_recurrent_submodules_need_a_name():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fast, self.slow = nn.GRU(2, 4, batch_first=True), nn.LSTM(4, 3, batch_first=True)

        def forward(self, x):
            return self.slow(self.fast(x)[0])[0]

    model, x = Two(), torch.randn(2, 10, 2)
    for call in (rnnjac.spectra, rnnjac.jacobians, rnnjac.trajectory, rnnjac.verify, jacobian_penalty):
        with pytest.raises(
            ValueError, match=r"2 recurrent submodules: 'fast' \(GRU\), 'slow' \(LSTM\); pass submodule="
        ):
            call(model, x)
    with pytest.raises(ValueError, match="2 recurrent submodules"):
        rnnjac.fixed_points(model)
    ds = rnnjac.lyapunov_spectrum(model, x, k=2, submodule="slow")  # its input is the GRU's output sequence
    with torch.no_grad():
        want = rnnjac.lyapunov_spectrum(model.slow, model.fast(x)[0], k=2)
    assert ds.attrs["submodule"] == "slow" and ds.sizes["le_index"] == want.sizes["le_index"]
    with pytest.raises(ValueError, match="submodule='medium' is not in Two; its recurrent submodules: 'fast'"):
        rnnjac.spectra(model, x, submodule="medium")


def test_auto_detect_logs_the_submodule(caplog):
    model, x, *_ = CASES["nested_2layer_lstm"]
    with caplog.at_level(logging.INFO, logger="rnnjac"):
        ds = rnnjac.spectra(model, x, k=2)
    assert "analysing submodule '1.0.rnn'" in caplog.text and ds.attrs["submodule"] == "1.0.rnn"


def test_whole_model_errors():
    model, x, name, *_ = CASES["encoder_gru"]
    with pytest.raises(ValueError, match="leave batch_first=None"):
        rnnjac.spectra(model, x, batch_first=True)
    with pytest.raises(TypeError, match="expected nn.RNN"):  # no recurrent submodule at all: as before
        rnnjac.spectra(nn.Linear(3, 3), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="submodule='encoder' is a Linear, not an nn.RNN"):
        rnnjac.jacobians(model, x, submodule="encoder")


def test_recurrent_module_passes_through_unchanged():
    gru, x = nn.GRU(3, 4, batch_first=True), torch.randn(2, 6, 3)
    ds = rnnjac.spectra(gru, x, k=2, generator=_gen())
    assert "submodule" not in ds.attrs
    assert torch.equal(rnnjac.jacobians(gru, x, submodule=""), rnnjac.jacobians(gru, x))  # "" names the model


def test_input_output_kind_equals_per_sample_autograd_jacobians():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x[b]).pow(2).sum() for b in range(4)]
    ).mean()
    got = JacobianPenalty("input_output", weight=2.0, estimator="exact")(net, x)
    torch.testing.assert_close(got, 2.0 * want, rtol=1e-12, atol=0)
    torch.testing.assert_close(input_output_penalty(net, x, estimator="exact"), want, rtol=1e-12, atol=0)
    got.backward()
    assert net[0].weight.grad is not None and net[2].weight.grad is not None  # (the last bias leaves J unchanged)
    with pytest.raises(ValueError, match="leave h0=None, outputs=None"):
        JacobianPenalty("input_output")(net, x, h0=torch.zeros(4, 5))
    assert "input_output_penalty" in rnnjac.regularizers.__all__


def _readout_python_block(marker: str) -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"expected one README python block with {marker!r}"
    return blocks[0]


@pytest.mark.slow
def test_readme_training_loop_with_penalty_and_monitor_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(_readout_python_block("SpectrumMonitor("), namespace)  # noqa: S102 (the README's own example)
    ds = namespace["monitor"].dataset()
    assert ds.sizes["checkpoint"] >= 2 and "lyapunov_exponents" in ds


def test_readme_submodule_recipe_runs():
    namespace = {}
    exec(_readout_python_block('submodule="gru"'), namespace)  # noqa: S102 (the README's own example)
