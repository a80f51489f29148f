"""The step Jacobians ``J_t = dF/ds`` of a batch of steps, and the state layout they are written in.

:class:`Linearization` is one interface with two implementations:

- :class:`FactoredLinearization` (built-in cells, ``method="analytic"``): per-layer coefficients plus
  references to the layers' weights. ``apply`` computes ``J Q`` with shared GEMMs, ``materialize`` forms
  ``J``, ``frobenius_sq`` uses the row-local Gram form where it exists (:mod:`rnnjac._cells`).
- :class:`DenseLinearization`: a materialised ``(N, D, D)``, from ``torch.func.vmap(torch.func.jacrev(step))``
  or a :class:`~rnnjac.CustomCell`'s own closed form.

Both read the state layout from a :class:`StateLayout` (layer-major, ``[h; c]`` inside an LSTM layer, README,
"Conventions": "State vector"), so ``state="h"`` means the same rows and columns in both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch
from torch import Tensor

from ._cells import EYE, CellArch, LayerParams

__all__ = ["DenseLinearization", "FactoredLinearization", "Linearization", "StateLayout"]


@contextmanager
def grad_region():
    """Gradients on and inference mode off, whatever the caller's context (``torch.no_grad()`` or
    ``torch.inference_mode()``), for the parts that differentiate internally. Tensors created under the
    caller's inference mode must pass through :func:`normal` inside the region before entering autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal(t):
    """``t`` itself, or a normal clone of an inference tensor (which autograd cannot save); ``None`` stays."""
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


class StateLayout:
    """Where each layer's ``h`` and ``c`` sit in the flat state vector.

    Parameters
    ----------
    parts : list of list of (str, int)
        Per layer, its parts in order: ``[("h", n_h), ("c", n_c)]`` for an LSTM layer, ``[("h", n)]`` otherwise.

    Examples
    --------
    >>> layout = StateLayout([[("h", 2), ("c", 3)], [("h", 2), ("c", 3)]])
    >>> layout.state_size, layout.h_size, layout.h_index().tolist()
    (10, 4, [0, 1, 5, 6])
    """

    def __init__(self, parts: list[list[tuple[str, int]]]):
        self.parts = parts

    @property
    def state_size(self) -> int:
        return sum(n for layer in self.parts for _, n in layer)

    @property
    def h_size(self) -> int:
        return sum(n for layer in self.parts for p, n in layer if p == "h")

    def size(self, state: str) -> int:
        """``D`` of the chosen state: ``"full"`` or ``"h"`` (h parts only)."""
        return self.state_size if state == "full" else self.h_size

    def unit_coords(self, state: str = "full") -> dict[str, list]:
        """``layer``, ``part``, ``neuron`` labels of the state coordinates."""
        layer, part, neuron = [], [], []
        for li, parts in enumerate(self.parts):
            for name, n in parts:
                if state == "h" and name != "h":
                    continue
                layer += [li] * n
                part += [name] * n
                neuron += list(range(n))
        return {"layer": layer, "part": part, "neuron": neuron}

    def h_index(self, device=None) -> Tensor:
        """Positions of the h coordinates inside the full state."""
        idx: list[int] = []
        off = 0
        for parts in self.parts:
            for name, n in parts:
                if name == "h":
                    idx += range(off, off + n)
                off += n
        return torch.tensor(idx, dtype=torch.long, device=device)

    def top_h_index(self, device=None) -> Tensor:
        """Positions of the top layer's h (what a module outputs, what a readout reads) inside the full state."""
        off = sum(n for layer in self.parts[:-1] for _, n in layer)
        return torch.arange(off, off + self.parts[-1][0][1], device=device)

    def split(self, s: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Full state ``(..., D)`` -> per layer ``(h, c)`` (``c`` is None without a cell state): views from one
        ``torch.split``, whose backward joins the parts' gradients in one pass (a slice per part would zero-fill
        a full-size gradient for each)."""
        return self._split(s, -1, "full", whole=False)

    def split_rows(self, q: Tensor, state: str = "full") -> list[tuple[Tensor, Tensor | None]]:
        """Per layer ``(h, c)`` rows of ``q (..., D, k)`` (a block of tangent or cotangent columns over the chosen
        ``state``; ``c`` None without a cell state or for ``state="h"``): views from one ``torch.split``, as
        :meth:`split` on the last dimension.

        Examples
        --------
        >>> layout = StateLayout([[("h", 2), ("c", 1)], [("h", 1)]])
        >>> [(h.shape[-2], None if c is None else c.shape[-2]) for h, c in layout.split_rows(torch.ones(4, 1))]
        [(2, 1), (1, None)]
        >>> [(h.shape[-2], c) for h, c in layout.split_rows(torch.ones(3, 1), "h")]
        [(2, None), (1, None)]
        """
        return self._split(q, -2, state, whole=True)

    def _split(self, t: Tensor, dim: int, state: str, *, whole: bool) -> list[tuple[Tensor, Tensor | None]]:
        """:meth:`split` / :meth:`split_rows` along ``dim``. ``whole``: a single part is ``t`` itself (for the
        linearisation's internal blocks: a one-piece ``torch.split`` still copies the whole gradient back); else
        always split views, which torch refuses to edit in place (the states behind the outputs that
        ``forward_with_states`` hands out)."""
        full = state == "full"
        sizes = [n for parts in self.parts for p, n in parts if full or p == "h"]
        pieces = iter((t,) if whole and len(sizes) == 1 else torch.split(t, sizes, dim))
        return [(next(pieces), next(pieces) if len(parts) > 1 and full else None) for parts in self.parts]

    def join(self, layers: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        """Inverse of :meth:`split`."""
        return torch.cat([t for h, c in layers for t in ((h,) if c is None else (h, c))], -1)

    def with_h(self, h: Tensor, s: Tensor) -> Tensor:
        """Full state ``s`` with its h parts replaced by ``h`` (``(..., h_size)``)."""
        out, off = [], 0
        for hh, c in self.split(s):
            n = hh.shape[-1]
            out.append((h[..., off : off + n], c))
            off += n
        return self.join(out)

    def h_block(self, j: Tensor) -> Tensor:
        """The h rows and columns of ``j (..., D, D)`` (``j`` itself when the state has only h parts)."""
        if self.h_size == self.state_size:
            return j
        idx = self.h_index(j.device)
        return j.index_select(-2, idx).index_select(-1, idx)


def frobenius_row_local(cell: CellArch, layers: list[LayerParams], state: str) -> bool:
    """Whether ``||J||_F^2`` has the row-local (Gram) form: one layer, no projection, full state (or no c)."""
    return len(layers) == 1 and (state == "full" or not cell.has_c) and layers[0].w_hr is None


class Linearization(ABC):
    """``J_t`` for ``N`` steps at once: the interface both implementations share.

    ``s (N, D)`` and ``x (N, I)`` are the points it was taken at; ``state`` arguments are ``"full"`` or
    ``"h"`` (the h rows and columns, c held fixed).
    """

    s: Tensor
    x: Tensor
    factored: bool = False
    """Whether ``J`` is kept as coefficients (``apply`` costs GEMMs with the shared weights)."""
    forms_cheaply: bool = True
    """Whether :meth:`materialize` costs no matrix product (``J`` is held, or is weight blocks scaled by rows):
    then ``J`` formed once beats the factored product for more than a couple of tangent columns."""

    @abstractmethod
    def apply(self, q: Tensor, state: str = "full") -> Tensor:
        """``J @ Q`` for tangents ``Q`` of shape ``(N, D, k)`` (``D`` of the chosen ``state``)."""

    @abstractmethod
    def materialize(self, state: str = "full") -> Tensor:
        """``J`` as ``(N, D, D)``."""

    @abstractmethod
    def unbind(self, steps: int) -> list[Linearization]:
        """All steps of a linearisation laid out as ``(B, steps)``, as a list (one autograd op per tensor)."""

    @abstractmethod
    def detached(self) -> Linearization:
        """The same linearisation cut from the autograd graph."""

    @abstractmethod
    def for_autograd(self) -> Linearization:
        """``self``, or a copy with every inference-mode tensor cloned (call it inside :func:`grad_region`)."""

    @abstractmethod
    def _operands(self) -> list[Tensor]:
        """The tensors ``apply`` reads (checked for inference mode before a vjp)."""

    def frobenius_sq(self, state: str = "full") -> Tensor:
        """``||J||_F^2`` per step, ``(N,)``."""
        return self.materialize(state).pow(2).sum((-2, -1))

    def apply_transpose(self, u: Tensor, state: str = "full") -> Tensor:
        """``J^T U``: the vjp of the linear map ``Q -> J Q`` (differentiable w.r.t. J's ingredients when grad
        mode is on; works under ``no_grad``/``inference_mode`` too)."""
        keep_graph = torch.is_grad_enabled()
        with grad_region():
            inference = torch.is_inference(u) or any(t.is_inference() for t in self._operands())
            lin = self.for_autograd() if inference else self
            u = normal(u)
            vjp = torch.func.vjp(lambda q: lin.apply(q, state), torch.zeros_like(u))[1]
            out = vjp(u)[0]
        return out if keep_graph else out.detach()


def _join_rows(blocks: list[Tensor]) -> Tensor:
    """``torch.cat(blocks, -2)``, column-major when the blocks are (the layout LAPACK's QR reads without a copy)."""
    if len(blocks) == 1:
        return blocks[0]
    if blocks[0].dim() < 2 or not all(b.stride(-2) == 1 and b.shape[-2] > 1 for b in blocks):
        return torch.cat(blocks, -2)
    return torch.cat([b.mT for b in blocks], -1).mT


def _split_steps(t: Tensor, steps: int):
    return t.reshape(-1, steps, *t.shape[1:]).unbind(1)


class DenseLinearization(Linearization):
    """``J`` materialised as ``jac (N, D, D)`` (full state), with the ``layout`` that ``state="h"`` selects from.

    Examples
    --------
    >>> s, x, jac = torch.zeros(1, 2), torch.zeros(1, 1), 2 * torch.eye(2)[None]
    >>> lin = DenseLinearization(StateLayout([[("h", 2)]]), s, x, jac)
    >>> lin.apply(torch.ones(1, 2, 1)).flatten().tolist(), lin.frobenius_sq().tolist()
    ([2.0, 2.0], [8.0])
    """

    factored = False

    def __init__(self, layout: StateLayout, s: Tensor, x: Tensor, jac: Tensor):
        self.layout, self.s, self.x, self.jac = layout, s, x, jac

    def _with(self, s, x, jac) -> DenseLinearization:
        return DenseLinearization(self.layout, s, x, jac)

    def apply(self, q: Tensor, state: str = "full") -> Tensor:
        return self.materialize(state) @ q

    def apply_transpose(self, u: Tensor, state: str = "full") -> Tensor:
        """``J^T U``: one batched product with the transposed view of ``J`` (no vjp graph), differentiable in
        ``J`` and ``U`` under grad mode like :meth:`apply`."""
        return self.materialize(state).mT @ u

    def materialize(self, state: str = "full") -> Tensor:
        return self.jac if state == "full" else self.layout.h_block(self.jac)

    def unbind(self, steps: int) -> list[Linearization]:
        s, x, jac = (_split_steps(t, steps) for t in (self.s, self.x, self.jac))
        return [self._with(s[j], x[j], jac[j]) for j in range(steps)]

    def detached(self) -> DenseLinearization:
        return self._with(self.s.detach(), self.x.detach(), self.jac.detach())

    def to(self, dtype: torch.dtype) -> DenseLinearization:
        """The same linearisation with ``J`` and the points converted to ``dtype``."""
        return self._with(self.s.to(dtype), self.x.to(dtype), self.jac.to(dtype))

    def for_autograd(self) -> DenseLinearization:
        return self._with(normal(self.s), normal(self.x), normal(self.jac))

    def _operands(self) -> list[Tensor]:
        return [self.jac]


class FactoredLinearization(Linearization):
    """``J`` of a stack of built-in layers, kept as each layer's coefficients (:meth:`CellArch.linearize`).

    Parameters
    ----------
    cell : CellArch
        The layers' architecture (its ``tangent`` pushes tangents through one layer).
    layers : list of LayerParams
        References to the weights (never copies).
    layout : StateLayout
    s, x : Tensor
        The points ``(N, D)``, ``(N, I)``.
    coefs : list of dict
        Per layer, the coefficients of its linearised step.
    compile : bool
        Whether :meth:`frobenius_sq` runs its row forms through ``torch.compile`` (:mod:`rnnjac._elementwise`).
    """

    factored = True

    @property
    def forms_cheaply(self) -> bool:
        """One layer without projection: its ``J`` is its weight blocks scaled by rows (O(D^2) per point, the
        work of one factored product with a single vector); a stack's cross-layer blocks and a projection are
        matrix products (O(D^3))."""
        return len(self.layers) == 1 and self.layers[0].w_hr is None

    def __init__(
        self,
        cell: CellArch,
        layers: list[LayerParams],
        layout: StateLayout,
        s: Tensor,
        x: Tensor,
        coefs,
        *,
        compile: bool = False,  # noqa: A002
    ):
        self.cell, self.layers, self.layout = cell, layers, layout
        self.s, self.x, self.coefs, self.compile = s, x, coefs, compile

    def _with(self, layers, s, x, coefs) -> FactoredLinearization:
        return FactoredLinearization(self.cell, layers, self.layout, s, x, coefs, compile=self.compile)

    def unbind(self, steps: int) -> list[Linearization]:
        s, x = _split_steps(self.s, steps), _split_steps(self.x, steps)
        per = [{k: _split_steps(v, steps) for k, v in c.items()} for c in self.coefs]
        coefs = [[{k: v[j] for k, v in c.items()} for c in per] for j in range(steps)]
        return [self._with(self.layers, s[j], x[j], coefs[j]) for j in range(steps)]

    def detached(self) -> FactoredLinearization:
        coefs = [{k: v.detach() for k, v in c.items()} for c in self.coefs]
        layers = [p.map(Tensor.detach) for p in self.layers]
        return self._with(layers, self.s.detach(), self.x.detach(), coefs)

    def for_autograd(self) -> FactoredLinearization:
        coefs = [{k: normal(v) for k, v in c.items()} for c in self.coefs]
        inference = any(t.is_inference() for p in self.layers for t in p.tensors())
        layers = [p.map(normal) for p in self.layers] if inference else self.layers
        return self._with(layers, normal(self.s), normal(self.x), coefs)

    def _operands(self) -> list[Tensor]:
        return [v for c in self.coefs for v in c.values()] + [t for p in self.layers for t in p.tensors()]

    def to(self, dtype: torch.dtype) -> FactoredLinearization:
        """The same linearisation with every operand (weights, coefficients, points) converted to ``dtype``."""
        coefs = [{k: v.to(dtype) for k, v in c.items()} for c in self.coefs]
        layers = [p.map(lambda t: t.to(dtype)) for p in self.layers]
        return self._with(layers, self.s.to(dtype), self.x.to(dtype), coefs)

    def apply(self, q: Tensor, state: str = "full") -> Tensor:
        out, dx = [], None
        for p, coef, (dh, dc) in zip(self.layers, self.coefs, self.layout.split_rows(q, state), strict=True):
            dh, dc = self.cell.tangent(p, coef, dx, dh, dc)
            out.append(dh)
            if dc is not None and state == "full":
                out.append(dc)
            dx = dh
        return _join_rows(out)

    def apply_transpose(self, u: Tensor, state: str = "full") -> Tensor:
        """``J^T U`` in closed form (:meth:`CellArch.tangent_transpose`): the layers from the top down, each one
        GEMM per weight matrix; a layer's input cotangent joins the output cotangent of the layer below.
        Differentiable when grad mode is on, plain tensor ops under ``no_grad``/``inference_mode``."""
        pieces = self.layout.split_rows(u, state)
        out, carry = [], None
        for li in reversed(range(len(self.layers))):
            uh, uc = pieces[li]
            uh = uh if carry is None else uh + carry
            carry, qh, qc = self.cell.tangent_transpose(self.layers[li], self.coefs[li], uh, uc, li > 0)
            out = [qh, *([] if qc is None else [qc]), *out]
        return torch.cat(out, -2)

    def materialize(self, state: str = "full") -> Tensor:
        """``J`` as ``(N, D, D)``, built block by block: per layer its own rows over its own columns (for
        ``state="h"`` the h rows and columns only: no c column is formed) and, below the diagonal,
        ``(dF_l/dx) @ B_{l-1}``, one batched GEMM with ``B_{l-1}`` the h rows of the layer below. A single
        block (one layer, no c part in the chosen state) is the cell's own product, returned without a copy."""
        h_only = state != "full"
        n, cell = self.s.shape[0], self.cell
        total = self.layout.h_size if h_only else self.layout.state_size
        if len(self.layers) == 1 and (h_only or not cell.has_c):
            return cell.tangent(self.layers[0], self.coefs[0], None, EYE, None)[0]
        j = self.s.new_empty(n, total, total)
        # under autograd the rows below are copied (the GEMM saves them, and j is written afterwards)
        copy_below = torch.is_grad_enabled() and any(t.requires_grad for t in self._operands())
        r0, below = 0, None  # below: the h rows of the previous layer's row block
        for p, coef, parts in zip(self.layers, self.coefs, self.layout.parts, strict=True):
            n_h = parts[0][1]
            r1 = r0 + (n_h if h_only else sum(m for _, m in parts))
            c0 = r0
            inputs = [(EYE, None)] + ([(None, EYE)] if len(parts) > 1 and not h_only else [])
            for dh, dc in inputs:
                out_h, out_c = cell.tangent(p, coef, None, dh, dc)
                width = out_h.shape[-1]
                j[:, r0 : r0 + n_h, c0 : c0 + width] = out_h
                if out_c is not None and not h_only:
                    j[:, r0 + n_h : r1, c0 : c0 + width] = out_c
                c0 += width
            if below is not None:  # d(layer)/dx (N, rows, In) first, then one batched GEMM with the rows below
                low_h, low_c = cell.tangent(p, coef, EYE, None, None)
                j[:, r0 : r0 + n_h, :r0] = low_h @ below
                if low_c is not None and not h_only:
                    j[:, r0 + n_h : r1, :r0] = low_c @ below
            if r1 < total:
                j[:, r0:r1, r1:] = 0
            below = j[:, r0 : r0 + n_h, :r1]
            below = below.clone() if copy_below else below
            r0 = r1
        return j

    def frobenius_sq(self, state: str = "full") -> Tensor:
        """``||J||_F^2`` per step, ``(N,)``; O(N K^2 H) for a single layer without projection, a stack's own
        blocks in the same row form plus its cross-layer blocks by :meth:`_stacked_frobenius_sq`."""
        if frobenius_row_local(self.cell, self.layers, state):
            return self.cell.frobenius_sq(self.layers[0], self.coefs[0], self.compile)
        if state == "full" and all(frobenius_row_local(self.cell, [p], state) for p in self.layers):
            return self._stacked_frobenius_sq()
        return super().frobenius_sq(state)

    def _stacked_frobenius_sq(self) -> Tensor:
        """``||J||_F^2`` of a stack: each layer's own block in row form, and the block over the layers below,
        ``(dF_l/dx) @ B_{l-1}``, as one batched GEMM of ``(N, H, H)`` matrices (``B_{l-1}``: the h rows of the
        layer below over all its columns); nothing else is materialised."""
        total, below, n_layers = None, None, len(self.layers)
        for li, (p, coef) in enumerate(zip(self.layers, self.coefs, strict=True)):
            own = self.cell.frobenius_sq(p, coef, self.compile)
            total = own if total is None else total + own
            cross = None
            if below is not None:
                d_h, d_c = self.cell.tangent(p, coef, EYE, None, None)  # (N, H, In): this layer's rows over x
                cross = d_h @ below
                total = total + cross.pow(2).sum((-2, -1))
                if d_c is not None:
                    total = total + (d_c @ below).pow(2).sum((-2, -1))
            if li + 1 < n_layers:
                cols = [self.cell.tangent(p, coef, None, EYE, None)[0]]  # h rows over the layer's own h ...
                if self.cell.has_c:
                    cols.append(self.cell.tangent(p, coef, None, None, EYE)[0])  # ... and c columns
                below = torch.cat(cols if cross is None else [cross, *cols], -1)
        return total
