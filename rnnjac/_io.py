"""Everything rnnjac writes to disk, written so that no data is lost.

Rules (the functions below follow them; the README's "Conventions" section summarises them):

Outputs
    A dataset is a ``.nc`` path (netCDF-4, written with h5netcdf) or a ``.zarr`` path (a zarr v2 folder); a figure
    is a ``.png``, ``.pdf`` or ``.svg`` path (suffixes are case-insensitive). Any other name is refused before any
    work, and so is an output whose folder does not exist.

What ``overwrite=True`` may replace
    Only what rnnjac wrote itself: a regular netCDF file whose global attributes hold ``rnnjac_version``, a
    ``.zarr`` folder whose attributes hold ``rnnjac_version``, a regular figure file that starts with its format's
    signature. Never a symbolic link (not even to such a file), a FIFO, socket or device, a file of another kind,
    a plain folder, the current folder, the home folder or a folder that contains either. Refusals raise
    ``ValueError`` (``IsADirectoryError`` for folders) and delete nothing.

Temporary names
    New data is written to ``.NAME.rnnjac-HOST-PID-XXXXXXXX.tmp`` in the target's folder; during the replacement of
    a ``.zarr`` folder the old one is moved aside to ``.NAME.rnnjac-HOST-PID-XXXXXXXX.old``. Such names are
    *stale* when their process (on this machine) no longer runs, or when they were written on another machine more
    than a day ago. Each check of a target removes the stale temporaries of that target, and renames a stale
    ``.old`` back when the target is missing (a replacement killed between its two renames): the old store returns.

Permissions
    As a plain ``open()``/``mkdir()`` would give: files ``0o666 & ~umask``, folders ``0o777 & ~umask``.

Interruptions and failures
    While a write runs on the main thread, SIGINT and SIGTERM are recorded instead of acted on (HDF5 and xarray
    swallow an exception raised inside their C code or their clean-up, so an immediate Ctrl-C could be lost and the
    file written anyway). When the write ends, a recorded signal aborts it: the temporary is removed, the target is
    left exactly as it was, and the signal is delivered again to the handler that was in force (Ctrl-C: a
    ``KeyboardInterrupt``; SIGTERM: the program's handler, by default the end of the process). A signal that
    arrives after the final rename is delivered the same way, with the new target complete. An exception raised by
    the write (``OSError`` such as a full disk, a bug) also removes the temporary and leaves the target as it was.
    Only a SIGKILL or a power loss can leave a temporary behind; the next check of the same target removes it.
    netCDF files are serialised in memory and then written with plain ``os.write`` calls, so a full disk is an
    ordinary ``OSError`` (HDF5 crashes in its clean-up after a failed write to disk).

A plain ``KeyboardInterrupt`` raised by these functions means that nothing was written and existing files are
unchanged; :class:`Interrupted` (a ``KeyboardInterrupt`` subclass) carries a one-line message saying what was kept.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from ._version import __version__

__all__ = [
    "DATASET_SUFFIXES",
    "FIGURE_SUFFIXES",
    "Interrupted",
    "atomic_write",
    "check_output",
    "check_outputs",
    "open_dataset",
    "remove_stale_temps",
    "save",
    "save_figure",
]

log = logging.getLogger(__name__)

DATASET_SUFFIXES = (".nc", ".zarr")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
_ALL_SUFFIXES = DATASET_SUFFIXES + FIGURE_SUFFIXES
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".nc": _HDF5_MAGIC}
#: a temporary written on another machine is stale after this many seconds
STALE_FOREIGN_S = 24 * 3600
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.rnnjac-(?P<host>\w+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})\.(?P<kind>tmp|old)$")
_active: set[str] = set()  # temporaries this process is writing right now (never stale)
_active_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` whose ``str()`` says, in one line, what was kept on disk and how to resume."""


# ----------------------------------------------------------------------------- temporaries
def _host() -> str:
    name = socket.gethostname().split(".")[0]
    return re.sub(r"\W", "_", name)[:32] or "host"


def _temp_path(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.rnnjac-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def _is_stale(entry: Path, match: re.Match) -> bool:
    with _active_lock:
        if str(entry) in _active:
            return False
    if match["host"] == _host():
        pid = int(match["pid"])
        return pid == os.getpid() or not _pid_alive(pid)
    try:
        return time.time() - entry.lstat().st_mtime > STALE_FOREIGN_S
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _stale(folder: Path, name: str | None = None) -> list[tuple[Path, re.Match]]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match and (name is None or match["name"] == name) and _is_stale(Path(entry.path), match):
            found.append((Path(entry.path), match))
    return found


def _tidy(path: Path) -> None:
    """Recover an interrupted folder swap of ``path`` and remove its stale temporaries."""
    stale = _stale(path.parent, path.name)
    asides = sorted((p for p, m in stale if m["kind"] == "old"), key=lambda p: p.lstat().st_mtime, reverse=True)
    if asides and not os.path.lexists(path):
        os.rename(asides.pop(0), path)
        log.warning("restored %s: its replacement had been interrupted", path)
    for p in [p for p, m in stale if m["kind"] == "tmp"] + asides:
        _remove(p)
        log.info("removed the stale temporary %s", p)


def remove_stale_temps(folder) -> None:
    """Recover interrupted swaps and remove stale rnnjac temporaries of every name in ``folder``.

    Examples
    --------
    >>> import tempfile
    >>> remove_stale_temps(tempfile.mkdtemp())
    """
    for name in sorted({m["name"] for _, m in _stale(Path(folder))}):
        _tidy(Path(folder) / name)


# ----------------------------------------------------------------------------- checks
def _names(suffixes: Iterable[str]) -> str:
    s = list(suffixes)
    return ", ".join(s[:-1]) + " or " + s[-1] if len(s) > 1 else s[0]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _special_folder(path: Path) -> str | None:
    """Name the protected folder that ``path`` is (current, home or one containing them), else None."""
    target = path.resolve()
    protected = [("the current folder", Path.cwd().resolve())]
    try:
        protected.append(("the home folder", Path.home().resolve()))
    except RuntimeError:  # no home folder known
        pass
    for label, folder in protected:
        if target == folder:
            return label
        if target in folder.parents:
            return f"a folder that contains {label}"
    return None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _is_rnnjac_netcdf(path: Path) -> bool:
    if not _starts_with(path, _HDF5_MAGIC):
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "rnnjac_version" in f.attrs
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return False


def _is_rnnjac_zarr(path: Path) -> bool:
    for meta, pick in ((".zattrs", lambda d: d), ("zarr.json", lambda d: d.get("attributes", {}))):
        try:
            attrs = pick(json.loads((path / meta).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(attrs, dict) and "rnnjac_version" in attrs:
            return True
    return False


def _is_figure(path: Path, suffix: str) -> bool:
    if suffix in _MAGIC:
        return _starts_with(path, _MAGIC[suffix])
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.lstrip().startswith((b"<?xml", b"<svg")) and b"<svg" in head


def _check_replaceable(path: Path, st: os.stat_result) -> None:
    refuse = "refusing to replace it; remove it yourself or choose another name"
    suffix = path.suffix.lower()
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(
            f"{path} is a symbolic link; rnnjac replaces only files it wrote itself, never a link; {refuse}"
        )
    if suffix == ".zarr":
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{path} is not a folder, so not a zarr store written by rnnjac; {refuse}")
        if not _is_rnnjac_zarr(path):
            raise IsADirectoryError(
                f"{path} is a folder but not a zarr store written by rnnjac (no rnnjac_version in its metadata); "
                + refuse
            )
        return
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, socket or device); {refuse}")
    if suffix == ".nc":
        if not _is_rnnjac_netcdf(path):
            raise ValueError(f"{path} is not a netCDF file written by rnnjac (no rnnjac_version attribute); {refuse}")
    elif not _is_figure(path, suffix):
        raise ValueError(f"{path} is not a {suffix[1:].upper()} figure (its first bytes do not say so); {refuse}")


def _check(path, overwrite: bool, suffixes: tuple[str, ...], *, tidy: bool = True) -> Path:
    path = Path(path)
    special = _special_folder(path)
    if special:
        raise IsADirectoryError(f"{path} is {special}; an output must be a file name ending in {_names(suffixes)}")
    suffix = path.suffix.lower()
    st = _lstat(path)
    if st is not None and stat.S_ISDIR(st.st_mode) and suffix != ".zarr":
        raise IsADirectoryError(f"{path} is a folder; an output must be a file name ending in {_names(suffixes)}")
    if suffix not in suffixes:
        raise ValueError(f"the output {path} must end in {_names(suffixes)}; got {suffix or 'no suffix'}")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"output folder {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {parent} is not writable")
    if tidy:
        _tidy(path)
        st = _lstat(path)
    if st is not None:
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        _check_replaceable(path, st)
    if suffix == ".zarr":
        try:
            import zarr  # noqa: F401
        except ImportError as err:
            raise ImportError("writing .zarr needs the zarr package: pip install 'rnnjac[sweep]'") from err
    return path


def check_output(path, *, overwrite: bool = False, kind: str | None = None) -> Path:
    """Check, before any work, that ``path`` can be written; return it as a ``Path``.

    The kind comes from the suffix: dataset ``.nc``/``.zarr``, figure ``.png``/``.pdf``/``.svg``. Also recovers an
    interrupted replacement of ``path`` and removes its stale temporaries (see the module's rules).

    Parameters
    ----------
    path : str or Path
        The output.
    overwrite : bool
        Allow replacing an existing output, but only one that rnnjac wrote itself.
    kind : {"dataset", "figure"}, optional
        What the caller will write there: only that kind's suffixes are accepted (default: either kind).

    Raises
    ------
    ValueError
        Another suffix, or an existing target that rnnjac did not write (symlink, FIFO, foreign file).
    IsADirectoryError
        A plain folder, the current or home folder.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    FileNotFoundError, NotADirectoryError, PermissionError
        The output folder is missing, not a folder or not writable.

    Examples
    --------
    >>> import tempfile, os
    >>> check_output(os.path.join(tempfile.mkdtemp(), "spectra.nc"), kind="dataset").name
    'spectra.nc'
    """
    return _check(path, overwrite, _suffixes(kind))


def _suffixes(kind: str | None) -> tuple[str, ...]:
    kinds = {None: _ALL_SUFFIXES, "dataset": DATASET_SUFFIXES, "figure": FIGURE_SUFFIXES}
    if kind not in kinds:
        raise ValueError(f"kind must be 'dataset', 'figure' or None; got {kind!r}")
    return kinds[kind]


def check_outputs(paths, *, overwrite: bool = False, kind: str | None = None) -> list[Path]:
    """:func:`check_output` (of the given ``kind``) for several outputs, all checked before any is written;
    duplicates are refused.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> [p.name for p in check_outputs([os.path.join(d, "a.nc"), os.path.join(d, "a.png")])]
    ['a.nc', 'a.png']
    """
    paths = [Path(p) for p in paths]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"the same output is given twice: {seen[key]} and {p}")
        seen[key] = p
    return [check_output(p, overwrite=overwrite, kind=kind) for p in paths]


# ----------------------------------------------------------------------------- writing
def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _fsync(path, *, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return  # some systems cannot open folders; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def _finish(tmp: Path, folder: bool) -> None:
    """Permissions as ``open()``/``mkdir()`` give them, then everything on disk."""
    mask = _umask()
    if folder:
        for root, dirs, files in os.walk(tmp):
            for f in files:
                _fsync(os.path.join(root, f))
            for d in dirs:
                _fsync(os.path.join(root, d), folder=True)
        os.chmod(tmp, 0o777 & ~mask)
        _fsync(tmp, folder=True)
    else:
        os.chmod(tmp, 0o666 & ~mask)
        _fsync(tmp)


def _commit(tmp: Path, path: Path, folder: bool) -> None:
    if not folder or not os.path.lexists(path):
        os.replace(tmp, path)
    else:  # a folder cannot be renamed over a non-empty one: move the old one aside, then swap
        aside = _temp_path(path, "old")
        with _active_lock:
            _active.add(str(aside))
        try:
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            with _active_lock:
                _active.discard(str(aside))
    _fsync(path.parent, folder=True)


@contextmanager
def _deferred_signals(pending: list):
    """Record SIGINT/SIGTERM in ``pending`` instead of acting on them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _write_checked(path: Path, write: Callable[[Path], object], overwrite: bool, suffixes) -> Path:
    folder = path.suffix.lower() == ".zarr"
    tmp = _temp_path(path, "tmp")
    pending: list[int] = []
    with _active_lock:
        _active.add(str(tmp))
    try:
        with _deferred_signals(pending):
            try:
                write(tmp)
                if not os.path.lexists(tmp):
                    raise RuntimeError(f"the writer of {path} did not create its temporary file {tmp}")
                _finish(tmp, folder)
                if not pending:
                    _check(path, overwrite, suffixes, tidy=False)  # what is there now may still be replaced
                    if not pending:
                        _commit(tmp, path, folder)
            finally:
                if os.path.lexists(tmp):
                    _remove(tmp)
    finally:
        with _active_lock:
            _active.discard(str(tmp))
        if pending:
            signal.raise_signal(pending[0])  # to the handler in force before the write
    return path


def atomic_write(path, write: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Write an output through ``write(tmp)`` so that it appears complete or not at all.

    ``write`` must create ``tmp`` (a file, or a folder for ``.zarr``), a temporary in the target's folder. Then the
    permissions are set as ``open()``/``mkdir()`` would set them, the data are synced to disk and the temporary
    replaces the target atomically (a folder is swapped with a rename-aside). Interruptions and failures at any
    point leave the old target untouched or the complete new one, and no temporary (see the module's rules).

    Parameters
    ----------
    path : str or Path
        The target, checked with :func:`check_output` first.
    write : callable
        ``write(tmp_path)``; its return value is ignored.
    overwrite : bool
        Allow replacing an existing target that rnnjac wrote.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "f.svg")
    >>> _ = atomic_write(target, lambda tmp: tmp.write_text("<svg></svg>"))
    >>> open(target).read()
    '<svg></svg>'
    """
    return _write_checked(check_output(path, overwrite=overwrite), write, overwrite, _ALL_SUFFIXES)


def _write_bytes(tmp: Path, data) -> None:
    """Write ``data`` to a new file with plain ``os.write`` calls (a full disk is an ``OSError``)."""
    view = memoryview(data).cast("B")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + (1 << 24)])
    finally:
        os.close(fd)


def save(ds: xr.Dataset, path, *, overwrite: bool = False) -> Path:
    """Write ``ds`` atomically to netCDF (``.nc``, h5netcdf) or a zarr v2 store (``.zarr``).

    The file appears complete or not at all; ``overwrite=True`` replaces only a file rnnjac wrote (see
    :func:`check_output`). ``rnnjac_version`` is added to the attributes when missing, so the file can be replaced
    later. A netCDF file is serialised in memory first (memory for one more copy of the data).

    Examples
    --------
    >>> import torch, rnnjac, tempfile, os
    >>> ds = rnnjac.spectra(torch.nn.GRU(2, 4, batch_first=True), torch.randn(1, 5, 2))
    >>> path = rnnjac.save(ds, os.path.join(tempfile.mkdtemp(), "s.nc"))
    >>> rnnjac.open_dataset(path).singular_values.shape
    (1, 5, 4)
    """
    path = _check(path, overwrite, DATASET_SUFFIXES)
    ds = ds.copy(deep=False)
    ds.attrs = {**ds.attrs}
    ds.attrs.setdefault("rnnjac_version", __version__)
    if path.suffix.lower() == ".zarr":
        # zarr format 2: string coordinates (``part``) have no stable v3 encoding yet
        def write(tmp):
            with _local_dask():
                try:
                    ds.to_zarr(tmp, mode="w-", zarr_format=2, consolidated=True)
                except BaseException:
                    _settle_zarr()  # before the temporary store is removed
                    raise
    else:

        def write(tmp):
            with _local_dask():
                data = ds.to_netcdf(engine="h5netcdf")
            _write_bytes(tmp, data)

    return _write_checked(path, write, overwrite, DATASET_SUFFIXES)


def _settle_zarr(timeout: float = 60.0) -> None:
    """Wait until no write is in flight on zarr's I/O event loop.

    zarr 3 writes a store's keys concurrently (``asyncio.gather`` on its own loop thread). When one write fails,
    the error reaches the caller while the sibling writes go on, and they can re-create files in the temporary
    store after it was removed. zarr 2 writes synchronously and needs no wait.
    """
    try:
        from zarr.core.sync import sync
    except ImportError:
        return

    async def drain():
        me = asyncio.current_task()
        deadline = time.monotonic() + timeout
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.wait(others, timeout=left)

    try:
        sync(drain())
    except Exception as err:  # noqa: BLE001 - the original write error is what the caller must see
        log.debug("could not wait for zarr's pending writes: %s", err)


@contextmanager
def _local_dask():
    """Serialise in this thread even on a Dask worker: xarray's distributed write lock fails for in-memory files."""
    try:
        import dask
    except ImportError:
        yield
        return
    with dask.config.set(scheduler="synchronous"):
        yield


def save_figure(fig, path, *, overwrite: bool = False, dpi: int = 130) -> Path:
    """Write a matplotlib figure atomically as ``.png``, ``.pdf`` or ``.svg`` (from the suffix).

    Examples
    --------
    >>> import matplotlib.pyplot as plt, tempfile, os
    >>> fig, ax = plt.subplots()
    >>> save_figure(fig, os.path.join(tempfile.mkdtemp(), "f.png")).suffix
    '.png'
    >>> plt.close(fig)
    """
    path = _check(path, overwrite, FIGURE_SUFFIXES)

    def write(tmp):
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix[1:].lower(), dpi=dpi)
        _write_bytes(tmp, buf.getbuffer())

    return _write_checked(path, write, overwrite, FIGURE_SUFFIXES)


# ----------------------------------------------------------------------------- reading
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def open_dataset(path) -> xr.Dataset:
    """Read a netCDF file or zarr store (as :func:`save` writes them) fully into memory; the file is closed after.

    A missing, unreadable or foreign file raises a one-line error that names it (``FileNotFoundError``,
    ``PermissionError``, ``IsADirectoryError`` or ``ValueError``).

    Examples
    --------
    >>> import rnnjac, tempfile, os, xarray as xr
    >>> path = rnnjac.save(xr.Dataset({"x": ("a", [1.0, 2.0])}), os.path.join(tempfile.mkdtemp(), "x.nc"))
    >>> rnnjac.open_dataset(path).x.values.tolist()
    [1.0, 2.0]
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        if path.suffix.lower() != ".zarr" and not any((path / m).exists() for m in (".zgroup", "zarr.json")):
            raise IsADirectoryError(f"{path} is a folder, not a netCDF file or zarr store")
        try:
            with xr.open_zarr(path) as ds:
                return ds.load()
        except Exception as err:  # noqa: BLE001 - one line that names the file
            raise ValueError(f"{path} could not be read as a zarr store: {_one_line(err)}") from None
    if path.suffix.lower() == ".zarr":
        raise ValueError(f"{path} is not a zarr store (not a folder)")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, socket or device)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path} is not readable (permission denied)")
    if not _starts_with(path, _HDF5_MAGIC):
        raise ValueError(f"{path} is not a netCDF-4 file (its first bytes are not the HDF5 signature)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            return ds.load()
    except Exception as err:  # noqa: BLE001 - one line that names the file
        raise ValueError(f"{path} could not be read as netCDF: {_one_line(err)}") from None
