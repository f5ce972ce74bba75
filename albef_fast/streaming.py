"""The one-pass ITC algorithm (SPEC section 3) in plain PyTorch, chunked over the keys.

This is the CPU path and the fp32 "highest" path on CUDA (cuBLAS fp32 products). Memory is
bounded by one [3B, chunk] block; the B x (B+Q) logits never exist.

Per row r of one direction, with u = q / T (student) and u_m = q_m / T (teacher), keys k_j,
the stream keeps, with online-softmax rescaling by the running maxima:

    Z_s = sum e^{u.k_j},  A_s = sum e^{u.k_j} k_j,  Z_m, A_m likewise with u_m,
    H_k = sum h_j k_j,    n = sum [id_j == id_r]  (retrieval; pretraining: H_k = k_r, n = 1)

Every scalar of SPEC section 3 is a dot of u or u_m with these, because s_j = u . k_j:

    C_s = u . A_s,  C_m = u . A_m,  H_s = u . H_k / n,  sum e^{m_j} m_j = u_m . A_m

so each chunk costs two GEMMs (logits, then weights @ keys) plus exp / max / sum, and

    dq_r = G_r / T with G_r = A_s / Z_s - alpha A_m / Z_m - (1 - alpha) H_k / n
    dT_r = -(u . G_r) / T        (the loss depends on q and T only through u = q / T)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["DirectionResult", "stream_direction", "DEFAULT_CHUNK"]

# Keys per block. CPU: small blocks stay in cache. Elsewhere (CUDA): as many keys as fit a 16 MiB
# block of logits, so that B = 64 streams Q = 65536 in two blocks (few launches) and B = 512
# stays far inside the memory budget (SPEC: 32 MiB at B = 64, 64 MiB at B = 512).
DEFAULT_CHUNK = {"cpu": 2048}
_BLOCK_BYTES = 16 << 20


def _chunk_for(device: torch.device, key_bytes: int) -> int:
    """key_bytes: the scratch one key costs (its logits, its converted copy, its mask column)."""
    if device.type in DEFAULT_CHUNK:
        return DEFAULT_CHUNK[device.type]
    return max(1024, min(65536, (_BLOCK_BYTES // key_bytes) // 256 * 256))


class DirectionResult(NamedTuple):
    """Results of one direction (i2t or t2i); all means over the B rows, detached."""

    loss: torch.Tensor  # 0-dim, in the work dtype (fp32, or fp64 for fp64 inputs)
    dq: torch.Tensor  # [B, D], d loss / d q (includes the 1 / B of the mean)
    dtemp: torch.Tensor  # 0-dim, d loss / d T
    sim_batch: torch.Tensor  # [B, B], student logits against the in-batch keys
    ce: torch.Tensor  # 0-dim, -sum h log p_s
    kl: torch.Tensor  # 0-dim, KL(p_m || p_s)


class _Stream:
    """Running online-softmax state over rows [student B | teacher B (opt.) | hard B (opt.)].

    The key sums A are kept for the rows from `first` on: without gradients the student's A_s
    is not needed (the loss uses only Z_s and the teacher / hard-target means), so first = B.
    """

    def __init__(self, u: torch.Tensor, n_soft: int, n_hard: int, dim: int, first: int):
        self.u = u  # [n_soft, D] scaled queries, in the work dtype
        self.n_soft = n_soft
        self.first = first
        rows = n_soft + n_hard
        self.mx = u.new_full((n_soft,), float("-inf"))
        self.z = u.new_zeros(n_soft)
        self.acc = u.new_zeros(rows - first, dim)  # [A_s; A_m; H_k][first:]
        self.scale = u.new_ones(rows)
        self.count = u.new_zeros(n_hard)  # number of positives (retrieval)

    def acc_rows(self, start: int, end: int) -> torch.Tensor:
        return self.acc[start - self.first : end - self.first]

    def step(self, keys_t: torch.Tensor, buf: torch.Tensor, hard: Optional[torch.Tensor],
             keep_rows: int = 0) -> Optional[torch.Tensor]:
        """Consume one block of keys. keys_t: [D, c] (a view, any strides); buf: flat scratch.
        keep_rows > 0 returns a copy of the first keep_rows rows of its logits (the sim block)."""
        keys_t = keys_t.to(self.u.dtype)  # no copy unless the queue has another dtype
        c = keys_t.shape[1]
        block = buf[: self.scale.shape[0] * c].view(-1, c)  # contiguous [rows, c]
        logits = block[: self.n_soft]
        torch.matmul(self.u, keys_t, out=logits)
        kept = logits[:keep_rows].clone() if keep_rows else None  # before exp_ overwrites them
        new_mx = torch.maximum(self.mx, logits.amax(dim=1))
        torch.exp(self.mx - new_mx, out=self.scale[: self.n_soft])
        logits.sub_(new_mx[:, None]).exp_()
        self.z.mul_(self.scale[: self.n_soft]).add_(logits.sum(dim=1))
        self.mx = new_mx
        if hard is not None:
            block[self.n_soft :].copy_(hard)
            self.count.add_(hard.sum(dim=1))
        if self.acc.shape[0]:
            self.acc.mul_(self.scale[self.first :, None]).addmm_(block[self.first :], keys_t.T)
        return kept


def _hard_mask(idx: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (idx[:, None] == ids[None, :]).to(dtype)


def stream_direction(
    q: torch.Tensor,
    q_m: torch.Tensor,
    keys_batch: torch.Tensor,
    queue: torch.Tensor,
    temp,
    alpha: float,
    idx: Optional[torch.Tensor] = None,
    idx_queue: Optional[torch.Tensor] = None,
    details: bool = False,
    chunk: Optional[int] = None,
    grad: bool = True,
) -> DirectionResult:
    """One direction of the ITC loss, its gradient to q and to T, streamed over the keys.

    q, q_m: [B, D] queries and momentum queries; keys_batch: [B, D] in-batch momentum keys;
    queue: [D, Q] (read through its strides, never copied whole); temp: float or 0-dim tensor;
    idx: [B] and idx_queue: [Q] select retrieval targets. Products run in fp32 (fp64 for fp64).
    grad=False skips the student's key sums (dq and dtemp come back as zeros).
    """
    work = torch.promote_types(q.dtype, torch.float32)
    b, d = q.shape
    inv_t = 1.0 / (temp.detach().to(work) if torch.is_tensor(temp) else temp)
    teacher = alpha != 0.0 or details
    u = q.detach().to(work) * inv_t
    rows_u = torch.cat([u, q_m.detach().to(work) * inv_t]) if teacher else u
    n_soft, n_hard = rows_u.shape[0], (b if idx is not None else 0)
    state = _Stream(rows_u, n_soft, n_hard, d, first=0 if grad else b)
    if chunk is None:
        converted = d if queue.dtype != work else 0  # keys_t.to(work) copies the block
        chunk = _chunk_for(q.device, (n_soft + 2 * n_hard + converted) * u.element_size())
    buf = u.new_empty((n_soft + n_hard) * max(b, min(chunk, queue.shape[1])))

    kb_t = keys_batch.detach().T
    retrieval = idx is not None
    sim_batch = state.step(kb_t, buf, _hard_mask(idx, idx, work) if retrieval else None, keep_rows=b).to(q.dtype)
    for start in range(0, queue.shape[1], chunk):
        keys_t = queue[:, start : start + chunk]
        hard = _hard_mask(idx, idx_queue[start : start + chunk], work) if retrieval else None
        state.step(keys_t, buf, hard)
    return _finish(state, u, b, alpha, keys_batch, inv_t, q.dtype, sim_batch, teacher, grad)


def _finish(state, u, b, alpha, keys_batch, inv_t, out_dtype, sim_batch, teacher, grad) -> DirectionResult:
    z, n_soft = state.z, state.n_soft
    if state.scale.shape[0] > n_soft:  # retrieval: mean of the matching keys
        h_k = state.acc_rows(n_soft, n_soft + b) / state.count[:, None]
    else:
        h_k = keys_batch.detach().to(u.dtype)
    lse_s = state.mx[:b] + z[:b].log()
    g = -(1.0 - alpha) * h_k  # G = E_{p_s}[k] - alpha E_{p_m}[k] - (1 - alpha) H_k / n
    h_s = (u * h_k).sum(1)
    loss_rows = lse_s - (1.0 - alpha) * h_s
    ce_rows = lse_s - h_s
    kl_rows = torch.zeros_like(lse_s)
    if teacher:
        p_m = state.acc_rows(b, 2 * b) / z[b:, None]
        c_m = (u * p_m).sum(1)
        g = g - alpha * p_m
        loss_rows = loss_rows - alpha * c_m
        lse_m = state.mx[b:] + z[b:].log()
        kl_rows = (state.u[b:] * p_m).sum(1) - lse_m - c_m + lse_s
    if grad:
        dq_rows = (g + state.acc_rows(0, b) / z[:b, None]) * inv_t
        dq, dtemp = (dq_rows / b).to(out_dtype), -(u * dq_rows).sum(1).mean()
    else:
        dq, dtemp = u.new_zeros(u.shape, dtype=out_dtype), u.new_zeros(())
    return DirectionResult(loss=loss_rows.mean(), dq=dq, dtemp=dtemp, sim_batch=sim_batch, ce=ce_rows.mean(),
                           kl=kl_rows.mean())
