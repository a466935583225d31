"""The 'reference' backend of the token-routed GEMMs: production pure-PyTorch math on any device.

On the CPU the routed rows are read from the mask (no device sync there) and each branch runs on its own
rows only, on row views where the rows form a few contiguous runs (image blocks, CogVLM's vision tokens):
no gather or scatter copy. On other devices every product runs over all rows and the routed result is
kept with ``torch.where`` (never ``× 0``: a non-finite value on a row that does not take the branch must
not reach it), so nothing synchronises with the host. Functions take the custom ops' 2-D operands (shapes
in their docstrings, ``vlmkern.ops.routed_linear``) and compute what the Triton launchers compute."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmkern.ops.dispatch import transformed
from vlmkern.ops.routed_linear._dropout import check_packed, unpack_keep

_MAX_RUNS = 32


def _zero_unrouted(t: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask[:, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def _drop(t: Tensor, keep: Optional[Tensor], keep_scale: float) -> Tensor:
    """``t (M, n) * keep * keep_scale``, keep the packed ``(M, packed_width(n))`` uint8 mask or None."""
    return t if keep is None else t * (unpack_keep(check_packed(keep, *t.shape), t.shape[-1]).to(t.dtype) * keep_scale)


def _cpu_rows(mask: Tensor) -> Optional[list[slice] | Tensor]:
    """The routed rows of a CPU ``mask`` ``(M,)``, where reading them costs no device sync: a list of slices
    when they form at most ``_MAX_RUNS`` contiguous runs (the products then run on row views), else an
    index tensor. None off the CPU (masked full-size products there), and under a functorch transform or
    forward-mode AD (which the row-view writes would escape)."""
    if mask.device.type != "cpu" or transformed():
        return None
    m = mask.to(torch.int8)
    zero = m.new_zeros(1)
    edges = torch.diff(m, prepend=zero, append=zero).nonzero().squeeze(1)   # run starts and ends, alternating
    if edges.numel() > 2 * _MAX_RUNS:
        return mask.nonzero().squeeze(1)
    bounds = edges.tolist()
    return [slice(a, b) for a, b in zip(bounds[0::2], bounds[1::2])]


def _row_blocks(rows: list[slice] | Tensor) -> list:
    """Row selectors to loop over: each run, or the whole index tensor at once (empty: nothing)."""
    if isinstance(rows, Tensor):
        return [rows] if rows.numel() else []
    return rows


def _down(a, b, mask, rows, keep, scale, keep_scale) -> Tensor:
    if rows is None:
        return _zero_unrouted(_drop(a, keep, keep_scale).matmul(b.t()) * scale, mask)
    out = a.new_zeros((a.shape[0], b.shape[0]))
    for r in _row_blocks(rows):
        out[r] = _drop(a[r], None if keep is None else keep[r], keep_scale).matmul(b.t()) * scale
    return out


def _up(a, w, u, v, mask, rows, keep, keep_scale, bias) -> Tensor:
    y = F.linear(a, w, bias)
    if rows is None:
        return y + _zero_unrouted(_drop(u.matmul(v.t()), keep, keep_scale), mask)
    for r in _row_blocks(rows):
        if keep is None and isinstance(r, slice):
            y[r].addmm_(u[r], v.t())                   # in place on the row view
        else:
            y[r] += _drop(u[r].matmul(v.t()), None if keep is None else keep[r], keep_scale)
    return y


def lora_down(a, b, mask, keep, scale, keep_scale) -> Tensor:
    """``m ⊙ scale·(drop(a) bᵀ)``, (M, R)."""
    return _down(a, b, mask, _cpu_rows(mask), keep, scale, keep_scale)


def lora_up(a, w, u, v, mask, keep, keep_scale, bias=None) -> Tensor:
    """``a wᵀ + m ⊙ (u vᵀ) ⊙ keep·keep_scale + bias``, (M, N)."""
    return _up(a, w, u, v, mask, _cpu_rows(mask), keep, keep_scale, bias)


def partial_lora(x, weight, bias, lora_a, lora_b, im_mask, keep, scaling, keep_scale) -> tuple[Tensor, Tensor]:
    """The forward ``(y, U)``; the routed rows are read once, for both GEMMs."""
    rows = _cpu_rows(im_mask)
    u = _down(x, lora_a, im_mask, rows, keep, scaling, keep_scale)
    return _up(x, weight, u, lora_b, im_mask, rows, None, 1.0, bias), u


def routed_tn(p, q, sel, groups, sel_base, keep, scale, keep_scale) -> Tensor:
    """``out[g] = scale · Σ_{sel = g + base} p[m]ᵀ drop(q)[m]``, (groups, N, K)."""
    sel = sel.to(torch.int64)
    q = _drop(q, keep, keep_scale)
    outs = []
    for g in range(groups):
        routed = sel == g + sel_base
        rows = _cpu_rows(routed)
        if rows is None:
            # both operands zeroed: a non-finite value on an unrouted row must not reach the sum (0 · inf)
            outs.append(_zero_unrouted(p, routed).t().matmul(_zero_unrouted(q, routed)) * scale)
            continue
        acc = p.new_zeros((p.shape[1], q.shape[1]))
        for r in _row_blocks(rows):
            acc.addmm_(p[r].t(), q[r])
        outs.append(acc.mul_(scale) if scale != 1.0 else acc)
    return torch.stack(outs) if outs else p.new_empty((0, p.shape[1], q.shape[1]))


def expert_linear(x, weights, expert_ids) -> Tensor:
    """``y[m] = weights[ids[m]] x[m]``, (M, N); rows with an id outside ``[0, E)`` come out NaN."""
    out = x.new_empty((x.shape[0], weights[0].shape[0]))
    if x.device.type != "cpu" or transformed():        # masked full-size products: no row-view writes
        out.fill_(float("nan"))
        for e, w in enumerate(weights):
            out = torch.where((expert_ids == e)[:, None], F.linear(x, w), out)
        return out
    routed = 0
    # Every expert's rows first: small ops right after a large multi-threaded GEMM run measurably slower here.
    rows = [_row_blocks(_cpu_rows(expert_ids == e)) for e in range(len(weights))]
    for w, blocks in zip(weights, rows):                # each row computed once, by its expert
        for r in blocks:
            if isinstance(r, slice):
                torch.mm(x[r], w.t(), out=out[r])       # straight into the output's row view
                routed += r.stop - r.start
            else:
                out[r] = F.linear(x[r], w)
                routed += r.numel()
    if routed < x.shape[0]:   # unchecked out-of-range ids (a full-size masked fill costs ~3 % of the call)
        out[(expert_ids < 0) | (expert_ids >= len(weights))] = float("nan")
    return out
