"""The exceptions and warnings rnnjac raises on purpose.

Every error says what was expected and what was found, in terms of the Python API (keyword names
such as ``nonlinearity=`` or ``unsafe=True``). They subclass the built-in ``ValueError`` /
``UserWarning``, so existing ``except ValueError`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["RnnjacWarning", "ConvergenceWarning", "ConditioningWarning", "NonFiniteError", "CheckpointError"]


class RnnjacWarning(UserWarning):
    """A warning about something the caller can fix.

    Examples: a float32 model checked against float64 finite differences (tolerances widened), or a
    penalty on a model none of whose parameters require grad.

    Examples
    --------
    >>> import warnings, rnnjac
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", rnnjac.errors.RnnjacWarning)  # turn them into errors
    """


class ConvergenceWarning(RnnjacWarning):
    """Some Lyapunov exponents had not settled by the end of the run (a longer run, or more warm-up, helps).

    Warned once per :func:`rnnjac.spectra` / :func:`rnnjac.lyapunov_spectrum` call; the message names the
    exponents and about how many more counted steps they are likely to need (the Dataset's
    ``lyapunov_converged`` and ``lyapunov_more_steps``).

    Examples
    --------
    >>> import warnings, rnnjac
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", rnnjac.ConvergenceWarning)  # silence them (e.g. for quick looks)
    """


class ConditioningWarning(RnnjacWarning):
    """The tangent block grew too ill-conditioned between two QRs: the smaller Lyapunov exponents may be lost.

    With ``reortho_every > 1`` the tangents are multiplied by several Jacobians before each QR; when the
    block's condition number (estimated from the QR's own ``R``, see the README's "Conventions" section) exceeds
    ``1/sqrt(eps)`` of the dtype, the smaller exponents carry rounding errors of that order. Warned once per
    :func:`rnnjac.spectra` / :func:`rnnjac.lyapunov_spectrum` call, naming the exponents at risk; a smaller
    ``reortho_every=`` or ``reortho_every="auto"`` fixes it. The Dataset attribute
    ``lyapunov_max_log10_condition`` records the largest estimate.

    Examples
    --------
    >>> import warnings, rnnjac
    >>> issubclass(rnnjac.errors.ConditioningWarning, rnnjac.RnnjacWarning)
    True
    """


class NonFiniteError(ValueError):
    """NaN or Inf found in weights, inputs, states or Jacobians.

    The message names the first offending step ``t`` (1-based, as in the outputs) or the parameter
    (``weight_hh_l0`` ...).

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(2, 3, batch_first=True)
    >>> try:
    ...     rnnjac.trajectory(rnn, torch.full((1, 4, 2), float("nan")))
    ... except rnnjac.errors.NonFiniteError as err:
    ...     print(err)
    inputs contain NaN/Inf, first at step t=1
    """


class CheckpointError(ValueError):
    """A file is not a usable checkpoint, or the options given do not fit it.

    The message names the file and says what was found (and, where the fix is an option such as
    ``nonlinearity=`` or ``prefix=``, which one).

    Examples
    --------
    >>> import rnnjac, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "junk.pt")
    >>> _ = open(path, "wb").write(b"hello")
    >>> try:
    ...     rnnjac.load_checkpoint(path)
    ... except rnnjac.errors.CheckpointError as err:
    ...     print("not a PyTorch checkpoint" in str(err))
    True
    """
