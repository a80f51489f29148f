"""The command line at its edges (issue 11): outputs checked before work, interrupts, errors in CLI terms, help."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import rnnjac
from rnnjac import cli
from rnnjac._pipeline import InputSpec, check_device, check_input_spec
from rnnjac.cli import build_parser, cli_message, main


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gru.pt"
    torch.save({"model_state_dict": nn.GRU(3, 6, num_layers=2).state_dict(), "step": 7}, path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rnnjac: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "[Errno" not in err
    return err


def _analyze(ckpt, out, *extra) -> int:
    return main(["analyze", str(ckpt), "-o", str(out), "--steps", "12", "--batch", "2", "-q", *extra])


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("name", ["s.csv", "s", "s.h5"])
def test_analyze_refuses_an_unknown_output_kind_before_work(tmp_path, ckpt, capsys, name):
    assert _analyze(ckpt, tmp_path / name) == 2
    err = _one_error(capsys)
    assert ".nc" in err and ".zarr" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt"]


@pytest.mark.parametrize("command", ["analyze", "verify", "fixed-points"])
@pytest.mark.parametrize("name", ["s.png", "s.svg"])
def test_a_figure_name_for_a_dataset_output_is_refused_before_work(tmp_path, ckpt, capsys, monkeypatch, command, name):
    """``-o`` of analyze, verify and fixed-points is a Dataset: a figure suffix (which the general check accepts for
    other outputs) is refused before any work, not after the whole computation."""
    import rnnjac._fixed_points
    import rnnjac._pipeline
    import rnnjac._verify

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for module, name_ in ((rnnjac._pipeline, "analyze_checkpoint"), (rnnjac._verify, "verify")):
        monkeypatch.setattr(module, name_, no_work)
    monkeypatch.setattr(rnnjac._fixed_points, "fixed_points", no_work)
    monkeypatch.setattr(rnnjac._pipeline, "load_checkpoint", no_work, raising=False)
    assert main([command, str(ckpt), "-o", str(tmp_path / name)]) == 2
    err = _one_error(capsys)
    assert "must end in .nc or .zarr" in err and name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt"]


def test_overwrite_replaces_only_rnnjac_outputs(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results.nc"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    foreign = tmp_path / "foreign.nc"
    foreign.write_bytes(b"not from rnnjac")
    real = tmp_path / "real.nc"
    assert _analyze(ckpt, real) == 0
    link = tmp_path / "link.nc"
    link.symlink_to(real)
    old_real = real.read_bytes()
    for target in (folder, foreign, link, Path(".")):
        assert _analyze(ckpt, target, "--overwrite") == 2, target
        _one_error(capsys)
    assert (folder / "keep.txt").read_text() == "mine" and foreign.read_bytes() == b"not from rnnjac"
    assert link.is_symlink() and real.read_bytes() == old_real and (tmp_path / "gru.pt").exists()
    assert _analyze(ckpt, real, "--overwrite") == 0  # an output rnnjac wrote is replaced
    assert rnnjac.open_dataset(real).sizes["time"] == 12


@pytest.mark.slow
def test_out_dot_overwrite_deletes_nothing_console_script(tmp_path, ckpt):
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run(
        ["rnnjac", "analyze", "gru.pt", "--out", ".", "--overwrite", "--steps", "5", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("rnnjac: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "gru.pt").read_bytes() == ckpt.read_bytes()


def test_demo_out_naming_a_file_is_one_clear_line(tmp_path, capsys):
    f = tmp_path / "dm"
    f.write_text("keep")
    assert main(["demo", "-o", str(f), "-q"]) == 2
    err = _one_error(capsys)
    assert "not a folder" in err and str(f) in err
    assert f.read_text() == "keep"


def test_demo_checks_every_output_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "dm"
    out.mkdir()
    (out / "summary.png").write_bytes(b"my own figure")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(sys.modules["rnnjac._verify"], "verify", no_work)
    assert main(["demo", "-o", str(out), "-q"]) == 2
    assert "summary.png already exists" in _one_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["summary.png"]
    # a folder that the demo created is removed again when it refuses
    fresh = tmp_path / "new" / "dm"
    monkeypatch.setattr(cli, "plot_targets", lambda *a, **k: {"summary": tmp_path / "dm" / "summary.png"})
    assert main(["demo", "-o", str(fresh), "-q"]) == 2
    assert not (tmp_path / "new").exists()


def test_plot_checks_every_figure_and_draws_all_before_writing(tmp_path, ckpt, capsys, monkeypatch):
    s = tmp_path / "s.nc"
    assert _analyze(ckpt, s, "--eigenvalues") == 0
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "s_summary.png").write_bytes(b"mine")
    assert main(["plot", str(s), "-o", str(figs)]) == 2
    assert "s_summary.png already exists" in _one_error(capsys)
    assert sorted(p.name for p in figs.iterdir()) == ["s_summary.png"]
    (figs / "s_summary.png").unlink()

    def broken(ds):
        raise ValueError("cannot draw the summary")

    monkeypatch.setattr(rnnjac.plot, "summary", broken)  # the last figure fails: nothing is written
    assert main(["plot", str(s), "-o", str(figs)]) == 2
    assert "cannot draw the summary" in _one_error(capsys)
    assert list(figs.iterdir()) == []


def test_plot_on_a_sweep_writes_figures_or_refuses_before_writing(tmp_path, ckpt, capsys):
    torch.manual_seed(1)
    second = tmp_path / "gru2.pt"
    torch.save({"model_state_dict": nn.GRU(3, 6, num_layers=2).state_dict(), "step": 9}, second)
    sweep = tmp_path / "sweep.nc"
    argv = ["analyze", str(ckpt), str(second), "-o", str(sweep), "--steps", "10", "--batch", "2", "-q"]
    assert main(argv) == 0
    figs = tmp_path / "figs"
    code = main(["plot", str(sweep), "-o", str(figs)])
    if code == 0:
        names = sorted(p.name for p in figs.iterdir())
        assert "sweep_summary.png" in names and all((figs / n).stat().st_size > 1000 for n in names)
    else:
        assert code == 2 and "sweep" in _one_error(capsys)
        assert not figs.exists()


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_a_sweep_rerun_with_nothing_to_compute_says_so(tmp_path, ckpt, capsys, suffix):
    """A rerun of a finished sweep writes nothing and says so (it printed "wrote"); -q on a single analysis keeps the
    result line only."""
    torch.manual_seed(1)
    second = tmp_path / "gru2.pt"
    torch.save({"model_state_dict": nn.GRU(3, 6, num_layers=2).state_dict(), "step": 9}, second)
    sweep = tmp_path / f"sweep{suffix}"
    argv = ["analyze", str(ckpt), str(second), "-o", str(sweep), "--steps", "10", "--batch", "2", "-q"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"wrote {sweep} (2 checkpoints)\n"
    before = sorted((p.relative_to(sweep).as_posix(), p.stat().st_mtime_ns) for p in [sweep, *sweep.rglob("*")])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == f"{sweep} already holds all 2 checkpoints with these options: nothing to compute, nothing written\n"
    assert sorted((p.relative_to(sweep).as_posix(), p.stat().st_mtime_ns) for p in [sweep, *sweep.rglob("*")]) == before
    assert _analyze(ckpt, tmp_path / "one.nc") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(("λ1 = ", "lambda1 = ")), lines


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, ckpt, capsys, monkeypatch):
    out = tmp_path / "s.nc"
    assert _analyze(ckpt, out) == 0
    old = out.read_bytes()

    def full(tmp, data):
        Path(tmp).write_bytes(bytes(data)[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rnnjac._io, "_write_bytes", full)
    assert _analyze(ckpt, out, "--overwrite") == 2
    assert _one_error(capsys) == f"rnnjac: error: No space left on device (writing {out}; it is unchanged)\n"
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt", "s.nc"]


# ----------------------------------------------------------------------------- provenance
def test_verify_out_records_provenance(tmp_path, ckpt):
    out = tmp_path / "v.nc"
    assert main(["verify", str(ckpt), "--dtype", "float64", "-o", str(out), "-q"]) == 0
    a = rnnjac.open_dataset(out).attrs
    assert a["checkpoint"] == str(ckpt) and a["checkpoint_sha256"] == _sha(ckpt)
    assert a["inputs"] == InputSpec(batch=2, steps=20).describe()
    assert a["command"].startswith("rnnjac verify")


# ----------------------------------------------------------------------------- interrupts
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    moment, ready = sys.argv[1], sys.argv[2]

    def pause():
        open(ready, "w").close()
        time.sleep(1)

    if moment == "compute":
        import rnnjac._pipeline as pipeline
        real_spectra = pipeline.spectra
        def spectra(*a, **k):
            pause()
            return real_spectra(*a, **k)
        pipeline.spectra = spectra
    elif moment == "write":  # inside rnnjac's atomic write, before the data reach the temporary
        import xarray as xr
        real_to_netcdf = xr.Dataset.to_netcdf
        def to_netcdf(self, *a, **k):
            pause()
            return real_to_netcdf(self, *a, **k)
        xr.Dataset.to_netcdf = to_netcdf
    elif moment == "rename":  # the final rename of the complete temporary
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            if ".rnnjac-" in str(src):
                pause()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    from rnnjac.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def _signal_at(tmp_path, ckpt, moment: str, sig) -> tuple[subprocess.CompletedProcess, Path, bytes]:
    out = tmp_path / "s.nc"
    assert _analyze(ckpt, out) == 0
    old = out.read_bytes()
    ready = tmp_path.parent / f"{tmp_path.name}.ready"
    argv = ["analyze", str(ckpt), "-o", str(out), "--overwrite", "--steps", "30", "--batch", "3", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, moment, str(ready), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ready.exists(), proc.communicate()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode(), stderr.decode())
    return result, out, old


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["compute", "write", "rename"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_keeps_old_or_complete_new_output(tmp_path, ckpt, moment, sig):
    r, out, old = _signal_at(tmp_path, ckpt, moment, sig)
    assert r.returncode == 128 + int(sig), r.stderr
    assert r.stderr.startswith("rnnjac: interrupted") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt", "s.nc"]  # no temporary left
    if moment == "rename":  # the signal came after the data were complete: the new file is in place, and said so
        assert rnnjac.open_dataset(out).sizes["time"] == 30
        assert "written completely" in r.stderr and str(out) in r.stderr
    else:
        assert out.read_bytes() == old
        assert "nothing was written (existing files are unchanged)" in r.stderr


@pytest.mark.slow
def test_ctrl_c_during_a_real_final_write(tmp_path, ckpt):
    """No hooks: poll for rnnjac's temporary of a large output, then Ctrl-C the console script."""
    out = tmp_path / "s.nc"
    assert _analyze(ckpt, out) == 0
    old = out.read_bytes()
    argv = ["rnnjac", "analyze", str(ckpt), "-o", str(out), "--overwrite", "--steps", "1500", "--batch", "48", "-q"]
    argv += ["--ci", "none"]  # no convergence warning in the way of the one-line message checked here
    proc = subprocess.Popen(
        [*argv, "--keep-states", "--eigenvalues"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seen = False
    while proc.poll() is None and not seen:
        seen = any(p.name.startswith(".s.nc.rnnjac-") for p in tmp_path.iterdir())
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert seen, "the command ended before its temporary file was seen"
    assert proc.returncode == 130 and err.startswith("rnnjac: interrupted") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt", "s.nc"]
    if out.read_bytes() == old:
        assert "nothing was written" in err
    else:
        assert rnnjac.open_dataset(out).sizes["time"] == 1500 and "written completely" in err


def test_sigterm_in_process_exits_143_and_restores_handlers(tmp_path, ckpt, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr(rnnjac._pipeline, "analyze_checkpoint", killed)
    assert main(["analyze", str(ckpt), "-o", str(tmp_path / "s.nc"), "-q"]) == 143
    assert capsys.readouterr().err == "rnnjac: interrupted; nothing was written (existing files are unchanged)\n"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not (tmp_path / "s.nc").exists()


def test_an_interrupt_with_its_own_message_is_passed_on(tmp_path, ckpt, capsys, monkeypatch):
    """A sweep says what it kept (``OUT.parts/``) and how to resume; the CLI prints that, in CLI terms."""
    import rnnjac._sweeps

    def interrupted(*args, **kwargs):
        raise rnnjac._io.Interrupted(
            "interrupted: 1 of 2 checkpoints are finished and kept in w.nc.parts/; rerun the same command to resume"
        )

    monkeypatch.setattr(rnnjac._sweeps, "analyze_checkpoints", interrupted)
    assert main(["analyze", str(ckpt), str(ckpt), "-o", str(tmp_path / "w.nc"), "-q"]) == 130
    err = capsys.readouterr().err
    assert err == (
        "rnnjac: interrupted: 1 of 2 checkpoints are finished and kept in w.nc.parts/; rerun the same command "
        "to resume\n"
    )


def test_an_interrupt_held_back_until_the_end_is_still_reported(tmp_path, ckpt, capsys, monkeypatch):
    real = rnnjac._pipeline.analyze_checkpoint

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # what a C library may do with it
        return real(*args, **kwargs)

    monkeypatch.setattr(rnnjac._pipeline, "analyze_checkpoint", swallowing)
    out = tmp_path / "s.nc"
    assert _analyze(ckpt, out) == 130
    err = capsys.readouterr().err
    assert err.startswith("rnnjac: interrupted after the command had finished") and str(out) in err
    assert rnnjac.open_dataset(out).sizes["time"] == 12


# ----------------------------------------------------------------------------- errors in CLI terms
def _all_flags() -> set[str]:
    flags = set()
    for action in build_parser()._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for a in action._actions:  # noqa: SLF001
            flags.update(a.option_strings)
    return flags


def test_every_translated_keyword_is_a_real_flag():
    flags = _all_flags()
    assert set(cli.FLAGS.values()) | set(cli.NEGATED.values()) <= flags


@pytest.mark.parametrize(
    ("library", "command_line"),
    [
        (
            "s.nc already exists; pass overwrite=True to replace it",
            "s.nc already exists; use --overwrite to replace it",
        ),
        ("exists; pass overwrite=True (--overwrite) to replace it", "exists; use --overwrite to replace it"),
        (
            "give it with nonlinearity='tanh' or nonlinearity='relu'",
            "give it with --nonlinearity tanh or --nonlinearity relu",
        ),
        (
            "nonlinearity= applies to nn.RNN only: leave nonlinearity out",
            "--nonlinearity applies to nn.RNN only: leave --nonlinearity out",
        ),
        (
            "several recurrent modules: 'a.', 'b.'; choose one with prefix=",
            "several recurrent modules: 'a.', 'b.'; choose one with --prefix",
        ),
        ("load it with unsafe=True only if you trust it", "load it with --unsafe only if you trust it"),
        (
            "k must be an integer with 1 <= k <= D = 12; got 99",
            "--num-exponents must be an integer with 1 <= k <= D = 12; got 99",
        ),
        ("got warmup=5 and tangent_warmup=3", "got --warmup 5 and --tangent-warmup 3"),
        ("input_std must be a finite number > 0; got -1.0", "--input-std must be a finite number > 0; got -1.0"),
        (
            "x.npz holds several arrays ['a', 'b']; choose one with key=",
            "x.npz holds several arrays ['a', 'b']; choose one with --inputs-key",
        ),
        ("lyapunov=False and singular_values=False", "--no-lyapunov and --no-singular-values"),
        ("with singular_values=3 and state='h'", "with --singular-values 3 and --state h"),
        (
            "singular_values must be True, False or an integer k with 1 <= k <= D = 12 (state='full'); got 99",
            "--singular-values must be an integer k with 1 <= k <= D = 12 (--state full); got 99",
        ),
        (
            "max_lag must be smaller than the number of steps T = 12; got max_lag=12",
            "--max-lag must be smaller than the number of steps T = 12; got --max-lag 12",
        ),
        ("warmup must be an integer >= 0 or 'auto'; got 'x'", "--warmup must be an integer >= 0 or 'auto'; got 'x'"),
        ("inputs contain NaN/Inf, first at step t=4", "inputs contain NaN/Inf, first at step t=4"),
        ("the model expects input_size=3", "the model expects input_size=3"),
    ],
)
def test_library_keywords_become_flags(library, command_line):
    assert cli_message(library) == command_line


def _no_python_keywords(err: str) -> None:
    assert not re.search(r"\b(" + "|".join(cli.FLAGS) + r")=", err), err
    assert not re.search(r"=\S*\s*\(--", err), err


def test_checkpoint_option_errors_name_the_flag(tmp_path, ckpt, capsys):
    torch.save(nn.RNN(3, 4, nonlinearity="relu").state_dict(), tmp_path / "r.pt")
    assert _analyze(tmp_path / "r.pt", tmp_path / "s.nc") == 2
    err = _one_error(capsys)
    assert "--nonlinearity" in err
    _no_python_keywords(err)
    assert _analyze(ckpt, tmp_path / "s.nc", "--nonlinearity", "relu") == 2  # a GRU has none
    err = _one_error(capsys)
    assert "--nonlinearity" in err
    _no_python_keywords(err)
    assert _analyze(tmp_path / "r.pt", tmp_path / "s.nc", "--nonlinearity", "relu") == 0
    assert rnnjac.open_dataset(tmp_path / "s.nc").attrs["nonlinearity"] == "relu"
    assert _analyze(ckpt, tmp_path / "s.nc") == 2  # exists
    err = _one_error(capsys)
    assert "use --overwrite" in err
    _no_python_keywords(err)


BAD_VALUES = [
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N; got 'gpu'"),
    (["--device", "cuda:x"], "must be cpu, cuda or cuda:N; got 'cuda:x'"),
    (["--input-std", "-1"], "--input-std must be a finite number > 0; got -1.0"),
    (["--input-std", "nan"], "--input-std must be a finite number > 0; got nan"),
    (["--input-std", "0"], "--input-std must be a finite number > 0; got 0.0"),
    (["--batch", "0"], "--batch must be an integer >= 1; got 0"),
    (["--steps", "0"], "--steps must be an integer >= 1; got 0"),
]
ANALYZE_ONLY = [(["--workers", "0"], "--workers must be an integer >= 1; got 0")]


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [("analyze", *case) for case in BAD_VALUES + ANALYZE_ONLY] + [("verify", *case) for case in BAD_VALUES],
)
def test_bad_values_are_refused_before_any_work(tmp_path, capsys, command, extra, message):
    missing = tmp_path / "not-read.pt"  # validation comes first: the checkpoint is never opened
    argv = [command, str(missing), *extra] + (["-o", str(tmp_path / "s.nc")] if command == "analyze" else [])
    assert main(argv) == 2
    assert message in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda_is_a_clear_error(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["verify", str(ckpt), "--device", "cuda"]) == 2
    err = _one_error(capsys)
    assert "--device cuda was asked for but CUDA is not available" in err
    _no_python_keywords(err)


def test_info_and_plot_errors_name_the_file(tmp_path, capsys):
    junk = tmp_path / "junk.nc"
    junk.write_bytes(os.urandom(256))
    for argv in (["info", str(junk)], ["plot", str(junk), "-o", str(tmp_path)], ["info", str(tmp_path / "no.nc")]):
        assert main(argv) == 2
        assert str(tmp_path) in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.nc"]


def test_info_escapes_control_characters(tmp_path, ckpt, capsys):
    sd = {k: v.contiguous() for k, v in nn.GRU(2, 3).state_dict().items()}
    evil = "\x1b[2J\x1b[31mred\x07\nsecond line\u202e"
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={"note": evil})
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\u202e")
    assert r"metadata.note: \x1b[2J\x1b[31mred\x07\nsecond line\u202e" in out
    s = tmp_path / "s.nc"
    assert main(["analyze", str(ckpt), "-o", str(s), "--steps", "5", "-q"]) == 0
    ds = rnnjac.open_dataset(s)
    ds.attrs["checkpoint"] = evil
    rnnjac.save(ds, tmp_path / "t.nc")
    assert main(["info", str(tmp_path / "t.nc")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and r"checkpoint: \x1b[2J" in out


def test_warnings_are_one_line_in_cli_terms_and_scoped(tmp_path, ckpt, capsys, monkeypatch):
    def warn_and_fail(*args, **kwargs):
        message = "tolerances widened; pass dtype='float64' to check exactly"
        warnings.warn(message, rnnjac.errors.RnnjacWarning, stacklevel=1)
        warnings.warn("a warning of another library", DeprecationWarning, stacklevel=1)
        raise ValueError("stop here")

    monkeypatch.setattr(rnnjac._pipeline, "analyze_checkpoint", warn_and_fail)
    formatwarning, showwarning = warnings.formatwarning, warnings.showwarning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["analyze", str(ckpt), "-o", str(tmp_path / "s.nc"), "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "rnnjac: warning: tolerances widened; use --dtype float64 to check exactly"
    assert err[-1] == "rnnjac: error: stop here"
    assert [w.category for w in seen] == [DeprecationWarning]  # other libraries' warnings pass through untouched
    assert (warnings.formatwarning, warnings.showwarning) == (formatwarning, showwarning)


# ----------------------------------------------------------------------------- pipeline checks
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch", 0, "batch must be an integer >= 1; got 0"),
        ("batch", 2.0, "batch must be an integer >= 1; got 2.0"),
        ("steps", -3, "steps must be an integer >= 1; got -3"),
        ("input_std", -1.0, "input_std must be a finite number > 0; got -1.0"),
        ("input_std", math.inf, "input_std must be a finite number > 0; got inf"),
        ("input_std", "1", "input_std must be a finite number > 0; got '1'"),
        ("h0", "ones", "h0 must be one of 'zeros', 'random'; got 'ones'"),
        ("seed", 1.5, "seed must be an integer; got 1.5"),
        ("seed", True, "seed must be an integer; got True"),
    ],
)
def test_input_spec_values_are_checked_by_field_name(field, value, message):
    with pytest.raises(ValueError) as err:
        check_input_spec(InputSpec(**{field: value}))
    assert str(err.value) == message
    with pytest.raises(ValueError):  # also where the inputs are made
        rnnjac._pipeline.make_inputs(InputSpec(**{field: value}), 3)


def test_input_spec_accepts_valid_values():
    spec = InputSpec(batch=np.int64(3), steps=1, input_std=0.5, h0="random", seed=-4)
    assert check_input_spec(spec) is spec
    assert rnnjac._pipeline.make_inputs(spec, 2).shape == (3, 1, 2)


def test_check_device(monkeypatch):
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "CPU", "cuda:", "cuda:-1", "cuda 0", "mps", ""):
        with pytest.raises(ValueError, match=re.escape(f"device must be cpu, cuda or cuda:N; got {bad!r}")):
            check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda:0' was asked for but CUDA is not available"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:1' but this machine has 1 CUDA device"):
        check_device("cuda:1")


# ----------------------------------------------------------------------------- help and names
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["analyze", "verify", "plot", "info", "demo", "fixed-points"])
def test_every_option_has_help_with_its_real_default(command):
    parser = _subparsers()[command]
    assert parser.description
    for action in parser._actions:  # noqa: SLF001
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):  # noqa: SLF001
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.default is None or action.default is False:
            continue
        said = re.search(r"\(default ([^,)]+)", action.help)
        assert said, f"{command} {action.option_strings}: the help does not give the default {action.default!r}"
        if isinstance(action.default, (int, float)):
            assert float(said.group(1).split()[0]) == float(action.default), (command, action.option_strings)
        else:
            assert said.group(1) == str(action.default), (command, action.option_strings)
    positional = {"analyze": ["c.pt", "-o", "s.nc"], "verify": ["c.pt"], "plot": ["s.nc"], "info": ["c.pt"]}
    positional["fixed-points"] = ["c.pt"]
    real = parser.parse_args(positional.get(command, []))
    for action in parser._actions:  # noqa: SLF001
        if action.dest not in ("help", "checkpoints", "checkpoint", "spectra", "path", "out"):
            assert getattr(real, action.dest) == action.default


def test_verify_help_shows_its_own_defaults(capsys):
    text = _help(capsys, "verify")
    assert "generated trials (default 2)" in text and "generated steps (default 20)" in text
    assert "(default 8)" not in text and "(default 200)" not in text
    args = build_parser().parse_args(["verify", "c.pt"])
    assert (args.batch, args.steps, args.rtol, args.atol) == (2, 20, 1e-6, 1e-8)
    text = _help(capsys, "analyze")
    assert "generated trials (default 8)" in text and "generated steps (default 200)" in text


def test_info_help_warns_about_unsafe(capsys):
    text = _help(capsys, "info")
    assert "--unsafe executes code from the file: only for files you trust" in text
    assert "PATH" in text and "--prefix" in text


def test_conventional_names_and_hidden_old_aliases(capsys):
    parse = build_parser().parse_args
    new = parse(["analyze", "c.pt", "-o", "s.nc", "-k", "3", "--local-lyapunov", "-q"])
    old = parse(["analyze", "c.pt", "--out", "s.nc", "--k", "3", "--local", "--quiet"])
    long = parse(["analyze", "c.pt", "--out", "s.nc", "--num-exponents", "3", "--local-lyapunov", "--quiet"])
    assert vars(new) == vars(old) == vars(long)
    assert (new.k, new.local, new.quiet, new.out) == (3, True, True, "s.nc")
    text = _help(capsys, "analyze")
    assert "-k K, --num-exponents K" in text and "--local-lyapunov" in text
    assert "--k " not in text and "--local " not in text and "--local]" not in text
    for command in ("analyze", "verify", "demo"):
        text = _help(capsys, command)
        assert "-q, --quiet" in text and "-o " in text
    assert "-o DIR, --out DIR" in _help(capsys, "plot")
    nonlinearity = _subparsers()["analyze"]._option_string_actions["--nonlinearity"].help  # noqa: SLF001
    assert "required for an nn.RNN checkpoint that does not record it" in nonlinearity


@pytest.mark.parametrize(
    ("command", "stages"),
    [
        (["analyze", "--steps", "12", "--batch", "2"], ["loading", "model GRU(3, 6, num_layers=2", "spectra"]),
        (["verify", "--steps", "6", "--batch", "1", "--dtype", "float64"], ["loading", "checking J_t against float64"]),
        (["fixed-points", "--n-initial", "4", "--max-iter", "5"], ["loading", "searching fixed points of GRU"]),
    ],
)
def test_verbose_logs_each_stage_with_its_time(tmp_path, ckpt, capsys, command, stages):
    """``-v`` logs each stage (its start, and its time when done) on stderr, one ``rnnjac:`` line each; without it
    none of these lines appear."""
    argv = [command[0], str(ckpt), *command[1:], "-o", str(tmp_path / "out.nc"), "-q"]
    assert main(argv) == 0
    assert "rnnjac: loading" not in capsys.readouterr().err
    assert main([*argv, "-v", "--overwrite"]) == 0
    err = capsys.readouterr().err
    for what in stages:
        assert f"rnnjac: {what}" in err, err
    done = [line for line in err.splitlines() if re.fullmatch(r"rnnjac: .+: done in \d+\.\d s", line)]
    assert len(done) == sum(1 for line in err.splitlines() if line.endswith(" ...")) >= 2, err


def test_verify_quiet_prints_one_result_line(ckpt, capsys):
    assert main(["verify", str(ckpt), "--dtype", "float64", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("PASS: max abs err")
