"""What the commands share for their outputs: checkpoint globs, tables, atomic writes that record what
landed, output folders, and the figures of a Dataset (:func:`write_plots`)."""

from __future__ import annotations

import glob
import os
import shlex
from contextlib import contextmanager
from pathlib import Path


def _expand(patterns) -> list[str]:
    out = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise FileNotFoundError(f"no checkpoint matches {pat!r}")
        out += hits
    for path in out:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    return out


def _command_line(argv) -> str:
    return shlex.join(["rnnjac", *argv])


def _print_table(rows, headers) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=False))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(f"{str(x):<{w}}" for x, w in zip(r, widths, strict=False)))


def _open_spectra(path):
    """Read a spectra file; any failure is one line that names the file."""
    from .._io import open_dataset

    try:
        return open_dataset(path)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the reader's own messages often lack the file name
        msg = " ".join(str(err).split()) or type(err).__name__
        if str(path) in msg:
            raise
        raise ValueError(f"{path} is not a readable spectra file (.nc or .zarr written by rnnjac): {msg}") from err


def _identity(path) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _write(save, obj, path, *, overwrite: bool, written: list) -> Path:
    """``save(obj, path, overwrite=...)`` (an atomic ``rnnjac._io`` writer), recording ``path`` in ``written``
    once it is in place, also when an interrupt arrives right after the final rename."""
    before = _identity(path)
    try:
        save(obj, path, overwrite=overwrite)
    except KeyboardInterrupt:
        if _identity(path) not in (None, before):
            written.append(Path(path))
        raise
    except OSError as err:  # e.g. a full disk: os.write's error does not say which output
        if err.errno is None or err.filename is not None or not err.strerror:
            raise
        raise type(err)(err.errno, f"{err.strerror} (writing {path}; it is unchanged)") from err
    written.append(Path(path))
    return Path(path)


@contextmanager
def _output_folder(path: Path):
    """Create the output folder ``path`` if missing; remove it again (if still empty) when the command fails."""
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} exists and is not a folder")
    created = [p for p in [path, *path.parents] if not os.path.lexists(p)]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first, and only while empty
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def plot_targets(names, out_dir, fmt: str = "png", stem: str = "") -> dict[str, Path]:
    """The figure file of each plot name (and ``summary``) that :func:`write_plots` writes.

    Examples
    --------
    >>> sorted(p.name for p in plot_targets(["lyapunov_spectrum"], "figs", "svg", "s_").values())
    ['s_lyapunov_spectrum.svg', 's_summary.svg']
    """
    return {n: Path(out_dir) / f"{stem}{n}.{fmt}" for n in [*names, "summary"]}


def write_plots(ds, out_dir, fmt: str = "png", overwrite: bool = False, stem: str = "", written=None) -> list[Path]:
    """One figure per available plot plus ``summary``; returns the paths written.

    Every target is checked (``rnnjac._io.check_outputs``) and every figure drawn before the first
    file is written, so a refusal or a plotting error writes nothing; each file is written atomically.
    Paths are appended to ``written`` (a list) as they land.

    Examples
    --------
    >>> import tempfile, torch, rnnjac
    >>> ds = rnnjac.spectra(torch.nn.GRU(2, 3, batch_first=True), torch.randn(1, 6, 2))
    >>> paths = write_plots(ds, tempfile.mkdtemp(), "svg", stem="s_")
    >>> paths[-1].name
    's_summary.svg'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .. import _io, plot

    names = plot.available(ds)
    if not names:
        raise ValueError("nothing to plot: the file has no spectra variables")
    targets = plot_targets(names, out_dir, fmt, stem)
    _io.check_outputs(list(targets.values()), overwrite=overwrite, kind="figure")
    figures = {}
    try:
        for name in names:
            figures[name] = plot.PLOTS[name](ds).figure
        figures["summary"] = plot.summary(ds)
        written = [] if written is None else written
        return [
            _write(_io.save_figure, figures[name], t, overwrite=overwrite, written=written)
            for name, t in targets.items()
        ]
    finally:
        for fig in figures.values():
            plt.close(fig)
