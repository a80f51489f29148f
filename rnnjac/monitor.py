"""Lyapunov spectra while a network learns: a helper to call from a plain PyTorch training loop.

:class:`SpectrumMonitor` measures, every ``every`` training steps, the top-k Lyapunov exponents, the
Kaplan-Yorke dimension, the entropy bound and quantiles of the per-step singular values of ``J_t`` on fixed
probe inputs, and keeps them as one Dataset in the layout of a checkpoint sweep (a ``checkpoint`` dim with a
``training_step`` coordinate), so that :mod:`rnnjac.plot` and ``rnnjac plot`` draw it like a sweep.
:class:`rnnjac.lightning.SpectrumCallback` runs it inside a Lightning ``Trainer``.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import nn

from ._submodule import resolve

__all__ = ["SpectrumMonitor"]

SWEEP_DIM = "checkpoint"
DEFAULT_K = 5


def _quantile_name(q: float) -> str:
    """``0.1`` -> ``"q10"``, ``0.125`` -> ``"q12_5"``: a name part for variables and logged scalars."""
    return "q" + f"{round(100 * q, 6):g}".replace(".", "_")


def _check_options(every, k, warmup, tangent_warmup, quantiles, callback) -> tuple[float, ...]:
    for name, value, low in (("every", every, 1), ("warmup", warmup, 0), ("tangent_warmup", tangent_warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be None or an integer >= 1; got {k!r}")
    qs = tuple(float(q) for q in quantiles)
    if any(not 0.0 <= q <= 1.0 for q in qs) or len({_quantile_name(q) for q in qs}) != len(qs):
        raise ValueError(f"quantiles must be distinct numbers in [0, 1]; got {tuple(quantiles)!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, scalars); got {type(callback).__name__}")
    return qs


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _to_model(value, model: nn.Module):
    """A tensor (or tuple of them) on the device, and in the floating dtype, of ``model``'s first parameter."""
    p = next(model.parameters(), None)
    if p is None or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_to_model(v, model) for v in value)
    if isinstance(value, torch.Tensor):
        return value.to(device=p.device, dtype=p.dtype if value.is_floating_point() else value.dtype)
    return value


class SpectrumMonitor:
    """Lyapunov exponents, Kaplan-Yorke dimension and singular-value quantiles over training.

    Call :meth:`step` once per training step (it measures at steps 0, ``every``, ``2 every``, ...). Each
    measurement runs under ``torch.no_grad()`` with the model in ``eval()`` mode (every submodule's mode is
    restored afterwards) on the same probe inputs and the same initial tangent basis (``generator_seed``),
    so that changes between measurements come from the weights alone.

    Parameters
    ----------
    inputs : Tensor or array
        Fixed probe inputs: what ``model(inputs)`` takes when the model is a larger module (the recurrent
        submodule is fed what the model feeds it, see ``submodule``), or ``(B, T, I)`` in the recurrent
        module's own layout when the model is the module itself. Moved to the model's device and dtype.
    every : int
        Steps between measurements.
    k : int, optional
        Number of exponents (default ``min(5, D)``).
    submodule : str or nn.Module, optional
        The recurrent submodule of a larger model (default: its only ``nn.RNN``/``GRU``/``LSTM`` or cell).
    h0 : optional
        Initial state of the recurrent module, in its own format (default: what the model passes, or zeros).
    warmup, tangent_warmup : int
        As in :func:`rnnjac.spectra`; the singular-value quantiles skip the ``warmup`` steps.
    quantiles : sequence of float
        Quantiles, over the probe batch and the steps ``t > warmup`` (see ``sv_steps``), of each singular
        value of ``J_t`` (``()``: no singular values are computed).
    callback : callable, optional
        ``callback(step, scalars)`` after each measurement (``scalars`` as :meth:`step` returns them).
    generator_seed : int
        Seed of the initial tangent basis, the same at every measurement.
    keep_singular_values : bool
        Also keep every per-step singular value (``(B, T, D)`` per measurement: memory grows with the number
        of measurements), which the ``singular_values`` plot needs.
    sv_steps : int, optional
        Take the quantiles over the steps ``warmup + 1 .. warmup + sv_steps`` only (default: every step after
        ``warmup``). The per-step SVDs dominate the cost of a measurement, so this bounds it; the exponents
        still use every step.

    Examples
    --------
    >>> import torch, rnnjac
    >>> from rnnjac.monitor import SpectrumMonitor
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GRU(3, 8, batch_first=True))
    >>> probe = torch.randn(4, 60, 2, generator=torch.Generator().manual_seed(0))
    >>> monitor = SpectrumMonitor(probe, every=10, k=3, warmup=10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(21):
    ...     _ = monitor.step(model, step)  # before the update: step 0 is the initial model
    ...     loss = model(probe)[0].pow(2).mean()
    ...     opt.zero_grad(); loss.backward(); opt.step()
    >>> ds = monitor.dataset()
    >>> ds.training_step.values.tolist(), ds.lyapunov_exponents.dims
    ([0, 10, 20], ('checkpoint', 'batch', 'le_index'))
    >>> sorted(monitor.last)[:3]
    ['kaplan_yorke_dimension', 'ks_entropy', 'lyapunov_exponent_1']
    """

    def __init__(
        self,
        inputs,
        *,
        every: int = 50,
        k: int | None = None,
        submodule=None,
        h0=None,
        warmup: int = 0,
        tangent_warmup: int = 0,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        callback: Callable[[int, dict], object] | None = None,
        generator_seed: int = 0,
        keep_singular_values: bool = False,
        sv_steps: int | None = None,
    ):
        self.quantiles = _check_options(every, k, warmup, tangent_warmup, quantiles, callback)
        if sv_steps is not None and (isinstance(sv_steps, bool) or not isinstance(sv_steps, int) or sv_steps < 1):
            raise ValueError(f"sv_steps must be None (every step) or an integer >= 1; got {sv_steps!r}")
        self.sv_steps = sv_steps
        self.inputs = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
        self.h0, self.submodule = h0, submodule
        self.every, self.k, self.warmup, self.tangent_warmup = int(every), k, int(warmup), int(tangent_warmup)
        self.callback, self.generator_seed = callback, int(generator_seed)
        self.keep_singular_values = bool(keep_singular_values)
        self._rows: dict[int, xr.Dataset] = {}
        #: the scalars of the latest measurement (empty before the first)
        self.last: dict[str, float] = {}

    @property
    def steps(self) -> list[int]:
        """The training steps measured so far, ascending."""
        return sorted(self._rows)

    def step(self, model: nn.Module, step: int) -> dict[str, float] | None:
        """Measure when ``step`` is a multiple of ``every`` and not measured yet; returns the scalars or None.

        Scalars: ``lyapunov_exponent_1..k`` and ``kaplan_yorke_dimension``, ``ks_entropy`` (medians over the
        probe batch), ``max_singular_value_q10`` ... (the quantiles of the largest singular value of ``J_t``).
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0 (the training step); got {step!r}")
        if step % self.every or int(step) in self._rows:
            return None
        return self.measure(model, int(step))

    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        """Measure now (replacing an earlier measurement at the same ``step``); returns the scalars."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the model being trained); got {type(model).__name__}")
        start = time.perf_counter()
        modes = _modes(model)
        try:
            model.eval()
            ds, sv = self._spectra(model)
        finally:
            for m, mode in modes.items():
                m.training = mode
        row = self._row(ds, sv, time.perf_counter() - start)
        self._rows[int(step)] = row
        self.last = self._scalars(row)
        if self.callback is not None:
            self.callback(int(step), dict(self.last))
        return dict(self.last)

    def _spectra(self, model: nn.Module) -> tuple[xr.Dataset, xr.DataArray | None]:
        """The spectra of one measurement, and the singular values ``(batch, time, sv_index)`` of the steps
        ``warmup + 1 .. warmup + sv_steps`` for the quantiles (None without quantiles)."""
        from ._spectra import spectra  # imported on first use: importing this module stays light

        module, x, h0, batch_first, attrs = resolve(
            model, _to_model(self.inputs, model), _to_model(self.h0, model), submodule=self.submodule
        )
        k = min(DEFAULT_K, _state_size(module)) if self.k is None else self.k
        time_dim = (
            1 if x.dim() == 3 and (getattr(module, "batch_first", True) if batch_first is None else batch_first) else 0
        )
        # the singular values of J_t, t = warmup+1 .. warmup+sv_steps, alone: restart from the recorded s_warmup
        end = None if self.sv_steps is None else self.warmup + self.sv_steps
        split = bool(self.quantiles) and end is not None and end < x.shape[time_dim]
        with torch.no_grad():
            ds = spectra(
                module,
                x,
                h0,
                batch_first=batch_first,
                singular_values=self.keep_singular_values or (bool(self.quantiles) and not split),
                lyapunov=True,
                k=k,
                warmup=self.warmup,
                tangent_warmup=self.tangent_warmup,
                keep_states=split and self.warmup > 0,
                generator=torch.Generator().manual_seed(self.generator_seed),
                attrs={"submodule": attrs.get("submodule", ""), **self._attrs()},
            )
            if not self.quantiles:
                return ds, None
            if not split:
                return ds, ds.singular_values.isel(time=slice(self.warmup, None))
            if self.warmup > 0:  # the flat full state s_warmup, (B, D) (unbatched: (D,))
                s = torch.as_tensor(ds.states.values[:, self.warmup - 1], dtype=x.dtype, device=x.device)
                h0 = s[0] if x.dim() == 2 else s
                ds = ds.drop_vars("states")
            part = x.narrow(time_dim, self.warmup, self.sv_steps)
            sv = spectra(module, part, h0, batch_first=batch_first, lyapunov=False).singular_values
        return ds, sv

    def _attrs(self) -> dict:
        return {
            "monitor_every": self.every,
            "monitor_quantiles": json.dumps(list(self.quantiles)),
            "monitor_submodule_requested": self.submodule if isinstance(self.submodule, str) else "",
            "monitor_sv_steps": -1 if self.sv_steps is None else self.sv_steps,
        }

    def _row(self, ds: xr.Dataset, sv: xr.DataArray | None, seconds: float) -> xr.Dataset:
        """The reduced Dataset of one measurement (no sweep dim yet)."""
        keep = ["lyapunov_exponents", "kaplan_yorke_dimension", "ks_entropy"]
        if self.keep_singular_values:
            keep.append("singular_values")
        row = ds[keep]
        if sv is not None:
            values = sv.values.reshape(-1, sv.sizes["sv_index"])
            qs = np.quantile(values, self.quantiles, axis=0).astype(values.dtype)
            where = f"over the batch and the steps t = {self.warmup + 1}..{self.warmup + sv.sizes['time']}"
            for q, values in zip(self.quantiles, qs, strict=True):
                row[f"singular_values_{_quantile_name(q)}"] = xr.Variable(
                    "sv_index",
                    values,
                    {"long_name": f"{100 * q:g}% quantile {where} of the singular values of J_t", "units": "1"},
                )
            row = row.assign_coords(sv_index=np.arange(qs.shape[1]))
        row["monitor_seconds"] = xr.Variable(
            (), seconds, {"long_name": "wall-clock time of the measurement", "units": "s"}
        )
        return row

    def _scalars(self, row: xr.Dataset) -> dict[str, float]:
        le = row.lyapunov_exponents.median("batch").values
        out = {f"lyapunov_exponent_{i + 1}": float(v) for i, v in enumerate(le)}
        out["kaplan_yorke_dimension"] = float(row.kaplan_yorke_dimension.median())
        out["ks_entropy"] = float(row.ks_entropy.median())
        for q in self.quantiles:
            out[f"max_singular_value_{_quantile_name(q)}"] = float(row[f"singular_values_{_quantile_name(q)}"][0])
        return out

    def dataset(self) -> xr.Dataset:
        """The measurements so far, along a ``checkpoint`` dim with a ``training_step`` coordinate.

        The layout of a checkpoint sweep (:func:`rnnjac.analyze_checkpoints`) without the file coordinates:
        every sweep plot draws it, and ``ds.swap_dims(checkpoint="training_step")`` indexes it by step.
        """
        if not self._rows:
            raise ValueError("no measurement yet: call monitor.step(model, step) during training first")
        steps = self.steps
        rows = [self._rows[s].expand_dims(SWEEP_DIM).assign_coords(training_step=(SWEEP_DIM, [s])) for s in steps]
        out = xr.concat(rows, dim=SWEEP_DIM, coords="different", compat="equals", combine_attrs="override")
        out.attrs = {**self._rows[steps[-1]].attrs}
        out.attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        out["training_step"].attrs.update(long_name="training step of the measurement", units="step")
        return out

    def save(self, path, *, overwrite: bool = False):
        """Write :meth:`dataset` atomically (``.nc`` or ``.zarr``, see :func:`rnnjac.save`); returns the path."""
        from ._io import save

        return save(self.dataset(), path, overwrite=overwrite)

    def __repr__(self) -> str:
        return f"SpectrumMonitor(every={self.every}, k={self.k}, measured steps={self.steps})"


def _state_size(module: nn.Module) -> int:
    """D, the size of the full state of an ``nn.RNN``/``GRU``/``LSTM`` or cell (``[h; c]`` per LSTM layer)."""
    lstm = isinstance(module, (nn.LSTM, nn.LSTMCell))
    hidden = int(getattr(module, "hidden_size"))  # noqa: B009 (nn.Module attributes are untyped)
    if isinstance(module, nn.RNNCellBase):
        return hidden * (2 if lstm else 1)
    h_out = int(getattr(module, "proj_size", 0)) or hidden
    return int(getattr(module, "num_layers")) * (h_out + (hidden if lstm else 0))  # noqa: B009
