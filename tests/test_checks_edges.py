"""Issue 11 edges of input checking and checkpoint loading: no silent wrong answers, errors that say
what to do, checkpoint hygiene, and every public function under ``no_grad`` / ``inference_mode``."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from problems import SMALL, ids
from safetensors.torch import save_file
from torch import nn

import rnnjac
from rnnjac import regularizers
from rnnjac._checkpoints import CheckpointError, inspect_checkpoint
from rnnjac.cli import main
from rnnjac.errors import NonFiniteError

# ----------------------------------------------------------------------------------------- errors module


def test_errors_module_is_the_single_home_of_the_exceptions():
    import rnnjac._checkpoints as ckpts
    import rnnjac._checks as checks
    import rnnjac.errors as errors

    assert checks.NonFiniteError is errors.NonFiniteError and checks.RnnjacWarning is errors.RnnjacWarning
    assert ckpts.CheckpointError is errors.CheckpointError
    assert rnnjac.NonFiniteError is errors.NonFiniteError and rnnjac.RnnjacWarning is errors.RnnjacWarning
    assert issubclass(errors.CheckpointError, ValueError) and issubclass(errors.NonFiniteError, ValueError)
    assert issubclass(errors.RnnjacWarning, UserWarning)
    for cls in (errors.CheckpointError, errors.NonFiniteError, errors.RnnjacWarning):
        assert "Examples" in cls.__doc__


# ----------------------------------------------------------------------------------------- nonlinearity


def _relu_rnn(cell: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.RNNCell(3, 6, nonlinearity="relu") if cell else nn.RNN(3, 6, nonlinearity="relu", num_layers=2)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # relu and tanh differ visibly
    return m


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "cell"])
def test_rnn_without_recorded_nonlinearity_must_be_given(tmp_path, fmt):
    m = _relu_rnn(cell=fmt == "cell")
    path = tmp_path / ("r.safetensors" if fmt == "safetensors" else "r.pt")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    else:
        torch.save(m.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"cannot be inferred from its weights.*nonlinearity='tanh' or "):
        rnnjac.load_checkpoint(path)
    info = inspect_checkpoint(path)  # rnnjac info must still work
    assert info["arch"] == "rnn" and info["nonlinearity"] == "unknown" and "not recorded" in info["nonlinearity_source"]
    loaded = rnnjac.load_checkpoint(path, nonlinearity="relu")
    assert loaded.nonlinearity == "relu" and loaded.rnnjac_info["nonlinearity_source"] == "given"
    x = torch.randn(2, 7, 3)
    if fmt == "cell":
        h = torch.randn(2, 6)
        torch.testing.assert_close(loaded(x[:, 0], h), m(x[:, 0], h))
    else:
        torch.testing.assert_close(loaded(x)[0], m(x.transpose(0, 1))[0].transpose(0, 1))
        # the relu model's exponents, not those of a tanh model with the same weights
        g = torch.Generator().manual_seed(0)
        want = rnnjac.lyapunov_spectrum(m, x.transpose(0, 1), k=3, generator=g).lyapunov_exponents
        got = rnnjac.lyapunov_spectrum(loaded, x, k=3, generator=g.manual_seed(0)).lyapunov_exponents
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5)


def test_recorded_nonlinearity_is_used_and_a_contradiction_is_an_error(tmp_path):
    m = _relu_rnn()
    torch.save({"state_dict": m.state_dict(), "nonlinearity": "relu"}, tmp_path / "r.pt")
    loaded = rnnjac.load_checkpoint(tmp_path / "r.pt")
    assert loaded.nonlinearity == "relu" and loaded.rnnjac_info["nonlinearity_source"] == "checkpoint metadata"
    with pytest.raises(CheckpointError, match="nonlinearity='tanh' but .* records nonlinearity 'relu'"):
        rnnjac.load_checkpoint(tmp_path / "r.pt", nonlinearity="tanh")


@pytest.mark.parametrize("module,name", [(nn.GRU(3, 4), "GRU"), (nn.LSTM(3, 4), "LSTM"), (nn.GRUCell(3, 4), "GRU")])
def test_nonlinearity_for_gru_or_lstm_is_an_error(tmp_path, module, name):
    torch.save(module.state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=f"nonlinearity= applies to nn.RNN only; this checkpoint is a {name}"):
        rnnjac.load_checkpoint(tmp_path / "m.pt", nonlinearity="relu")
    assert rnnjac.load_checkpoint(tmp_path / "m.pt").rnnjac_info["nonlinearity"] == ""


def test_cli_verify_of_unrecorded_rnn_errors_instead_of_passing_tanh(tmp_path, capsys):
    torch.save(_relu_rnn().state_dict(), tmp_path / "r.pt")
    assert main(["verify", str(tmp_path / "r.pt")]) == 2
    err = capsys.readouterr()
    assert "nonlinearity" in err.err and "PASS" not in err.out
    assert main(["info", str(tmp_path / "r.pt")]) == 0
    assert "nonlinearity: unknown" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- checkpoint hygiene


@pytest.fixture
def alarm():
    """Fail instead of hanging forever if a FIFO is opened."""

    def boom(*_):
        raise TimeoutError("blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fifo_is_refused_without_opening(tmp_path, alarm, suffix):
    fifo = tmp_path / f"x{suffix}"
    os.mkfifo(fifo)
    for fn in (rnnjac.load_checkpoint, inspect_checkpoint, rnnjac._checkpoints.sha256):
        with pytest.raises(CheckpointError, match="FIFO .*regular file"):
            fn(fifo)
    assert main(["info", str(fifo)]) == 2


def test_symlink_to_a_checkpoint_is_fine(tmp_path):
    torch.save(nn.GRU(2, 3).state_dict(), tmp_path / "a.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    assert isinstance(rnnjac.load_checkpoint(tmp_path / "b.pt"), nn.GRU)


def _corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    torch.save(nn.GRU(2, 3).state_dict(), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    return {
        "pickle_noise": b"\x80" + noise,
        "pickle_proto2_noise": b"\x80\x02" + noise,
        "pk_noise": b"PK" + noise,
        "zip_header_noise": b"PK\x03\x04" + noise,
        "truncated_zip": good[: len(good) // 2],
        "truncated_pickle": b"\x80\x02}q\x00(X\x01\x00\x00\x00aq",
    }


@pytest.mark.parametrize("unsafe", [False, True])
def test_corrupt_file_is_not_readable_without_unsafe_advice_or_torch_warnings(tmp_path, unsafe):
    for name, data in _corrupt_files(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError) as err:
                rnnjac.load_checkpoint(path, unsafe=unsafe)
        msg = str(err.value)
        assert msg.startswith(f"{path} is not a readable checkpoint ("), (name, msg)
        assert "unsafe" not in msg and "file an issue" not in msg.lower(), (name, msg)
        assert not [w for w in caught if "issue" in str(w.message)], (name, [str(w.message) for w in caught])


def test_pickled_module_gets_the_unsafe_advice_naming_its_class(tmp_path):
    torch.save(nn.GRU(2, 3), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"refers to torch\.nn\.modules\.rnn\.GRU.*unsafe=True only if you trust"):
        rnnjac.load_checkpoint(tmp_path / "m.pt")
    assert isinstance(rnnjac.load_checkpoint(tmp_path / "m.pt", unsafe=True), nn.GRU)


class Gone(nn.Module):
    """A model class that disappears after saving (as when the script that defined it is not importable)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(2, 3)


@pytest.mark.parametrize("how", ["module_missing", "attribute_missing"])
def test_unsafe_pickle_whose_class_cannot_be_imported(tmp_path, monkeypatch, how):
    if how == "module_missing":
        pkg = tmp_path / "pkg"
        pkg.mkdir()
        (pkg / "rnnjac_test_models.py").write_text(
            "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
            "        super().__init__()\n        self.rnn = torch.nn.GRU(2, 3)\n"
        )
        monkeypatch.syspath_prepend(str(pkg))
        mod = importlib.import_module("rnnjac_test_models")
        torch.save(mod.Net(), tmp_path / "m.pt")
        monkeypatch.delitem(sys.modules, "rnnjac_test_models")
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])
        qualname = "rnnjac_test_models.Net"
    else:
        torch.save(Gone(), tmp_path / "m.pt")
        monkeypatch.delattr(sys.modules[__name__], "Gone")
        qualname = f"{__name__}.Gone"
    with pytest.raises(CheckpointError) as err:
        rnnjac.load_checkpoint(tmp_path / "m.pt", unsafe=True)
    msg = str(err.value)
    assert f"needs the class {qualname}, which cannot be imported here" in msg and "PYTHONPATH" in msg


def test_library_errors_name_keywords_not_cli_flags(tmp_path):
    sd = {f"{p}.{k}": v for p in ("a", "b") for k, v in nn.GRU(2, 3).state_dict().items()}
    torch.save(sd, tmp_path / "two.pt")
    with pytest.raises(CheckpointError) as err:
        rnnjac.load_checkpoint(tmp_path / "two.pt")
    assert "prefix=" in str(err.value) and "--" not in str(err.value).replace(str(tmp_path), "")
    torch.save(nn.GRU(2, 3), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as err:
        rnnjac.load_checkpoint(tmp_path / "m.pt")
    assert "unsafe=True" in str(err.value) and "--unsafe" not in str(err.value)


# ----------------------------------------------------------------------------------------- input checks

W64 = torch.tensor([[0.9, -0.4, 0.2], [0.3, 0.8, -0.5], [-0.6, 0.1, 0.7]], dtype=torch.float64)


def _step(s, x):
    return torch.tanh(s @ W64.T + x)


def _jac(s, x):
    return (1 - _step(s, x) ** 2).unsqueeze(-1) * W64


def _nan_models():
    lstm = nn.LSTM(3, 4, num_layers=2)
    cell = nn.GRUCell(3, 4)
    w = W64.clone()
    with torch.no_grad():
        lstm.weight_hh_l1[0, 0] = float("nan")
        lstm.weight_hh_l1[1, 2] = float("inf")
        cell.bias_ih[3] = float("nan")
    w[1, 1] = float("nan")
    custom = rnnjac.CustomCell(lambda s, x: torch.tanh(s @ w.T + x), parameters=[W64, w])
    return [
        (lstm, torch.randn(5, 2, 3), None, r"weight_hh_l1 \(2 of 64 entries, shape \(16, 4\)\)"),
        (cell, torch.randn(2, 5, 3), None, r"bias_ih \(1 of 12 entries"),
        (custom, torch.randn(2, 5, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), r"parameters\[1\]"),
    ]


def test_nan_weights_are_named():
    for model, x, h0, pattern in _nan_models():
        for fn in (rnnjac.trajectory, rnnjac.spectra):
            with pytest.raises(NonFiniteError, match="weights contain NaN or Inf: " + pattern):
                fn(model, x, h0)


def _all_public(model, x, h0):
    return {
        "trajectory": lambda: rnnjac.trajectory(model, x, h0),
        "jacobians": lambda: rnnjac.jacobians(model, x, h0),
        "jacobians_autograd": lambda: rnnjac.jacobians(model, x, h0, method="autograd"),
        "iter_jacobians_autograd": lambda: list(rnnjac.iter_jacobians(model, x, h0, method="autograd")),
        "iter_jacobians": lambda: list(rnnjac.iter_jacobians(model, x, h0, time_chunk=2)),
        "verify": lambda: rnnjac.verify(model, x, h0),
        "verify_directions": lambda: rnnjac.verify(model, x, h0, directions=2, generator=torch.Generator()),
        "spectra": lambda: rnnjac.spectra(model, x, h0, k=2, eigenvalues=True, generator=torch.Generator()),
        "lyapunov_spectrum": lambda: rnnjac.lyapunov_spectrum(model, x, h0, k=2, generator=torch.Generator()),
        "finite_difference_jacobians": lambda: rnnjac.finite_difference_jacobians(model, x, h0),
        "frobenius": lambda: regularizers.jacobian_penalty(model, x, h0),
        "frobenius_projection": lambda: regularizers.jacobian_penalty(
            model, x, h0, estimator="projection", generator=torch.Generator().manual_seed(1)
        ),
        "spectral": lambda: regularizers.jacobian_penalty(
            model, x, h0, kind="spectral", generator=torch.Generator().manual_seed(1)
        ),
        "end_to_end": lambda: regularizers.jacobian_penalty(model, x, h0, kind="end_to_end"),
        "end_to_end_projection": lambda: regularizers.jacobian_penalty(
            model, x, h0, kind="end_to_end", estimator="projection", generator=torch.Generator().manual_seed(1)
        ),
        "lyapunov_penalty": lambda: regularizers.lyapunov_penalty(
            model, x, h0, k=1, generator=torch.Generator().manual_seed(1)
        ),
    }


@pytest.mark.parametrize("batch_first", [True, False])
def test_empty_batch_is_a_clear_error_everywhere(batch_first):
    gru = nn.GRU(3, 4, batch_first=batch_first)
    x = torch.randn(0, 5, 3) if batch_first else torch.randn(5, 0, 3)
    for name, call in _all_public(gru, x, None).items():
        with pytest.raises(ValueError, match=r"inputs must have at least one sample; got B=0 in shape"):
            call()
        assert name  # every public function reached the check


def test_dtype_cannot_convert_a_custom_step_before_any_work():
    calls = []

    def step(s, x):
        calls.append(1)
        return _step(s.double(), x.double()).to(s.dtype)

    cell = rnnjac.CustomCell(step, parameters=[W64])
    x32, h32 = torch.randn(2, 6, 3), torch.zeros(2, 3)
    with pytest.raises(TypeError) as err:
        rnnjac.lyapunov_spectrum(cell, x32, h32, dtype=torch.float64)
    msg = str(err.value)
    assert "dtype=torch.float64 cannot convert a custom step" in msg and "built-in modules only" in msg
    assert "inputs: torch.float32" in msg and "h0: torch.float32" in msg
    assert "inputs have torch.float64" not in msg  # the old message blamed a conversion the caller never made
    assert calls == []  # raised before any work
    x64, h64 = x32.double(), h32.double()
    g = torch.Generator()
    plain = rnnjac.lyapunov_spectrum(cell, x64, h64, generator=g.manual_seed(0))
    same = rnnjac.lyapunov_spectrum(cell, x64, h64, dtype=torch.float64, device="cpu", generator=g.manual_seed(0))
    xr.testing.assert_identical(plain.lyapunov_exponents, same.lyapunov_exponents)  # matching values: a no-op


def test_dtype_mismatch_messages_say_which_argument_has_which_dtype():
    cell = rnnjac.CustomCell(_step)
    with pytest.raises(TypeError, match=r"h0 has dtype torch.float32 but inputs have dtype torch.float64 \(both as"):
        rnnjac.trajectory(cell, torch.randn(2, 4, 3, dtype=torch.float64), torch.zeros(2, 3))
    declared = rnnjac.CustomCell(_step, parameters=[W64])
    with pytest.raises(TypeError) as err:
        rnnjac.trajectory(declared, torch.randn(2, 4, 3), torch.zeros(2, 3))
    assert "custom cell's parameters are torch.float64" in str(err.value) and "dtype=" not in str(err.value)


def test_cuda_without_cuda_is_a_clear_error_in_python_too(monkeypatch):
    """``device="cuda"`` where CUDA is missing: the ValueError the CLI gives, before any work (it was torch's bare
    AssertionError "Torch not compiled with CUDA enabled" from the conversion)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gru, x = nn.GRU(2, 3, batch_first=True), torch.randn(2, 5, 2)
    calls = (
        lambda: rnnjac.lyapunov_spectrum(gru, x, device="cuda"),
        lambda: rnnjac.spectra(gru, x, device=torch.device("cuda", 0)),
        lambda: rnnjac.fixed_points(gru, torch.zeros(2), device="cuda"),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"device='cuda(:0)?' was asked for but CUDA is not available"):
            call()


def test_a_generator_that_is_not_one_is_refused_before_work():
    """``generator=0`` (a seed where a ``torch.Generator`` goes) was an AttributeError deep in the run."""
    gru, x = nn.GRU(2, 3, batch_first=True), torch.randn(2, 5, 2)
    for call in (
        lambda: rnnjac.lyapunov_spectrum(gru, x, generator=0),
        lambda: rnnjac.spectra(gru, x, generator=1),
        lambda: rnnjac.fixed_points(gru, torch.zeros(2), generator=2),
    ):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None \(e.g. .*\); got int"):
            call()


def test_a_dtype_mismatch_says_what_every_caller_can_do():
    """The hint of a dtype mismatch holds for every function (the penalties and ``jacobians`` take no ``dtype=``; it
    said "or pass dtype=...")."""
    gru, x = nn.GRU(2, 3, batch_first=True), torch.randn(2, 4, 2, dtype=torch.float64)
    for call in (lambda: regularizers.jacobian_penalty(gru, x), lambda: rnnjac.jacobians(gru, x)):
        with pytest.raises(TypeError, match=r"convert one of them \(model.to\(dtype\) or inputs.to\(dtype\); the"):
            call()


def test_a_packed_sequence_is_refused_with_what_to_do():
    """A PackedSequence (variable-length batches) is refused before any work by every entry point that takes
    inputs, with the way to pad it and what padding means for the analysis."""
    gru = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3], batch_first=True)
    calls = (
        lambda: rnnjac.jacobians(gru, packed),
        lambda: regularizers.jacobian_penalty(gru, packed),
        lambda: regularizers.forward_with_states(gru, packed),
        lambda: rnnjac.fixed_points(gru, packed),
    )
    for call in calls:
        with pytest.raises(TypeError, match=r"inputs must be a padded torch.Tensor.*got a PackedSequence.*pad_packed"):
            call()


# ----------------------------------------------------------------------------------------- no_grad / inference_mode


def _custom_models():
    return {
        "custom": (rnnjac.CustomCell(_step, parameters=[W64]), 3),
        "custom_jacobian": (rnnjac.CustomCell(_step, _jac), 3),
        "callable": (_step, 3),
    }


def _values(out):
    if isinstance(out, xr.Dataset):
        return {k: v.values for k, v in out.data_vars.items()} | {"passed": out.attrs.get("passed")}
    if isinstance(out, list):
        return [_values(o) for o in out]
    if isinstance(out, tuple):
        return tuple(_values(o) for o in out)
    return out.detach().clone() if isinstance(out, torch.Tensor) else out


def _assert_same(got, want, where):
    if isinstance(want, dict):
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=where)
    elif isinstance(want, np.ndarray):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=where)
    else:
        assert got == want, where


def _check_all_modes(model, x, h0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in _all_public(model, x, h0).items():
            try:
                want = _values(call())
            except NonFiniteError as err:  # e.g. dead relu units: the same error is expected in every mode
                want = err
            for ctx in (torch.no_grad, torch.inference_mode):
                with ctx():
                    if isinstance(want, Exception):
                        with pytest.raises(NonFiniteError, match=re.escape(str(want))):
                            call()
                        continue
                    got = _values(call())
                _assert_same(got, want, f"{name} under {ctx.__name__}")


@pytest.mark.parametrize("problem", SMALL, ids=ids(SMALL))
def test_every_function_works_under_no_grad_and_inference_mode_modules(problem):
    _check_all_modes(problem.module(), problem.inputs(batch=2, steps=4), None)


@pytest.mark.parametrize("name", ["custom", "custom_jacobian", "callable"])
def test_every_function_works_under_no_grad_and_inference_mode_custom(name):
    model, d = _custom_models()[name]
    x = torch.randn(2, 4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _check_all_modes(model, x, torch.zeros(2, d, dtype=torch.float64))


def test_cells_and_inference_inputs_under_inference_mode():
    cell = nn.LSTMCell(3, 4).double()
    with torch.inference_mode():  # inputs created inside inference mode are inference tensors
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        h0 = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
        j = rnnjac.jacobians(cell, x, h0, method="autograd")
        ja = rnnjac.jacobians(cell, x, h0)
        assert rnnjac.verify(cell, x, h0, directions=2).attrs["passed"] == 1
        pen = regularizers.jacobian_penalty(cell, x, h0, kind="spectral")
        ok = rnnjac.verify(rnnjac.CustomCell(_step, _jac), x, torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(j, ja)
    assert torch.isfinite(pen) and ok.attrs["passed"] == 1
