"""The cells' shared-weight products on the layouts the Lyapunov chain hands them (a QR's column-major ``Q`` and
row slices of it): equal to a plain ``matmul``, and column-major out, as LAPACK's QR reads without a copy."""

import pytest
import torch

from rnnjac._cells import _gate_blocks, _mm
from rnnjac._linearization import _join_rows

F64 = torch.float64


def column_major(n, d, k, seed=0):
    return torch.randn(n, k, d, dtype=F64, generator=torch.Generator().manual_seed(seed)).mT


@pytest.mark.parametrize("k", [8, 70])  # narrow (the Lyapunov penalty's k) and wide tangent blocks
@pytest.mark.parametrize("rows", [slice(None), slice(0, 5), slice(5, 12)])
def test_mm_of_a_column_major_block_or_a_row_slice_equals_matmul_and_stays_column_major(rows, k):
    w = torch.randn(7, 12, dtype=F64)[:, : 12 if rows.stop is None else rows.stop - (rows.start or 0)]
    v = column_major(3, 12, k)[:, rows]
    got = _mm(w.contiguous(), v)
    torch.testing.assert_close(got, torch.matmul(w, v.contiguous()), rtol=1e-13, atol=1e-13)
    assert got.stride(-2) == 1  # column-major


def test_join_rows_equals_cat_and_keeps_column_major_blocks_column_major():
    blocks = [column_major(2, 4, 9, 1), column_major(2, 3, 9, 2)]
    got = _join_rows(blocks)
    torch.testing.assert_close(got, torch.cat(blocks, -2), rtol=0, atol=0)
    assert got.stride(-2) == 1
    rows = [b.contiguous() for b in blocks]
    torch.testing.assert_close(_join_rows(rows), torch.cat(rows, -2), rtol=0, atol=0)
    assert _join_rows(blocks[:1]) is blocks[0]


@pytest.mark.parametrize("layout", ["column-major", "row-major"])
def test_gate_blocks_values_and_gradients_on_either_layout(layout):
    """The gate split of a GEMM's output: a column-major block is split through its transpose (so that the
    gradient's concatenation is column-major too); values and gradients equal a plain chunk either way."""
    g = column_major(3, 12, 5, 3) if layout == "column-major" else column_major(3, 12, 5, 3).contiguous()
    g.requires_grad_(True)
    w = [torch.randn(3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    blocks = _gate_blocks(g, 3)
    for got, want in zip(blocks, g.detach().chunk(3, -2), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(sum((b * wi).sum() for b, wi in zip(blocks, w, strict=True)), g)
    torch.testing.assert_close(grad, torch.cat(w, -2), rtol=0, atol=0)
    if layout == "column-major":
        assert grad.stride(-2) == 1  # the GEMM's backward reads it without a copy
    assert _gate_blocks(None, 3) == [None, None, None]
