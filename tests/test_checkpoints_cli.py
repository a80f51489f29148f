"""Checkpoints and the command line: formats round-trip, safety, one-line errors, atomic outputs."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import rnnjac
from rnnjac.cli import main

MARKER_ENV = "RNNJAC_TEST_MARKER"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.rnn = nn.LSTM(3, 6, num_layers=2, proj_size=2)
        self.head = nn.Linear(2, 1)


def _same_outputs(a: nn.Module, b: nn.Module, input_size: int):
    x = torch.randn(2, 7, input_size, dtype=next(a.parameters()).dtype)
    xa = x if getattr(a, "batch_first", True) else x.transpose(0, 1)
    out_a, _ = a(xa)
    out_b, _ = b(x)
    out_a = out_a if getattr(a, "batch_first", True) else out_a.transpose(0, 1)
    torch.testing.assert_close(out_b, out_a)


MODULES = {
    "rnn_relu": lambda: nn.RNN(3, 5, nonlinearity="relu", num_layers=2),
    "gru_nobias": lambda: nn.GRU(3, 5, bias=False),
    "lstm_proj": lambda: nn.LSTM(3, 6, num_layers=2, proj_size=2, batch_first=True),
}


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("fmt", ["state_dict", "model_state_dict", "lightning", "safetensors", "module_unsafe"])
def test_every_format_round_trips(tmp_path, name, fmt):
    torch.manual_seed(0)
    m = MODULES[name]()
    sd = m.state_dict()
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.pt")
    if fmt == "state_dict":
        torch.save(sd, path)
    elif fmt == "model_state_dict":
        torch.save({"model_state_dict": sd, "epoch": 3, "optimizer_state_dict": {}}, path)
    elif fmt == "lightning":
        torch.save({"state_dict": {f"model.rnn.{k}": v for k, v in sd.items()}, "global_step": 1200}, path)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"nonlinearity": "relu"})
    else:
        torch.save(m, path)
    kw = {"unsafe": True} if fmt == "module_unsafe" else {}
    if name == "rnn_relu" and fmt in ("state_dict", "model_state_dict", "lightning"):
        kw["nonlinearity"] = "relu"
    loaded = rnnjac.load_checkpoint(path, **kw)
    _same_outputs(m, loaded, 3)
    info = loaded.rnnjac_info
    if fmt == "lightning":
        assert info["prefix"] == "model.rnn." and info["training_step"] == 1200
    if fmt == "model_state_dict":
        assert info["training_step"] == 3


def test_nonlinearity_cannot_be_inferred_and_is_recorded(tmp_path, capsys):
    # issue 11: an nn.RNN without a recorded nonlinearity is no longer assumed tanh; it must be given
    torch.save(nn.RNN(2, 3, nonlinearity="relu").state_dict(), tmp_path / "r.pt")
    with pytest.raises(rnnjac._checkpoints.CheckpointError, match="nonlinearity='tanh' or nonlinearity='relu'"):
        rnnjac.load_checkpoint(tmp_path / "r.pt")
    m = rnnjac.load_checkpoint(tmp_path / "r.pt", nonlinearity="relu")
    assert m.nonlinearity == "relu" and m.rnnjac_info["nonlinearity_source"] == "given"
    out = tmp_path / "s.nc"
    assert main(["analyze", str(tmp_path / "r.pt"), "--out", str(out), "--steps", "5", "--quiet"]) == 2
    assert "cannot be inferred from its weights" in capsys.readouterr().err
    assert not out.exists()
    args = ["analyze", str(tmp_path / "r.pt"), "--nonlinearity", "relu", "--out", str(out), "--steps", "5", "--quiet"]
    assert main(args) == 0
    ds = rnnjac.open_dataset(out)
    assert ds.attrs["nonlinearity"] == "relu" and ds.attrs["nonlinearity_source"] == "given"


def test_cells_and_larger_models(tmp_path):
    torch.manual_seed(0)
    net = Net()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    loaded = rnnjac.load_checkpoint(tmp_path / "net.pt")
    assert loaded.rnnjac_info["prefix"] == "rnn." and loaded.proj_size == 2
    cell = nn.GRUCell(3, 4)
    torch.save(cell.state_dict(), tmp_path / "cell.pt")
    c = rnnjac.load_checkpoint(tmp_path / "cell.pt")
    assert isinstance(c, nn.GRUCell)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    torch.testing.assert_close(c(x, h), cell(x, h))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain_pickle"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch, fmt):
    marker = tmp_path / "pwned"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    path = tmp_path / "evil.pt"
    obj = {"state_dict": nn.GRU(2, 3).state_dict(), "payload": Evil()}
    if fmt == "plain_pickle":  # issue 11: torch.load cannot read it even unsafely, so no unsafe advice
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(ValueError, match="not a readable checkpoint") as err:
            rnnjac.load_checkpoint(path, unsafe=True)
        assert "unsafe" not in str(err.value)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
        with pytest.raises(ValueError, match=r"refers to posix\.system.*unsafe=True"):
            rnnjac.load_checkpoint(path)
    assert not marker.exists()
    assert main(["info", str(path)]) == 2
    assert not marker.exists()


def test_errors_list_choices(tmp_path):
    torch.save(
        {
            "a.weight_hh_l0": torch.zeros(3, 3),
            "a.weight_ih_l0": torch.zeros(3, 2),
            "b.weight_hh_l0": torch.zeros(12, 3),
            "b.weight_ih_l0": torch.zeros(12, 2),
        },
        tmp_path / "two.pt",
    )
    with pytest.raises(ValueError, match="several recurrent modules: 'a.', 'b.'"):
        rnnjac.load_checkpoint(tmp_path / "two.pt")
    assert isinstance(rnnjac.load_checkpoint(tmp_path / "two.pt", prefix="b."), nn.LSTM)
    with pytest.raises(ValueError, match="prefix 'c.' not in"):
        rnnjac.load_checkpoint(tmp_path / "two.pt", prefix="c.")
    with pytest.raises(ValueError, match="arch='gru' but the weight shapes are those of 'rnn'"):
        rnnjac.load_checkpoint(tmp_path / "two.pt", prefix="a.", arch="gru")
    torch.save(nn.GRU(2, 3, bidirectional=True).state_dict(), tmp_path / "bi.pt")
    with pytest.raises(ValueError, match="bidirectional"):
        rnnjac.load_checkpoint(tmp_path / "bi.pt")


# ----------------------------------------------------------------------------- command line
@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gru.pt"
    torch.save({"model_state_dict": nn.GRU(3, 6, num_layers=2).state_dict(), "step": 7}, path)
    return path


def test_analyze_writes_spectra_with_provenance(tmp_path, ckpt):
    out = tmp_path / "s.nc"
    argv = [
        "analyze",
        str(ckpt),
        "--out",
        str(out),
        "--steps",
        "30",
        "--batch",
        "3",
        "--k",
        "4",
        "--warmup",
        "5",
        "--eigenvalues",
        "--end-to-end",
        "--local",
        "--quiet",
        "--dtype",
        "float64",
    ]
    assert main(argv) == 0
    ds = rnnjac.open_dataset(out)
    rnnjac._datasets.validate(ds)
    assert ds.sizes == {"batch": 3, "time": 30, "sv_index": 12, "le_index": 4, "eig_index": 12, "bound": 2}
    assert ds.attrs["checkpoint_sha256"] == rnnjac._checkpoints.sha256(ckpt)
    assert ds.attrs["command"].startswith("rnnjac analyze") and ds.attrs["training_step"] == 7
    # same numbers as the Python API on the same inputs
    x = torch.randn(3, 30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = rnnjac.spectra(
        rnnjac.load_checkpoint(ckpt), x, k=4, warmup=5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(ds.lyapunov_exponents.values, ref.lyapunov_exponents.values, rtol=1e-12)


def test_inputs_files(tmp_path, ckpt):
    x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", trials=x, other=x)
    torch.save({"inputs": torch.from_numpy(x.transpose(1, 0, 2).copy())}, tmp_path / "x.pt")
    outs = []
    for i, extra in enumerate(
        [
            ["--inputs", str(tmp_path / "x.npy")],
            ["--inputs", str(tmp_path / "x.npz"), "--inputs-key", "trials"],
            ["--inputs", str(tmp_path / "x.pt"), "--time-major"],
        ]
    ):
        out = tmp_path / f"s{i}.nc"
        assert main(["analyze", str(ckpt), "--out", str(out), "--quiet", *extra]) == 0
        outs.append(rnnjac.open_dataset(out).singular_values.values)
    np.testing.assert_allclose(outs[1], outs[0])
    np.testing.assert_allclose(outs[2], outs[0])


BAD = {
    "missing file": (["analyze", "nope.pt", "--out", "{o}"], "does not exist"),
    "not a checkpoint": (["analyze", "{junk}", "--out", "{o}"], "not a PyTorch checkpoint"),
    "no rnn inside": (["analyze", "{linear}", "--out", "{o}"], "no recurrent weights"),
    "several rnns": (["analyze", "{two}", "--out", "{o}"], "several recurrent modules"),
    "feature size": (["analyze", "{ckpt}", "--out", "{o}", "--inputs", "{x5}"], "5 features"),
    "non-finite inputs": (["analyze", "{ckpt}", "--out", "{o}", "--inputs", "{xnan}"], "NaN/Inf, first at step t=4"),
    "output exists": (["analyze", "{ckpt}", "--out", "{exists}"], "already exists"),
    "out folder is a file": (["analyze", "{ckpt}", "--out", "{junk}/s.nc"], "is not a folder"),
    "no out folder": (["analyze", "{ckpt}", "--out", "{o}/s.nc"], "does not exist"),
    "k too big": (["analyze", "{ckpt}", "--out", "{o}", "--num-exponents", "99"], "--num-exponents must be an integer"),
    "k too big, old name": (["analyze", "{ckpt}", "--out", "{o}", "--k", "99"], "--num-exponents must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, ckpt, capsys, case):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    torch.save(
        {
            "a.weight_hh_l0": torch.zeros(3, 3),
            "a.weight_ih_l0": torch.zeros(3, 3),
            "b.weight_hh_l0": torch.zeros(3, 3),
            "b.weight_ih_l0": torch.zeros(3, 3),
        },
        tmp_path / "two.pt",
    )
    np.save(tmp_path / "x5.npy", np.zeros((2, 4, 5), np.float32))
    xnan = np.zeros((2, 6, 3), np.float32)
    xnan[1, 3, 2] = np.nan
    np.save(tmp_path / "xnan.npy", xnan)
    (tmp_path / "exists.nc").write_bytes(b"keep me")
    subs = {
        "o": tmp_path / "out.nc",
        "junk": tmp_path / "junk.pt",
        "linear": tmp_path / "linear.pt",
        "two": tmp_path / "two.pt",
        "ckpt": ckpt,
        "x5": tmp_path / "x5.npy",
        "xnan": tmp_path / "xnan.npy",
        "exists": tmp_path / "exists.nc",
    }
    argv, message = BAD[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(**subs) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rnnjac: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.nc").read_bytes() == b"keep me"


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["analyze", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.nc"), "--debug"])


def test_verify_command(tmp_path, ckpt, capsys):
    assert main(["verify", str(ckpt), "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max abs err" in out
    assert main(["verify", str(ckpt), "--dtype", "float64", "--directions", "2", "--out", str(tmp_path / "v.nc")]) == 0
    assert rnnjac.open_dataset(tmp_path / "v.nc").attrs["mode"] == "directional"
    # a deliberately impossible tolerance fails with exit status 1 and names the worst entry
    assert main(["verify", str(ckpt), "--dtype", "float64", "--rtol", "0", "--atol", "1e-18"]) == 1
    assert "worst entry: sample" in capsys.readouterr().out


@pytest.mark.slow
def test_info_and_plot(tmp_path, ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "arch: gru" in out and "num_layers: 2" in out and "training_step: 7" in out
    s = tmp_path / "s.nc"
    main(
        ["analyze", str(ckpt), "--out", str(s), "--steps", "20", "--eigenvalues", "--end-to-end", "--local", "--quiet"]
    )
    assert main(["info", str(s)]) == 0
    assert "lyapunov_exponents" in capsys.readouterr().out
    figs = tmp_path / "figs"
    figs.mkdir()
    assert main(["plot", str(s), "--out", str(figs)]) == 0
    names = sorted(p.name for p in figs.iterdir())
    assert "s_summary.png" in names and len(names) == 7
    assert all((figs / n).stat().st_size > 5000 for n in names)
    assert main(["plot", str(s), "--out", str(figs)]) == 2  # exists without --overwrite
    assert main(["plot", str(s), "--out", str(figs), "--format", "svg"]) == 0


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("analyze", "verify", "plot", "info", "demo"):
        assert cmd in out
    for cmd in ("analyze", "verify", "plot", "info", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: rnnjac " + cmd in capsys.readouterr().out


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "done in" in out
    assert (tmp_path / "d" / "spectra.nc").exists() and (tmp_path / "d" / "summary.png").exists()
    bundled = Path(rnnjac.__file__).parent / "data" / "flipflop_gru.safetensors"
    digest = hashlib.sha256(bundled.read_bytes()).hexdigest()
    assert rnnjac.open_dataset(tmp_path / "d" / "spectra.nc").attrs["checkpoint_sha256"] == digest
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2  # refused at once: every output checked first
    assert "already exists; use --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == names


@pytest.mark.slow
def test_console_script_and_python_m(tmp_path, ckpt):
    for cmd in (["rnnjac"], [sys.executable, "-m", "rnnjac"]):
        r = subprocess.run([*cmd, "info", str(ckpt)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "arch: gru" in r.stdout
    r = subprocess.run(["rnnjac", "info", str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_sigint_leaves_no_partial_output(tmp_path, ckpt):
    """Ctrl-C once the analysis runs (its progress bar has started: a fixed sleep raced the start-up on a loaded
    machine, where importing torch alone can take longer): exit 130, one line, nothing written."""
    out = tmp_path / "s.nc"
    proc = subprocess.Popen(
        ["rnnjac", "analyze", str(ckpt), "--out", str(out), "--steps", "200000", "--batch", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = bytearray()

    def until_the_bar():  # a warning at start-up is not the bar: wait for tqdm's "%|"
        while b"%|" not in seen and (byte := proc.stderr.read(1)):
            seen.extend(byte)

    try:
        reader = threading.Thread(target=until_the_bar, daemon=True)
        reader.start()
        reader.join(timeout=180)
        assert b"%|" in seen, f"no progress bar within 180 s: {bytes(seen)!r}"
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:  # never leave a 200,000-step analysis running behind a failed test
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = (bytes(seen) + rest).decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt"]
