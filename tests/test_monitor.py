"""SpectrumMonitor: spectra during a plain PyTorch training loop."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
import rnnjac.cli
from rnnjac import spectra
from rnnjac._datasets import validate
from rnnjac.monitor import SpectrumMonitor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.3))
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.readout = nn.Linear(6, 1)

    def forward(self, x):
        return self.readout(self.gru(self.encoder(x))[0])


def _probe():
    return torch.randn(3, 40, 2, generator=torch.Generator().manual_seed(1))


def _train(monitor, steps=60, snapshots=None):
    model = Net()
    model.readout.eval()  # a mixed train/eval state that each measurement must give back
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x = torch.randn(4, 30, 2, generator=torch.Generator().manual_seed(2))
    y = x.cumsum(1)[..., :1] * 0.1
    for step in range(steps + 1):
        if snapshots is not None and step % monitor.every == 0:
            snapshots[step] = copy.deepcopy(model)
        monitor.step(model, step)
        assert model.training and model.encoder[1].training and not model.readout.training
        if step == steps:
            break
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.slow
def test_training_run_gives_a_sweep_dataset_that_plots(tmp_path):
    seen = []
    snapshots = {}
    monitor = SpectrumMonitor(
        _probe(), every=20, k=4, warmup=5, tangent_warmup=5, callback=lambda s, sc: seen.append((s, sc))
    )
    _train(monitor, snapshots=snapshots)
    ds = monitor.dataset()
    validate(ds)
    assert ds.training_step.values.tolist() == [0, 20, 40, 60] and ds.sizes["checkpoint"] == 4
    assert ds.lyapunov_exponents.dims == ("checkpoint", "batch", "le_index") and ds.sizes["le_index"] == 4
    assert ds.attrs["submodule"] == "gru" and ds.attrs["architecture"] == "gru"
    assert {"lyapunov_vs_training_step", "kaplan_yorke_vs_training_step", "lyapunov_spectrum"} <= set(
        rnnjac.plot.available(ds)
    )
    # each row equals an independent analysis of the model as it was at that step
    for i, step in enumerate([0, 20, 40, 60]):
        m = snapshots[step].eval()
        with torch.no_grad():
            ref = spectra(
                m.gru, m.encoder(_probe()), k=4, warmup=5, tangent_warmup=5, generator=torch.Generator().manual_seed(0)
            )
        np.testing.assert_array_equal(ds.lyapunov_exponents[i].values, ref.lyapunov_exponents.values)
        np.testing.assert_array_equal(ds.kaplan_yorke_dimension[i].values, ref.kaplan_yorke_dimension.values)
        sv = ref.singular_values.values[:, 5:].reshape(-1, 6)
        np.testing.assert_allclose(ds.singular_values_q90[i].values, np.quantile(sv, 0.9, axis=0), rtol=1e-6)
        # the callback got the scalars of this row
        assert seen[i][0] == step
        scalars = seen[i][1]
        assert scalars["lyapunov_exponent_1"] == float(np.median(ref.lyapunov_exponents.values[:, 0]))
        assert scalars["max_singular_value_q50"] == pytest.approx(float(np.median(sv[:, 0])), rel=1e-6)
        assert set(scalars) == {f"lyapunov_exponent_{j}" for j in range(1, 5)} | {
            "kaplan_yorke_dimension",
            "ks_entropy",
            "max_singular_value_q10",
            "max_singular_value_q50",
            "max_singular_value_q90",
        }
    assert not np.array_equal(ds.lyapunov_exponents[0].values, ds.lyapunov_exponents[-1].values)  # it learned
    path = monitor.save(tmp_path / "monitor.nc")
    validate(rnnjac.open_dataset(path))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        monitor.save(path)
    assert monitor.save(path, overwrite=True) == path
    assert rnnjac.cli.main(["plot", str(path), "-o", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir())  # figures written


def test_step_schedule_and_recurrent_model_itself():
    gru = nn.GRU(2, 5, batch_first=True)
    monitor = SpectrumMonitor(_probe(), every=3, quantiles=())
    assert monitor.step(gru, 1) is None and monitor.step(gru, 2) is None
    first = monitor.step(gru, 0)
    assert set(first) == {"lyapunov_exponent_1", *(f"lyapunov_exponent_{i}" for i in range(2, 6))} | {
        "kaplan_yorke_dimension",
        "ks_entropy",
    }  # default k = min(5, D)
    assert monitor.step(gru, 0) is None  # already measured (e.g. gradient accumulation repeats a step)
    assert monitor.step(gru, 6) is not None and monitor.steps == [0, 6]
    ds = monitor.dataset()
    validate(ds)
    assert ds.attrs["submodule"] == "" and "singular_values_q50" not in ds


@pytest.mark.parametrize("arch", ["gru_sequence_first", "lstm_2_layers"])
def test_sv_steps_bounds_the_quantile_steps(arch):
    if arch == "gru_sequence_first":
        rnn, probe = nn.GRU(2, 5), _probe().transpose(0, 1)  # the probe in the module's own (T, B, I) layout
    else:
        rnn, probe = nn.LSTM(2, 3, num_layers=2, batch_first=True), _probe()
    d = 5 if arch == "gru_sequence_first" else 12
    monitor = SpectrumMonitor(probe, every=1, k=2, warmup=4, sv_steps=10, quantiles=(0.25, 0.75))
    monitor.step(rnn, 0)
    ref = spectra(rnn, probe, k=2, warmup=4, generator=torch.Generator().manual_seed(0))
    ds = monitor.dataset()
    np.testing.assert_array_equal(ds.lyapunov_exponents[0].values, ref.lyapunov_exponents.values)
    sv = ref.singular_values.values[:, 4:14].reshape(-1, d)
    np.testing.assert_allclose(ds.singular_values_q25[0].values, np.quantile(sv, 0.25, axis=0), rtol=1e-6)
    assert "steps t = 5..14" in ds.singular_values_q75.attrs["long_name"] and ds.attrs["monitor_sv_steps"] == 10
    with pytest.raises(ValueError, match="sv_steps must be None"):
        SpectrumMonitor(probe, sv_steps=0)


def test_keep_singular_values_and_device_dtype_of_the_model():
    model = Net().double()
    monitor = SpectrumMonitor(_probe(), every=1, k=2, keep_singular_values=True, quantiles=(0.5,))
    monitor.step(model, 0)
    monitor.step(model, 1)
    ds = monitor.dataset()
    validate(ds)
    assert ds.singular_values.dims == ("checkpoint", "batch", "time", "sv_index") and ds.attrs["dtype"] == "float64"
    assert "singular_values" in rnnjac.plot.available(ds)


def test_options_are_checked():
    with pytest.raises(ValueError, match="every must be an integer >= 1; got 0"):
        SpectrumMonitor(_probe(), every=0)
    with pytest.raises(ValueError, match="k must be None or an integer >= 1"):
        SpectrumMonitor(_probe(), k=0)
    with pytest.raises(ValueError, match="quantiles must be distinct numbers in"):
        SpectrumMonitor(_probe(), quantiles=(0.5, 1.5))
    with pytest.raises(TypeError, match="callback must be callable"):
        SpectrumMonitor(_probe(), callback=3)
    monitor = SpectrumMonitor(_probe())
    with pytest.raises(ValueError, match="no measurement yet"):
        monitor.dataset()
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        monitor.step(nn.GRU(2, 3), -1)
    with pytest.raises(ValueError, match="holds 2 recurrent submodules"):
        monitor.step(nn.Sequential(nn.GRU(2, 3), nn.GRU(3, 3)), 0)
