"""rnnjac._io: what overwrite may replace, atomic writes, permissions, interruptions, stale temporaries."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr

import rnnjac
from rnnjac import _io
from rnnjac._datasets import build_dataset


def _ds(value: float = 1.0, n: int = 3) -> xr.Dataset:
    return build_dataset({"lyapunov_exponents": np.full((2, n), value)}, attrs={"gen": str(value)})


def _snapshot(folder) -> dict:
    """Every entry under ``folder`` (not following links): file bytes, link targets, kinds."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[p] = ("file", f.read())
            else:
                out[p] = ("other", stat.S_IFMT(st.st_mode))
    return out


def _gen(path) -> str:
    return rnnjac.open_dataset(path).attrs["gen"]


def _no_temps(folder) -> bool:
    return not [n for n in os.listdir(folder) if ".rnnjac-" in n]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _temp_name(target: str, pid: int, kind: str = "tmp", host: str | None = None) -> str:
    return f".{target}.rnnjac-{host or _io._host()}-{pid}-0123abcd.{kind}"


# ----------------------------------------------------------------------------- what overwrite may replace
def test_overwrite_refuses_a_plain_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("precious")
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "keep.txt").write_text("precious")
    before = _snapshot(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder; an output must be a file name ending in .nc or .zarr"):
        rnnjac.save(_ds(), results, overwrite=True)
    with pytest.raises(IsADirectoryError, match="not a zarr store written by rnnjac"):
        rnnjac.save(_ds(), tmp_path / "store.zarr", overwrite=True)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _io.save_figure(plt.figure(), results, overwrite=True)
    plt.close("all")
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_the_current_and_home_folders(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "ck.pt").write_text("checkpoint")
    (home / "notes.txt").write_text("notes")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = _snapshot(tmp_path)
    with pytest.raises(IsADirectoryError, match="is the current folder"):
        rnnjac.save(_ds(), ".", overwrite=True)
    with pytest.raises(IsADirectoryError, match="is the home folder"):
        rnnjac.save(_ds(), home, overwrite=True)
    with pytest.raises(IsADirectoryError, match="contains the current folder"):
        rnnjac.save(_ds(), "..", overwrite=True)
    with pytest.raises(IsADirectoryError, match="is the home folder"):
        _io.check_output(os.path.expanduser("~"), overwrite=True)
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_symlinks_fifos_and_foreign_files(tmp_path):
    own = rnnjac.save(_ds(1.0), tmp_path / "own.nc")
    (tmp_path / "link.nc").symlink_to(own)
    (tmp_path / "dangling.nc").symlink_to(tmp_path / "nowhere.nc")
    os.mkfifo(tmp_path / "fifo.nc")
    xr.Dataset({"x": ("a", np.arange(3.0))}).to_netcdf(tmp_path / "foreign.nc", engine="h5netcdf")
    (tmp_path / "text.nc").write_text("not netCDF")
    (tmp_path / "text.png").write_text("not a figure")
    (tmp_path / "text.pdf").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "text.svg").write_text("<html></html>")
    (tmp_path / "file.zarr").write_text("a file")
    before = _snapshot(tmp_path)
    cases = {
        "link.nc": "symbolic link",
        "dangling.nc": "symbolic link",
        "fifo.nc": "not a regular file",
        "foreign.nc": "not a netCDF file written by rnnjac",
        "text.nc": "not a netCDF file written by rnnjac",
        "file.zarr": "not a folder",
        "text.png": "not a PNG figure",
        "text.pdf": "not a PDF figure",
        "text.svg": "not a SVG figure",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _io.check_output(tmp_path / name, overwrite=True)
        with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
            _io.check_output(tmp_path / name)
    with pytest.raises(ValueError, match="symbolic link"):
        rnnjac.save(_ds(2.0), tmp_path / "link.nc", overwrite=True)
    with pytest.raises(ValueError, match="not a PNG figure"):
        _io.save_figure(plt.figure(), tmp_path / "text.png", overwrite=True)
    plt.close("all")
    assert _snapshot(tmp_path) == before
    assert _gen(own) == "1.0"


def test_only_known_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.nc or \.zarr; got \.csv"):
        rnnjac.save(_ds(), tmp_path / "s.csv")
    with pytest.raises(ValueError, match=r"must end in \.png, \.pdf or \.svg; got \.nc"):
        _io.save_figure(plt.figure(), tmp_path / "f.nc")
    plt.close("all")
    with pytest.raises(ValueError, match="got no suffix"):
        _io.check_output(tmp_path / "spectra")
    # what the caller will write: only that kind's suffixes, checked before any work
    assert _io.check_output(tmp_path / "f.png").name == "f.png"
    with pytest.raises(ValueError, match=r"must end in \.nc or \.zarr; got \.png"):
        _io.check_output(tmp_path / "f.png", kind="dataset")
    with pytest.raises(ValueError, match=r"must end in \.png, \.pdf or \.svg; got \.zarr"):
        _io.check_outputs([tmp_path / "f.png", tmp_path / "s.zarr"], kind="figure")
    with pytest.raises(ValueError, match="kind must be 'dataset', 'figure' or None; got 'table'"):
        _io.check_output(tmp_path / "s.nc", kind="table")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _io.check_output(tmp_path / "missing" / "s.nc")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        _io.check_output(tmp_path / "afile" / "s.nc")
    assert sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("name", ["s.nc", "s.zarr", "f.png", "f.pdf", "f.svg", "F.PNG"])
def test_overwrite_replaces_rnnjac_outputs(tmp_path, name):
    target = tmp_path / name
    if target.suffix.lower() in _io.DATASET_SUFFIXES:
        rnnjac.save(_ds(1.0), target)
        rnnjac.save(_ds(2.0, n=4), target, overwrite=True)
        back = rnnjac.open_dataset(target)
        assert back.attrs["gen"] == "2.0" and back.sizes["le_index"] == 4
    else:
        for dpi in (50, 80):
            fig = plt.figure(figsize=(2, 1))
            _io.save_figure(fig, target, overwrite=dpi == 80, dpi=dpi)
            plt.close(fig)
        if target.suffix.lower() == ".png":
            width = int.from_bytes(target.read_bytes()[16:20], "big")
            assert width == 160  # 2 inches at the second dpi
    assert os.listdir(tmp_path) == [name]


def test_save_marks_foreign_datasets_as_rnnjac(tmp_path):
    plain = xr.Dataset({"x": ("a", np.arange(3.0))})
    path = rnnjac.save(plain, tmp_path / "p.nc")
    assert "rnnjac_version" not in plain.attrs  # the caller's object is not changed
    rnnjac.save(plain, path, overwrite=True)  # so the file it wrote can be replaced later
    assert rnnjac.open_dataset(path).attrs["rnnjac_version"] == rnnjac.__version__


def test_check_outputs_checks_all_before_any_write(tmp_path):
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(FileExistsError, match="b.png already exists"):
        _io.check_outputs([tmp_path / "a.nc", tmp_path / "b.png"])
    with pytest.raises(ValueError, match="given twice"):
        _io.check_outputs([tmp_path / "a.nc", tmp_path / "sub" / ".." / "a.nc"])
    assert [p.name for p in _io.check_outputs([tmp_path / "a.nc", tmp_path / "b.png"], overwrite=True)] == [
        "a.nc",
        "b.png",
    ]
    assert sorted(os.listdir(tmp_path)) == ["b.png"]


# ----------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        nc = rnnjac.save(_ds(), tmp_path / "s.nc")
        rnnjac.save(_ds(2.0), nc, overwrite=True)
        store = rnnjac.save(_ds(), tmp_path / "s.zarr")
        fig = _io.save_figure(plt.figure(), tmp_path / "f.png")
        plt.close("all")
    finally:
        os.umask(old)
    assert stat.S_IMODE(nc.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(fig.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(store.stat().st_mode) == 0o777 & ~umask
    for root, dirs, files in os.walk(store):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o777 & ~umask
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------- failures and interruptions
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
@pytest.mark.parametrize("error", [RuntimeError("bug in the writer"), KeyboardInterrupt()])
def test_exception_inside_write_leaves_old_target_and_no_temp(tmp_path, suffix, error):
    target = rnnjac.save(_ds(1.0), tmp_path / f"s{suffix}")
    before = _snapshot(tmp_path)

    def write(tmp):
        rnnjac.save(_ds(2.0), tmp.with_name("x" + suffix))  # a partial output exists ...
        os.rename(tmp.with_name("x" + suffix), tmp)
        raise error  # ... when the writer fails

    with pytest.raises(type(error)):
        _io.atomic_write(target, write, overwrite=True)
    assert _snapshot(tmp_path) == before and _gen(target) == "1.0"


class _SignalOnCollect:
    """Sends SIGINT from ``__del__``, where Python ignores exceptions, as in h5py's and h5netcdf's clean-up."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
@pytest.mark.parametrize("where", ["in the serialisation", "in a finaliser"])
def test_sigint_during_the_write_takes_effect_after_it(tmp_path, monkeypatch, suffix, where):
    """A Ctrl-C that arrives inside HDF5/zarr is not lost: the write is abandoned, the old target stays."""
    target = rnnjac.save(_ds(1.0), tmp_path / f"s{suffix}")
    before = _snapshot(tmp_path)
    method = "to_zarr" if suffix == ".zarr" else "to_netcdf"
    real = getattr(xr.Dataset, method)

    def interrupted(self, *args, **kwargs):
        if where == "in a finaliser":
            _SignalOnCollect()  # collected at once; an exception raised there would be printed and dropped
        else:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, method, interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        rnnjac.save(_ds(2.0), target, overwrite=True)
    assert type(info.value) is KeyboardInterrupt  # plain: nothing was written
    assert _snapshot(tmp_path) == before and _gen(target) == "1.0"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_goes_to_the_programs_handler_after_the_write(tmp_path, monkeypatch):
    class Terminated(Exception):
        pass

    def on_term(signum, frame):
        raise Terminated("SIGTERM")

    target = rnnjac.save(_ds(1.0), tmp_path / "s.nc")
    before = _snapshot(tmp_path)
    real = _io._write_bytes

    def half_then_term(tmp, data):
        real(tmp, bytes(data)[: len(data) // 2])
        signal.raise_signal(signal.SIGTERM)
        tmp.unlink()
        real(tmp, data)

    monkeypatch.setattr(_io, "_write_bytes", half_then_term)
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(Terminated):
            rnnjac.save(_ds(2.0), target, overwrite=True)
        assert signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("exists", [True, False])
def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch, exists):
    target = tmp_path / "s.nc"
    if exists:
        rnnjac.save(_ds(1.0), target)
    before = _snapshot(tmp_path)
    real_write = os.write

    def full(fd, data):
        if len(data) > 100:
            real_write(fd, bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(_io.os, "write", full)
    with pytest.raises(OSError, match="No space left on device"):
        rnnjac.save(_ds(2.0), target, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import numpy as np, xarray as xr
    from rnnjac import _io
    mode, target, gen = sys.argv[1:4]
    ds = xr.Dataset({"v": (("a", "b"), np.random.default_rng(0).random((400, 1000)))}, attrs={"gen": gen})
    if mode == "fsize":  # a real write error from the kernel (as a full disk): files over 100 kB fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    elif mode in ("SIGTERM", "SIGINT"):  # the signal arrives mid-write, after half the bytes are on disk
        real = _io._write_bytes
        def half_then_signal(tmp, data):
            real(tmp, bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), getattr(signal, mode))
            os.unlink(tmp)
            real(tmp, data)
        _io._write_bytes = half_then_signal
    elif mode == "swap":  # killed between the two renames of a folder swap
        real_rename, calls = os.rename, []
        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(a, b)
        os.rename = rename
    try:
        _io.save(ds, target, overwrite=True)
    except OSError as err:
        print("OSError", err.errno, flush=True)
        sys.exit(2)
    print("written", flush=True)
    """
)


def _child(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_save_in_a_subprocess(tmp_path, sig):
    target = rnnjac.save(_ds(1.0), tmp_path / "s.nc")
    before = _snapshot(tmp_path)
    r = _child(sig, target, "new")
    assert "written" not in r.stdout
    if sig == "SIGTERM":
        assert r.returncode == -signal.SIGTERM  # the default action, after the temporary was removed
    else:
        # an uncaught KeyboardInterrupt: Python ends the process by SIGINT after the traceback
        assert r.returncode == -signal.SIGINT and r.stderr.rstrip().endswith("KeyboardInterrupt")
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_write_error_from_the_kernel_exits_cleanly(tmp_path):
    """HDF5 segfaults in its clean-up after a failed write to disk; rnnjac gets a plain OSError and exits."""
    target = rnnjac.save(_ds(1.0), tmp_path / "s.nc")
    before = _snapshot(tmp_path)
    r = _child("fsize", target, "new")
    assert r.returncode == 2, r.stderr
    assert r.stdout.strip() == f"OSError {errno.EFBIG}"
    assert _snapshot(tmp_path) == before


@contextlib.contextmanager
def _limit_file_size():
    """Files over 100 kB fail with a real EFBIG from the kernel (as on a full disk), in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_write_error_leaves_no_partial_output(tmp_path, suffix):
    target = rnnjac.save(_ds(1.0), tmp_path / f"s{suffix}")
    before = _snapshot(tmp_path)
    big = xr.Dataset({"v": (("a", "b"), np.random.default_rng(0).random((400, 1000)))}, attrs={"gen": "2.0"})
    with _limit_file_size(), pytest.raises(OSError) as info:
        rnnjac.save(big, target, overwrite=True)
    assert info.value.errno == errno.EFBIG
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_swap_killed_between_renames_is_recovered(tmp_path):
    target = rnnjac.save(_ds(1.0), tmp_path / "s.zarr")
    r = _child("swap", target, "new")
    assert r.returncode == -signal.SIGKILL
    left = sorted(n.rsplit(".", 1)[-1] for n in os.listdir(tmp_path))
    assert left == ["old", "tmp"] and not target.exists()  # the old store is aside, the new one not in place
    _io.check_output(target, overwrite=True)
    assert os.listdir(tmp_path) == ["s.zarr"] and _gen(target) == "1.0"


def test_stale_swap_leftovers_are_handled(tmp_path):
    """In-process version: an aside of a dead process is restored when the target is missing, else removed."""
    pid = _dead_pid()
    target = rnnjac.save(_ds(1.0), tmp_path / "s.zarr")
    os.rename(target, tmp_path / _temp_name("s.zarr", pid, "old"))
    os.rename(rnnjac.save(_ds(2.0), tmp_path / "x.zarr"), tmp_path / _temp_name("s.zarr", pid, "tmp"))
    assert _gen(rnnjac.save(_ds(3.0), tmp_path / "t.nc")) == "3.0"  # another target: nothing of s.zarr touched
    assert len(os.listdir(tmp_path)) == 3
    with pytest.raises(FileExistsError, match="already exists"):  # the old store is back first
        rnnjac.save(_ds(4.0), target)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr", "t.nc"] and _gen(target) == "1.0"
    os.rename(rnnjac.save(_ds(5.0), tmp_path / "x.zarr"), tmp_path / _temp_name("s.zarr", pid, "old"))  # killed
    # after the swap, before the delete
    rnnjac.save(_ds(6.0), target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["s.zarr", "t.nc"] and _gen(target) == "6.0"


def test_stale_temps_are_removed_on_the_next_call(tmp_path):
    dead, alive, host = _dead_pid(), os.getppid(), _io._host()
    names = {
        "dead": _temp_name("s.nc", dead),
        "dead_folder": _temp_name("s.zarr", dead),
        "own_leftover": _temp_name("s.nc", os.getpid()),
        "old_foreign": _temp_name("s.nc", 1, host=host + "x"),
        "alive": _temp_name("s.nc", alive),
        "recent_foreign": _temp_name("s.nc", 1, host=host + "y"),
        "other_target": _temp_name("t.nc", dead),
        "not_ours": ".s.nc.x3k9.tmp",
    }
    for key, name in names.items():
        if key == "dead_folder":
            (tmp_path / name).mkdir()
            (tmp_path / name / "0").write_bytes(b"x" * 1000)
        else:
            (tmp_path / name).write_bytes(b"x" * 1000)
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / names["old_foreign"], (two_days_ago, two_days_ago))
    rnnjac.save(_ds(), tmp_path / "s.nc")
    rnnjac.save(_ds(), tmp_path / "s.zarr")
    kept = {"alive", "recent_foreign", "other_target", "not_ours"}
    assert sorted(os.listdir(tmp_path)) == sorted(["s.nc", "s.zarr", *(names[k] for k in kept)])
    _io.remove_stale_temps(tmp_path)  # every name in the folder
    assert names["other_target"] not in os.listdir(tmp_path)


def test_temp_names_are_recognisable(tmp_path):
    seen = []
    _io.atomic_write(tmp_path / "f.svg", lambda tmp: seen.append(tmp.name) or tmp.write_text("<svg/>"))
    match = _io._TEMP_RE.match(seen[0])
    assert match and match["name"] == "f.svg" and int(match["pid"]) == os.getpid() and match["kind"] == "tmp"
    assert match["host"] == _io._host()


# ----------------------------------------------------------------------------- reading
def test_open_dataset_errors_name_the_file(tmp_path):
    (tmp_path / "text.nc").write_text("hello")
    (tmp_path / "trunc.nc").write_bytes(rnnjac.save(_ds(), tmp_path / "ok.nc").read_bytes()[:600])
    os.mkfifo(tmp_path / "fifo.nc")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "bad.zarr").mkdir()
    cases = {
        "missing.nc": (FileNotFoundError, "does not exist"),
        "text.nc": (ValueError, "not a netCDF-4 file"),
        "trunc.nc": (ValueError, "could not be read as netCDF"),
        "fifo.nc": (ValueError, "not a regular file"),
        "folder": (IsADirectoryError, "is a folder"),
        "file.zarr": (ValueError, "not a zarr store"),
        "bad.zarr": (ValueError, "could not be read as a zarr store"),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind, match=message) as info:
            rnnjac.open_dataset(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
