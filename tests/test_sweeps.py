"""Sweeps: same numbers as single analyses (sync and a 2-worker LocalCluster), resumable after a kill."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
from rnnjac.pipeline import InputSpec, SpectraOptions, analyze_checkpoint

INPUTS = InputSpec(batch=2, steps=25, seed=3)
OPTIONS = SpectraOptions(k=3, warmup=2, eigenvalues=True, dtype="float64", seed=3)  # the CLI uses --seed for both


@pytest.fixture
def checkpoints(tmp_path):
    paths = []
    for step in (300, 100, 200, 400):
        torch.manual_seed(step)
        path = tmp_path / f"run_step{step}.pt"
        torch.save({"state_dict": nn.GRU(2, 5, num_layers=2).state_dict()}, path)
        paths.append(path)
    return paths


def _check_against_single(ds, paths):
    assert list(ds.training_step.values) == [100, 200, 300, 400]
    for p in paths:
        alone = analyze_checkpoint(p, INPUTS, OPTIONS)
        row = ds.sel(checkpoint=str(p))
        for name in ("lyapunov_exponents", "singular_values", "eigenvalues_real"):
            np.testing.assert_allclose(row[name].values, alone[name].values, rtol=1e-12, atol=1e-14)
        assert row.checkpoint_sha256.item() == rnnjac.checkpoints.sha256(p)


def test_sync_sweep_equals_single_analyses(tmp_path, checkpoints):
    out = tmp_path / "sweep.nc"
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    _check_against_single(ds, checkpoints)
    back = rnnjac.open_dataset(out)
    _check_against_single(back, checkpoints)
    rnnjac.datasets.validate(back)
    assert not (tmp_path / "sweep.nc.parts").exists()


@pytest.mark.slow
def test_local_cluster_two_workers(tmp_path, checkpoints):
    out = tmp_path / "sweep.zarr"
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out, workers=2)
    _check_against_single(ds, checkpoints)
    back = rnnjac.open_dataset(out)
    _check_against_single(back, checkpoints)


def test_rerun_extends_without_recomputing(tmp_path, checkpoints, monkeypatch):
    out = tmp_path / "sweep.nc"
    rnnjac.analyze_checkpoints(checkpoints[:2], inputs=INPUTS, options=OPTIONS, out=out)
    calls = []
    import rnnjac.sweeps as sweeps

    real = sweeps.analyze_checkpoint
    monkeypatch.setattr(sweeps, "analyze_checkpoint", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    assert sorted(calls) == sorted(str(p) for p in checkpoints[2:])
    _check_against_single(ds, checkpoints)
    with pytest.raises(FileExistsError, match="another configuration"):
        rnnjac.analyze_checkpoints(checkpoints, inputs=InputSpec(batch=3), options=OPTIONS, out=out)


def test_killed_sweep_resumes(tmp_path, checkpoints):
    out = tmp_path / "sweep.nc"
    cmd = [
        "rnnjac",
        "analyze",
        *map(str, checkpoints),
        "--out",
        str(out),
        "--batch",
        "2",
        "--steps",
        "25",
        "--seed",
        "3",
        "--k",
        "3",
        "--warmup",
        "2",
        "--eigenvalues",
        "--dtype",
        "float64",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "sweep.nc.parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.nc"))) < 2:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.nc")}
    assert 1 <= len(finished) < 4 and not out.exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = rnnjac.open_dataset(out)
    _check_against_single(ds, checkpoints)
    assert not parts.exists()


def test_sweep_errors(tmp_path, checkpoints):
    torch.save(nn.LSTM(2, 5).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="one architecture and size"):
        rnnjac.analyze_checkpoints([*checkpoints, tmp_path / "other.pt"], inputs=INPUTS, options=OPTIONS)
    with pytest.raises(FileNotFoundError):
        rnnjac.analyze_checkpoints([tmp_path / "nope.pt"])
    from rnnjac.cli import main

    assert main(["analyze", str(tmp_path / "run_*.pt"), "--out", str(tmp_path / "missing" / "s.nc"), "--quiet"]) == 2
