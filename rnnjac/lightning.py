"""Lyapunov spectra during a PyTorch Lightning ``Trainer.fit``: :class:`SpectrumCallback`.

Needs Lightning (``pip install 'rnnjac[lightning]'``); the rest of rnnjac does not. The callback runs a
:class:`rnnjac.monitor.SpectrumMonitor` on the ``LightningModule`` and sends its scalars to every logger of
the trainer (TensorBoard, CSV, Weights & Biases... through ``log_metrics``, at the training step measured).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised by a test that hides Lightning
    raise ImportError(
        "rnnjac.lightning needs PyTorch Lightning (lightning>=2.1), an optional dependency: "
        "pip install 'rnnjac[lightning]'"
    ) from err

from .monitor import SpectrumMonitor

__all__ = ["SpectrumCallback"]

log = logging.getLogger("rnnjac")


class SpectrumCallback(Callback):
    """Measure Lyapunov spectra every ``every`` optimizer steps of a fit, log them, save them at the end.

    Measures at the start of training (step 0, or the resumed step when it is a multiple of ``every``) and
    after each batch whose ``trainer.global_step`` is a multiple of ``every`` (once per step, also with
    gradient accumulation), on the global-zero process only. Each scalar of :meth:`SpectrumMonitor.step`
    is logged as ``prefix + name`` (``rnnjac/lyapunov_exponent_1``, ...) through every logger of the
    trainer at ``step=trainer.global_step``. With ``save_to``, the Dataset is written at the end of the fit
    (and, with what was measured so far, when the fit stops on an exception or an interruption); the output
    is checked when the fit starts, so an existing file without ``overwrite=True`` stops it before training.

    Parameters
    ----------
    inputs : Tensor or array
        Fixed probe inputs, as ``LightningModule.forward`` takes them (moved to the module's device).
    every : int
        Optimizer steps between measurements.
    k : int, optional
        Number of exponents (default ``min(5, D)``).
    submodule : str or nn.Module, optional
        The recurrent submodule (default: the module's only ``nn.RNN``/``GRU``/``LSTM`` or cell).
    save_to : str or Path, optional
        ``.nc`` or ``.zarr`` output for the Dataset (see :meth:`SpectrumMonitor.dataset`).
    overwrite : bool
        Replace an existing ``save_to`` written by rnnjac.
    prefix : str
        Prefix of the logged metric names.
    **options
        ``h0``, ``warmup``, ``tangent_warmup``, ``quantiles``, ``callback``, ``generator_seed``,
        ``keep_singular_values`` of :class:`~rnnjac.monitor.SpectrumMonitor`.

    Examples
    --------
    >>> import torch
    >>> from rnnjac.lightning import SpectrumCallback
    >>> probe = torch.randn(8, 200, 3, generator=torch.Generator().manual_seed(0))
    >>> cb = SpectrumCallback(probe, every=50, k=3, warmup=50, save_to="spectra_over_training.nc")
    >>> trainer = lightning.pytorch.Trainer(max_steps=2000, callbacks=[cb])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> cb.dataset().lyapunov_exponents.median("batch")  # doctest: +SKIP
    """

    def __init__(
        self,
        inputs,
        *,
        every: int = 50,
        k: int | None = None,
        submodule=None,
        save_to=None,
        overwrite: bool = False,
        prefix: str = "rnnjac/",
        h0=None,
        warmup: int = 0,
        tangent_warmup: int = 0,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        callback: Callable[[int, dict], object] | None = None,
        generator_seed: int = 0,
        keep_singular_values: bool = False,
    ):
        super().__init__()
        self.monitor = SpectrumMonitor(
            inputs,
            every=every,
            k=k,
            submodule=submodule,
            h0=h0,
            warmup=warmup,
            tangent_warmup=tangent_warmup,
            quantiles=quantiles,
            callback=callback,
            generator_seed=generator_seed,
            keep_singular_values=keep_singular_values,
        )
        self.save_to, self.overwrite, self.prefix = save_to, bool(overwrite), str(prefix)

    def dataset(self):
        """The measurements so far (:meth:`SpectrumMonitor.dataset`)."""
        return self.monitor.dataset()

    def _measure(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        scalars = self.monitor.step(pl_module, step)
        if scalars:
            metrics = {self.prefix + name: value for name, value in scalars.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _save(self) -> None:
        if self.save_to is not None and self.monitor.steps:
            path = self.monitor.save(self.save_to, overwrite=self.overwrite)
            log.info("spectra over training (steps %s) -> %s", self.monitor.steps, path)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.save_to is not None and trainer.is_global_zero:
            from ._io import check_output

            check_output(self.save_to, overwrite=self.overwrite, kind="dataset")

    def on_train_start(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._measure(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._save()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not trainer.is_global_zero:
            return
        try:  # keep what was measured; never hide the exception that stopped the fit
            self._save()
        except Exception as err:  # noqa: BLE001
            log.warning("could not save the spectra measured before the fit stopped: %s", err)
