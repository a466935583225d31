"""Routed TN reduction (weight gradients of the routed GEMMs): the prologue scan that bounds each group's
reduction to its first..last selected row, across several 1024-row scan chunks, with shipped tiles."""
import pytest
import torch

from vlmkern.ops import routed_linear  # noqa: F401  (registers vlmkern::routed_tn)
from vlmkern.testing import assert_close


@pytest.mark.parametrize("sel_dtype", [torch.int32, torch.bool])
def test_spans_across_scan_chunks_empty_groups_and_interleaving(backend, device, sel_dtype):
    M, N, K = 2300, 16, 16                           # three 1024-row scan chunks
    g = torch.Generator().manual_seed(0)
    p = torch.randn(M, N, generator=g).to(device)
    q = torch.randn(M, K, generator=g).to(device)
    if sel_dtype == torch.bool:                       # the adapter's image mask: one run in the last chunk
        sel = torch.zeros(M, dtype=torch.bool)
        sel[2100:2117] = True
        groups, base = 1, 1
    else:                                             # expert ids: 0 on both ends (wide span), 1 inside,
        sel = torch.zeros(M, dtype=torch.int32)       # 2 scattered, 3 absent
        sel[700:1900] = 1
        sel[1030:1900:97] = 2
        groups, base = 4, 0
    sel = sel.to(device)
    got = torch.ops.vlmkern.routed_tn(p, q, sel, groups, base, None, 0.5, 1.0)
    rows = [sel.to(torch.int64) == i + base for i in range(groups)]
    base_fp32 = torch.stack([0.5 * p[r].t() @ q[r] for r in rows])        # plain PyTorch at the same precision
    exact = torch.stack([0.5 * p[r].double().t() @ q[r].double() for r in rows])
    assert got.shape == (groups, N, K)
    assert_close(got, base_fp32, exact, kind="grad", dtype=p.dtype, name="routed_tn")
    if groups == 4:
        assert (got[3] == 0).all()                    # a group without rows writes exact zeros
