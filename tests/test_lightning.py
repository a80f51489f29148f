"""SpectrumCallback in a real Lightning Trainer.fit (CSV logger), and the import without Lightning.

Needs the extra: pip install -e ".[test,lightning]".
"""

import csv
import importlib
import sys

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import rnnjac
from rnnjac._datasets import validate
from rnnjac.lightning import SpectrumCallback


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(2, 3)
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.readout = nn.Linear(5, 1)

    def forward(self, x):
        return self.readout(self.gru(self.encoder(x))[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x) - y).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 20, 2, generator=g)
    data = torch.utils.data.TensorDataset(x, x.cumsum(1)[..., :1] * 0.1)
    return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(tmp_path, callback, **kwargs):
    return L.Trainer(
        max_steps=30,
        logger=CSVLogger(tmp_path),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=2,
        **kwargs,
    )


@pytest.mark.slow
def test_trainer_fit_logs_to_csv_and_saves_the_dataset(tmp_path):
    probe = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(2))
    out = tmp_path / "spectra.nc"
    cb = SpectrumCallback(probe, every=10, k=3, warmup=5, save_to=out)
    trainer = _trainer(tmp_path, cb)
    model = TinyModule()
    trainer.fit(model, _loader())
    assert trainer.global_step == 30 and model.training  # the module's mode is given back
    ds = rnnjac.open_dataset(out)
    validate(ds)
    assert ds.training_step.values.tolist() == [0, 10, 20, 30] and ds.attrs["submodule"] == "gru"
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [f"rnnjac/lyapunov_exponent_{i}" for i in (1, 2, 3)] + ["rnnjac/kaplan_yorke_dimension"]
    assert set(names) <= set(rows[0]) and "train_loss" in rows[0]
    logged = {int(r["step"]): r for r in rows if r["rnnjac/lyapunov_exponent_1"]}
    assert sorted(logged) == [0, 10, 20, 30]
    for i, step in enumerate([0, 10, 20, 30]):
        median = ds.lyapunov_exponents[i].median("batch").values
        np.testing.assert_allclose([float(logged[step][n]) for n in names[:3]], median, rtol=1e-6)
        assert float(logged[step]["rnnjac/max_singular_value_q50"]) == pytest.approx(
            float(ds.singular_values_q50[i, 0]), rel=1e-6
        )


def test_existing_output_stops_the_fit_before_training(tmp_path):
    out = tmp_path / "spectra.nc"
    out.write_bytes(b"not mine")
    cb = SpectrumCallback(torch.randn(1, 10, 2), every=10, save_to=out)
    trainer = _trainer(tmp_path, cb)
    with pytest.raises((FileExistsError, ValueError), match="overwrite=True|not.*rnnjac"):
        trainer.fit(TinyModule(), _loader())
    assert trainer.global_step == 0 and cb.monitor.steps == [] and out.read_bytes() == b"not mine"


def test_a_figure_name_for_save_to_stops_the_fit_before_training(tmp_path):
    """``save_to`` is a Dataset: a figure suffix is refused at the start of the fit, not after the training."""
    cb = SpectrumCallback(torch.randn(1, 10, 2), every=10, save_to=tmp_path / "spectra.png")
    trainer = _trainer(tmp_path, cb)
    with pytest.raises(ValueError, match=r"spectra.png must end in \.nc or \.zarr; got \.png"):
        trainer.fit(TinyModule(), _loader())
    assert trainer.global_step == 0 and cb.monitor.steps == []


def test_import_without_lightning_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # what an uninstalled package looks like to import
    monkeypatch.delitem(sys.modules, "rnnjac.lightning")
    with pytest.raises(ImportError, match=r"pip install 'rnnjac\[lightning\]'"):
        importlib.import_module("rnnjac.lightning")
