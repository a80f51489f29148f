"""The commands and options of issues 13 and 15: ``fixed-points``, ``--model``/``--model-kwargs``/``--submodule``,
the warning about ignored weights, ``--threads``; each compared with the Python call it stands for."""

from __future__ import annotations

import math
import os
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
import rnnjac._pipeline
from rnnjac.cli import main


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- fixed-points
W = 2.0  # two uncoupled units s' = tanh(W s): per unit 0 (unstable, slope 2) and +-s* (stable) -> 4 stable, 5 saddles


@pytest.fixture
def tanh_unit(tmp_path):
    rnn = nn.RNN(1, 2, bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(W * torch.eye(2))
        rnn.weight_ih_l0.zero_()
    path = tmp_path / "unit.pt"
    torch.save({"state_dict": rnn.state_dict(), "nonlinearity": "tanh"}, path)
    return path


def _counts(text: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) stable, (\d+) unstable \(saddles\), (\d+) slow", text)
    assert m, text
    return tuple(int(v) for v in m.groups())


def test_fixed_points_prints_the_counts_of_the_library_and_writes_its_outputs(tmp_path, tanh_unit, capsys):
    out, figs = tmp_path / "fp.nc", tmp_path / "figs"
    argv = ["fixed-points", str(tanh_unit), "--input-value", "0", "--n-initial", "200", "--seed", "3"]
    assert main([*argv, "-o", str(out), "--plot-dir", str(figs)]) == 0
    printed = capsys.readouterr().out
    assert _counts(printed) == (4, 5, 0)
    assert "spectral radius" in printed  # the table
    # the same search in Python: the same counts and points
    unit = rnnjac.load_checkpoint(tanh_unit)
    ref = rnnjac.fixed_points(unit, torch.zeros(1), n_initial=200, generator=torch.Generator().manual_seed(3))
    fixed = ref.is_fixed_point.values.astype(bool)
    stable = ref.stable.values.astype(bool)
    assert _counts(printed) == (int((fixed & stable).sum()), int((fixed & ~stable).sum()), int((~fixed).sum()))
    ds = rnnjac.open_dataset(out)
    s_star = np.sort(ds.fixed_point_states.values.ravel())
    np.testing.assert_allclose(s_star, np.sort(ref.fixed_point_states.values.ravel()), atol=1e-12)
    np.testing.assert_allclose(s_star[-1], np.tanh(W * s_star[-1]), atol=1e-10)  # a root of s = tanh(W s)
    assert ds.attrs["checkpoint_sha256"] and ds.attrs["command"].startswith("rnnjac fixed-points")
    assert sorted(p.name for p in figs.iterdir()) == [
        "fp_fixed_point_eigenvalues.png",
        "fp_fixed_points.png",
        "fp_summary.png",
    ]
    # every output is checked before any work: a rerun without --overwrite changes nothing
    before = out.read_bytes()
    assert main([*argv, "-o", str(out), "--plot-dir", str(figs), "-q"]) == 2
    assert "already exists; use --overwrite" in _err_line(capsys) and out.read_bytes() == before


def test_fixed_points_from_trajectories_and_bad_input(tmp_path, tanh_unit, capsys):
    assert main(["fixed-points", str(tanh_unit), "--from-trajectories", "4", "30", "--n-initial", "50", "-q"]) == 0
    line = capsys.readouterr().out.strip()
    # the input weights are zero: every trajectory stays at the origin, the one point found from its states
    assert len(line.splitlines()) == 1 and _counts(line) == (0, 1, 0)
    assert main(["fixed-points", str(tanh_unit), "--input-value", "0", "0", "0"]) == 2  # wrong input size
    assert "input" in _err_line(capsys)
    assert main(["fixed-points", str(tanh_unit), "--n-initial", "0"]) == 2
    assert "--n-initial" in _err_line(capsys)


# ----------------------------------------------------------------------------- --model
MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, hidden=8, extra=False):
            super().__init__()
            self.encoder = nn.Linear(5, 3)
            self.gru = nn.GRU(3, hidden, batch_first=True)
            self.readout = nn.Linear(hidden, 2)
            if extra:
                self.extra = nn.Linear(2, 2)

        def forward(self, x):
            return self.readout(torch.tanh(self.gru(torch.tanh(self.encoder(x)))[0]))

    class Broken(nn.Module):
        def __init__(self):
            raise RuntimeError("cannot build")
    """
)


@pytest.fixture
def encoder_model(tmp_path, monkeypatch):
    """(module name, a trained-looking Net, its checkpoint, inputs file, the inputs)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "rnnjac_cli_test_models.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(pkg))
    import rnnjac_cli_test_models as models

    torch.manual_seed(0)
    net = models.Net()
    ckpt = tmp_path / "net.pt"
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, ckpt)
    x = torch.randn(3, 60, 5)
    np.save(tmp_path / "x.npy", x.numpy())
    yield "rnnjac_cli_test_models", net, ckpt, tmp_path / "x.npy", x
    monkeypatch.delitem(__import__("sys").modules, "rnnjac_cli_test_models")


def test_model_gives_the_exponents_of_the_python_call(tmp_path, encoder_model, capsys):
    name, net, ckpt, xfile, x = encoder_model
    out = tmp_path / "s.nc"
    argv = ["analyze", str(ckpt), "--model", f"{name}:Net", "--model-kwargs", '{"hidden": 8}', "--inputs", str(xfile)]
    assert main([*argv, "-k", "3", "--submodule", "gru", "-o", str(out), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
    ds = rnnjac.open_dataset(out)
    ref = rnnjac.lyapunov_spectrum(
        net.gru, torch.tanh(net.encoder(x)).detach(), k=3, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_allclose(ds.lyapunov_exponents.values, ref.lyapunov_exponents.values, rtol=1e-5, atol=1e-7)
    assert ds.attrs["model"] == f"{name}:Net" and ds.attrs["submodule"] == "gru"
    # on the raw inputs the answer would differ: the test can tell the two apart
    raw = rnnjac.lyapunov_spectrum(net.gru, x[..., :3], k=3, generator=torch.Generator().manual_seed(0))
    assert not np.allclose(raw.lyapunov_exponents.values, ds.lyapunov_exponents.values, rtol=1e-3)
    # verify takes the same options and checks the submodule on what the model feeds it
    assert (
        main(["verify", str(ckpt), "--model", f"{name}:Net", "--inputs", str(xfile), "--dtype", "float64", "-q"]) == 0
    )
    assert capsys.readouterr().out.startswith("PASS")


def test_model_in_the_current_folder_is_importable(tmp_path, capsys, monkeypatch):
    """``--model mynet:Net`` finds ``./mynet.py`` as ``python -m`` would, although a console script's import path
    lacks the current folder (the README's example); sweep workers get it through ``PYTHONPATH``."""
    here = tmp_path / "work"
    here.mkdir()
    (here / "rnnjac_cwd_test_model.py").write_text(MODEL_SOURCE)
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(here))])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delitem(sys.modules, "rnnjac_cwd_test_model", raising=False)
    torch.manual_seed(0)
    with monkeypatch.context() as m:  # the checkpoint, built with the module importable for a moment
        m.syspath_prepend(str(here))
        import rnnjac_cwd_test_model as models

        state = models.Net().state_dict()
    monkeypatch.delitem(sys.modules, "rnnjac_cwd_test_model")
    assert str(here) not in sys.path
    torch.save(state, here / "net.pt")
    np.save(here / "x.npy", torch.randn(2, 20, 5).numpy())
    argv = ["analyze", "net.pt", "--model", "rnnjac_cwd_test_model:Net", "--inputs", "x.npy", "-k", "2", "-o", "s.nc"]
    assert main([*argv, "-q", "--submodule", "gru"]) == 0, capsys.readouterr().err
    assert rnnjac.open_dataset(here / "s.nc").attrs["model"] == "rnnjac_cwd_test_model:Net"
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(here)


def test_without_model_a_warning_names_the_ignored_weights(tmp_path, encoder_model, capsys):
    _, _, ckpt, _, _ = encoder_model
    assert main(["analyze", str(ckpt), "--batch", "2", "--steps", "20", "-o", str(tmp_path / "raw.nc"), "-q"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rnnjac: warning:")
    for key in ("encoder.weight", "encoder.bias", "readout.weight", "readout.bias"):
        assert key in err
    assert "gru.weight_hh_l0" not in err and "--inputs directly" in err and "--model" in err
    # a checkpoint of the recurrent module alone: no warning
    torch.save(nn.GRU(3, 4).state_dict(), tmp_path / "g.pt")
    assert (
        main(["analyze", str(tmp_path / "g.pt"), "--batch", "1", "--steps", "5", "-o", str(tmp_path / "g.nc"), "-q"])
        == 0
    )
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("model", "kwargs", "expected"),
    [
        ("no_such_module_xyz:Net", None, "cannot import no_such_module_xyz"),
        ("{name}:Missing", None, "has no attribute 'Missing'"),
        ("{name}.Net", None, "must be 'package.module:ClassName'"),
        ("{name}:Net", "{hidden: 8}", "--model-kwargs must be a JSON object"),
        ("{name}:Net", "[1, 2]", "--model-kwargs must be a JSON object"),
        ("{name}:Net", '{"extra": true}', "missing keys (2): extra.bias, extra.weight"),
        ("{name}:Net", '{"hidden": 6}', "does not fit"),
        ("{name}:Net", '{"depth": 2}', "unexpected keyword argument 'depth'"),
        ("{name}:Broken", None, "cannot build"),
    ],
)
def test_bad_model_is_one_line_exit_2(tmp_path, encoder_model, capsys, model, kwargs, expected):
    name, _, ckpt, xfile, _ = encoder_model
    argv = [
        "analyze",
        str(ckpt),
        "--model",
        model.format(name=name),
        "--inputs",
        str(xfile),
        "-o",
        str(tmp_path / "m.nc"),
    ]
    assert main([*argv, *(["--model-kwargs", kwargs] if kwargs else []), "-q"]) == 2
    err = _err_line(capsys)
    assert expected in err and "model=" not in err and "model_kwargs" not in err, err
    assert not (tmp_path / "m.nc").exists()


def test_model_needs_inputs_and_submodule_needs_model(tmp_path, encoder_model, capsys):
    name, _, ckpt, xfile, _ = encoder_model
    assert main(["analyze", str(ckpt), "--model", f"{name}:Net", "-o", str(tmp_path / "a.nc")]) == 2
    assert "--inputs" in _err_line(capsys)
    assert main(["analyze", str(ckpt), "--submodule", "gru", "--inputs", str(xfile), "-o", str(tmp_path / "a.nc")]) == 2
    assert "add --model" in _err_line(capsys)


def test_model_in_a_file_with_an_unexpected_prefix_lists_the_keys(tmp_path, encoder_model, capsys):
    name, net, _, xfile, _ = encoder_model
    ckpt = tmp_path / "other.pt"
    torch.save({"body.encoder.weight": net.encoder.weight, "other.x": torch.zeros(1)}, ckpt)
    assert (
        main(["analyze", str(ckpt), "--model", f"{name}:Net", "--inputs", str(xfile), "-o", str(tmp_path / "o.nc")])
        == 2
    )
    err = _err_line(capsys)
    assert (
        "missing keys" in err
        and "gru.weight_hh_l0" in err
        and "unexpected keys (2): body.encoder.weight, other.x" in err
    )


# ----------------------------------------------------------------------------- --threads
def test_threads_sets_torch_threads_for_the_command_only(tmp_path, monkeypatch, capsys):
    torch.save(nn.GRU(2, 3).state_dict(), tmp_path / "g.pt")
    seen = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt  # stop before any work

    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    monkeypatch.setattr(rnnjac._pipeline, "analyze_checkpoint", record)
    assert (
        main(["analyze", str(tmp_path / "g.pt"), "-o", str(tmp_path / "s.nc"), "--threads", str(wanted), "-q"]) == 130
    )
    assert seen == [wanted] and torch.get_num_threads() == before
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "g.pt"), "-o", str(tmp_path / "s.nc"), "--threads", "0"]) == 2
    assert "--threads must be an integer >= 1; got 0" in _err_line(capsys)
    for command in (["verify", "c.pt"], ["fixed-points", "c.pt"], ["demo"]):
        assert rnnjac.cli.build_parser().parse_args([*command, "--threads", "3"]).threads == 3


# ----------------------------------------------------------------------------- --check-lyapunov
@pytest.fixture
def chaotic(tmp_path):
    """tanh RNN, W ~ N(0, g^2 / N) with g = 2, N = 32: chaotic (lambda_1 about +0.05 to +0.1)."""
    rnn = nn.RNN(1, 32, bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) * 2 / 32**0.5)
    path = tmp_path / "chaotic.pt"
    torch.save({"state_dict": rnn.state_dict(), "nonlinearity": "tanh"}, path)
    return path


CHECK_RUN = ["--autonomous", "--h0", "random", "--batch", "4", "--steps", "400", "--warmup", "50", "--seed", "1"]


def _check_line(out: str) -> str:
    lines = [line for line in out.splitlines() if re.match(r"(λ|lambda)1 check: ", line)]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.slow
def test_analyze_check_lyapunov_prints_and_records_the_library_result(tmp_path, chaotic, capsys):
    out = tmp_path / "s.nc"
    args = ["analyze", str(chaotic), "-o", str(out), "-q", "-k", "2", "--tangent-warmup", "50", *CHECK_RUN]
    args.append("--no-singular-values")
    assert main([*args, "--check-lyapunov"]) == 0
    line = _check_line(capsys.readouterr().out)
    assert ": PASS: direct simulation +" in line and "95% level" in line
    ds = rnnjac.open_dataset(out)
    a = ds.attrs
    assert (
        a["lyapunov_check_passed"] == 1
        and a["lyapunov_check_dns"] > 0.03
        and "direct simulation" in a["lyapunov_check_method"]
    )
    # the same numbers as the library call with the analysis' inputs, h0, warm-ups and seed
    rnn = rnnjac.load_checkpoint(chaotic)
    spec = rnnjac._pipeline.InputSpec(batch=4, steps=400, autonomous=True, h0="random", seed=1)
    x = rnnjac._pipeline.make_inputs(spec, 1)
    h0 = rnnjac._pipeline.make_h0(spec, 32, 4, torch.float32)
    ref = rnnjac.verify_lyapunov(rnn, x, h0, warmup=50, tangent_warmup=50, generator=torch.Generator().manual_seed(1))
    assert a["lyapunov_check_dns"] == pytest.approx(ref.dns, rel=1e-12)
    assert a["lyapunov_check_qr"] == pytest.approx(ref.qr, rel=1e-12)
    # the QR estimate of the check and the analysis' own lambda_1 agree within the analysis' interval
    lo, hi = ds.lyapunov_exponents_bounds.isel(le_index=0).values
    assert lo - 0.01 < a["lyapunov_check_qr"] < hi + 0.01
    assert f"{a['lyapunov_check_dns']:+.4f}" in line
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert ": PASS: " in _check_line(capsys.readouterr().out)
    assert main([*args, "--overwrite"]) == 0  # without the flag: no check, no line
    assert "check: " not in capsys.readouterr().out and "lyapunov_check_passed" not in rnnjac.open_dataset(out).attrs


@pytest.fixture
def wrong_closed_form(monkeypatch):
    """rnnjac's closed-form Jacobian of the built-in cells, deliberately wrong: scaled by 1.3 (lambda_1 off by
    ln 1.3 = 0.26)."""
    from rnnjac._builtin_system import BuiltinSystem
    from rnnjac._linearization import DenseLinearization

    right = BuiltinSystem._closed_form

    def wrong(self, s, x):
        return DenseLinearization(self.layout, s, x, 1.3 * right(self, s, x).materialize())

    monkeypatch.setattr(BuiltinSystem, "_closed_form", wrong)
    monkeypatch.setattr(BuiltinSystem, "factored", lambda self, method: False)


@pytest.mark.slow
def test_a_wrong_jacobian_fails_the_check_with_exit_1(tmp_path, chaotic, capsys, wrong_closed_form):
    out = tmp_path / "s.nc"
    args = ["analyze", str(chaotic), "-o", str(out), "-q", "-k", "1", "--no-singular-values", *CHECK_RUN]
    assert main([*args, "--check-lyapunov"]) == 1
    line = _check_line(capsys.readouterr().out)
    assert ": FAIL: " in line and "the Jacobians may be wrong" in line and "--steps" in line
    a = rnnjac.open_dataset(out).attrs  # written all the same, with the failure recorded
    assert a["lyapunov_check_passed"] == 0
    assert a["lyapunov_check_difference"] == pytest.approx(-math.log(1.3), abs=0.05)
    assert abs(a["lyapunov_check_difference"]) > a["lyapunov_check_limit"]


@pytest.mark.slow
def test_verify_check_lyapunov_is_opt_in_and_sets_the_exit_status(tmp_path, chaotic, capsys, monkeypatch):
    args = ["verify", str(chaotic), "-q", "--dtype", "float64", "--directions", "2"]
    args += ["--autonomous", "--h0", "random", "--batch", "4", "--steps", "200", "--seed", "1"]
    assert main(args) == 0
    assert "check: " not in capsys.readouterr().out  # opt-in
    out = tmp_path / "v.nc"
    assert main([*args, "--check-lyapunov", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("PASS: max abs err") and ": PASS: direct simulation" in _check_line(printed)
    assert rnnjac.open_dataset(out).attrs["lyapunov_check_passed"] == 1
    from rnnjac._builtin_system import BuiltinSystem

    right = BuiltinSystem._closed_form
    monkeypatch.setattr(BuiltinSystem, "factored", lambda self, method: False)
    monkeypatch.setattr(
        BuiltinSystem,
        "_closed_form",
        lambda self, s, x: rnnjac._linearization.DenseLinearization(
            self.layout, s, x, 1.3 * right(self, s, x).materialize()
        ),
    )
    assert main([*args, "--check-lyapunov"]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("FAIL: ") and ": FAIL: " in _check_line(printed)


def test_check_lyapunov_bad_use_is_one_line_before_work(tmp_path, chaotic, capsys):
    out = tmp_path / "s.nc"
    base = ["analyze", str(chaotic), "-o", str(out), "-q", "--check-lyapunov"]
    assert main([*base, "--steps", "12", "--warmup", "5"]) == 2
    err = capsys.readouterr().err
    assert "must fit in the T = 12 steps" in err and "--warmup 5" in err and "warmup=" not in err
    assert main(["analyze", str(chaotic), str(chaotic), "-o", str(out), "-q", "--check-lyapunov"]) == 2
    assert "--check-lyapunov checks one checkpoint" in capsys.readouterr().err
    assert main(["verify", str(chaotic), "--check-lyapunov", "--steps", "15"]) == 2
    assert "must fit in the T = 15 steps" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- --sensitivity with --model (#16)
def test_model_sensitivity_is_that_of_the_submodule_on_what_the_model_feeds_it(tmp_path, encoder_model, capsys):
    name, net, ckpt, xfile, x = encoder_model
    out = tmp_path / "s.nc"
    argv = ["analyze", str(ckpt), "--model", f"{name}:Net", "--model-kwargs", '{"hidden": 8}', "--inputs", str(xfile)]
    assert main([*argv, "--submodule", "gru", "--sensitivity", "--max-lag", "6", "--no-lyapunov", "-o", str(out)]) == 0
    ds = rnnjac.open_dataset(out)
    assert ds.attrs["max_lag"] == 6 and ds.attrs["model"] == f"{name}:Net"
    ref = rnnjac.sensitivity(net.gru, torch.tanh(net.encoder(x)).detach(), max_lag=6)
    np.testing.assert_allclose(
        ds.input_sensitivity_log_norm.values, ref.input_sensitivity_log_norm.values, rtol=1e-5, atol=1e-6
    )
    assert np.isnan(ds.input_sensitivity_log_norm.values[:, :6, 6]).all()  # t - lag < 1
