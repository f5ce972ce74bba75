"""The one-pass ITC algorithm (SPEC section 3) in plain PyTorch, chunked over the keys.

This is the CPU and fp64 path, and backend="torch" on CUDA (cuBLAS products). One call does
both directions (i2t: image queries against text keys; t2i the other way). Scratch is one
[rows, chunk] block of logits plus per-chunk partial states; the B x (B+Q) logits never exist.

A direction's rows are [student u = q / T | teacher u_m = q_m / T (when alpha != 0 or details) |
hard targets (retrieval)], B each. Its keys come in chunks: the in-batch momentum keys, then
slices of the queue. Each chunk c gives, per soft row, with s_j = u . k_j:

    m_c = max_j s_j,   z_c = sum_j e^{s_j - m_c},   a_c = sum_j e^{s_j - m_c} k_j   [D]

and per hard row n_c = sum_j h_j and a_c = sum_j h_j k_j (h_j = 1 where the ids match). The chunks
merge at the end, as the Triton path's key splits do: M = max_c m_c, Z = sum_c z_c e^{m_c - M},
A = sum_c a_c e^{m_c - M}. A chunk is six ops (two GEMMs, max, subtract, exp, sum) and rescales
no running state: half the ops of an online-softmax update (on a GPU this path's time is mostly
the host issuing ops). Every scalar of SPEC section 3 is then a dot with a mean key E = A / Z:

    lse_s = M_s + log Z_s,   E_s = A_s / Z_s,   E_t = A_m / Z_m,   h_k = H / n (retrieval) or k_r
    G = E_s - alpha E_t - (1 - alpha) h_k,   dq_r = G / T,   dT_r = -(u . G) / T
    loss_r = lse_s - alpha u.E_t - (1 - alpha) u.h_k,   ce_r = lse_s - u.h_k
    kl_r = u_m.E_t - lse_m - u.E_t + lse_s

The row means of those dots, times a small coefficient matrix, give every output scalar.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

__all__ = ["stream_itc", "DEFAULT_CHUNK"]

# Keys per queue chunk on the CPU: small blocks stay in cache. Elsewhere (CUDA) see _chunk_for.
DEFAULT_CHUNK = {"cpu": 2048}
# Scratch (logits block + partials) off the CPU: 20 MiB, or 96 KiB a batch row from B = 214 on
# (48 MiB at B = 512). That leaves >= 12 MiB of SPEC's extra-memory budget (32 MiB at B = 64,
# 64 MiB at B = 512) to the queries, the merged states and the outputs.
_MIN_SCRATCH = 20 << 20
_SCRATCH_PER_ROW = 96 << 10


class _Rows(NamedTuple):
    """A direction's row layout: B rows per kind; soft = student (+ teacher); hard = retrieval;
    the key sums A are kept for rows [first, soft + hard) (no student sums without gradients)."""

    b: int
    soft: int
    hard: int
    first: int

    @property
    def total(self) -> int:
        return self.soft + self.hard


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_for(device: torch.device, q: int, rows: _Rows, key_bytes: int, part_bytes: int) -> int:
    """Keys per queue chunk. key_bytes: the block scratch of one key (its logits, its hard-target
    mask, its converted copy); part_bytes: the partial states of one chunk."""
    if device.type in DEFAULT_CHUNK:
        return DEFAULT_CHUNK[device.type]
    return _fewest_chunks(q, max(_MIN_SCRATCH, rows.b * _SCRATCH_PER_ROW), key_bytes, part_bytes)


@functools.lru_cache(maxsize=256)
def _fewest_chunks(q: int, budget: int, key_bytes: int, part_bytes: int) -> int:
    """The chunk width (a multiple of 256) of the fewest equal chunks whose block and partials
    (one per queue chunk and one for the in-batch keys) fit `budget` bytes; fewest ops per step.
    If none fits, the width with the least scratch."""
    least = None
    for n in range(1, _cdiv(max(q, 1), 256) + 1):
        width = _cdiv(_cdiv(max(q, 1), n), 256) * 256
        scratch = width * key_bytes + (n + 1) * part_bytes
        if scratch <= budget:
            return width
        least = min(least or (scratch, width), (scratch, width))
    return least[1]


def stream_itc(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha: float,
               idx: Optional[torch.Tensor] = None, idx_queue: Optional[torch.Tensor] = None, details: bool = False,
               grad: bool = True, chunk: Optional[int] = None):
    """Both directions of the ITC loss with their gradients; the outputs of albef_fast.itc_op.

    Features: [B, D]; queues: [D, Q] (read through their strides, sliced, never copied whole);
    temp: float or 0-dim tensor; idx: [B] and idx_queue: [Q] ids select retrieval targets.
    Products and states in fp32 (fp64 for fp64 features). Called under no autograd recording
    (the op's forward). grad=False skips the student's key sums: the gradients are zeros.
    """
    work = torch.promote_types(image_feat.dtype, torch.float32)
    b, d = image_feat.shape
    teacher = alpha != 0.0 or details
    inv_t = temp.to(work).reciprocal() if torch.is_tensor(temp) else 1.0 / temp
    queries = [image_feat, image_feat_m, text_feat, text_feat_m] if teacher else [image_feat, text_feat]
    u_all = torch.stack(queries).to(work).mul_(inv_t).view(2, -1, d)  # [direction, soft rows, D]
    keys_batch = torch.stack([text_feat_m, image_feat_m]).to(work)  # in-batch keys of i2t, t2i
    rows = _Rows(b, u_all.shape[1], b if idx is not None else 0, 0 if grad else b)
    states = _States(u_all, rows)
    sims = torch.empty((2, b, b), device=image_feat.device, dtype=image_feat.dtype)
    scan = _Scan(u_all, image_queue, rows, idx, chunk)
    for direction, queue in enumerate((text_queue, image_queue)):
        hard_sums = states.sums[direction, rows.soft - rows.first :]
        scan.direction(u_all[direction], keys_batch[direction], queue, idx_queue, sims[direction], hard_sums)
        scan.merge_into(states, direction)
    return _finish(states, u_all, keys_batch, alpha, inv_t, teacher, grad, image_feat.dtype, text_feat.dtype, sims)


class _States:
    """The merged states of both directions, one allocation: max [2, soft, 1] (row maxima),
    norm [2, soft + hard, 1] (Z of the soft rows, then the hard rows' positive counts),
    sums [2, total - first, D] (A)."""

    __slots__ = ("max", "norm", "sums", "rows")

    def __init__(self, u_all, rows: _Rows):
        d = u_all.shape[2]
        sizes = (2 * rows.soft, 2 * rows.total, 2 * (rows.total - rows.first) * d)
        mx, norm, sums = u_all.new_empty(sum(sizes)).split(sizes)
        self.max, self.norm = mx.view(2, rows.soft, 1), norm.view(2, rows.total, 1)
        self.sums, self.rows = sums.view(2, rows.total - rows.first, d), rows


class _Scan:
    """Streams a direction's key chunks into per-chunk partials (one allocation, reused by both
    directions) and merges them into _States. The hard rows' key sums (retrieval) need no
    per-chunk weights: they accumulate in the states directly."""

    def __init__(self, u_all, queue, rows: _Rows, idx, chunk: Optional[int]):
        work, d, q = u_all.dtype, u_all.shape[2], queue.shape[1]
        self.rows, self.idx = rows, idx
        weighted = rows.soft - rows.first  # soft rows with key sums
        if chunk is None:
            converted = d if queue.dtype != work else 0  # keys_t.to(work) copies the chunk
            key_bytes = (rows.total + converted) * u_all.element_size() + rows.hard  # + the bool mask
            part_bytes = (2 * rows.soft + rows.hard + weighted * d) * u_all.element_size()
            chunk = _chunk_for(u_all.device, q, rows, key_bytes, part_bytes)
        self.chunk = chunk
        n = 1 + _cdiv(q, chunk)
        sizes = (n * rows.soft, n * rows.soft, n * rows.hard, n * weighted * d)
        m, z, count, sums = u_all.new_empty(sum(sizes)).split(sizes)
        self.m, self.z = m.view(n, rows.soft, 1), z.view(n, rows.soft, 1)
        self.count, self.sums = count.view(n, rows.hard, 1), sums.view(n, weighted, d)
        self.slots = list(zip(*(t.unbind() for t in (self.m, self.z, self.count, self.sums))))  # chunk -> views
        self.buf = u_all.new_empty(rows.total * max(rows.b, min(chunk, q)))
        self._blocks: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def block(self, width: int):
        """(soft logits, hard mask, soft rows with key sums): views of one [total, width] block."""
        views = self._blocks.get(width)
        if views is None:
            rows = self.rows
            block = self.buf[: rows.total * width].view(rows.total, width)
            views = self._blocks[width] = (block[: rows.soft], block[rows.soft :], block[rows.first : rows.soft])
        return views

    def direction(self, u, keys_batch, queue, idx_queue, sims, hard_sums) -> None:
        """u: [soft, D] scaled queries; keys_batch: [B, D]; queue: [D, Q]; sims: [B, B] output;
        hard_sums: [hard, D] output (retrieval: the sums of the matching keys)."""
        self.step(u, keys_batch.T, self.idx, *self.slots[0], hard_sums, sims)
        for i, start in enumerate(range(0, queue.shape[1], self.chunk), 1):
            ids = None if idx_queue is None else idx_queue[start : start + self.chunk]
            self.step(u, queue[:, start : start + self.chunk], ids, *self.slots[i], hard_sums)

    def step(self, u, keys_t, ids, m, z, count, sums, hard_sums, sims=None) -> None:
        """One chunk of keys: keys_t [D, c] (a view, any strides) -> the chunk's partials."""
        in_batch = sims is not None  # the first chunk: it gives the sim block and starts hard_sums
        keys_t = keys_t.to(u.dtype)  # no copy unless the queue has another dtype
        logits, hard, weighted = self.block(keys_t.shape[1])
        torch.mm(u, keys_t, out=logits)
        if in_batch:
            sims.copy_(logits[: self.rows.b])  # before exp_ overwrites them
        torch.amax(logits, 1, keepdim=True, out=m)
        logits.sub_(m).exp_()
        torch.sum(logits, 1, keepdim=True, out=z)
        if sums.shape[0]:
            torch.mm(weighted, keys_t.T, out=sums)
        if ids is not None:
            hard.copy_(self.idx[:, None] == ids)
            torch.sum(hard, 1, keepdim=True, out=count)
            if in_batch:
                torch.mm(hard, keys_t.T, out=hard_sums)
            else:
                hard_sums.addmm_(hard, keys_t.T)

    def merge_into(self, states: _States, direction: int) -> None:
        """The chunks' partials -> states[direction] (weights e^{m_c - M})."""
        rows = self.rows
        mx, norm, sums = states.max[direction], states.norm[direction], states.sums[direction]
        torch.amax(self.m, 0, out=mx)
        w = self.m.sub(mx).exp_()  # [chunks, soft, 1]
        torch.sum(self.z.mul_(w), 0, out=norm[: rows.soft])
        if rows.hard:
            torch.sum(self.count, 0, out=norm[rows.soft :])
        if rows.soft > rows.first:
            torch.sum(self.sums.mul_(w[:, rows.first :]), 0, out=sums[: rows.soft - rows.first])


def _finish(states: _States, u_all, keys_batch, alpha: float, inv_t, teacher: bool, grad: bool, image_dtype,
            text_dtype, sims):
    """(loss, losses, grad_image, grad_text, grad_temp, grad_temp_dirs, sims, terms) from the
    merged states of both directions."""
    rows, (b, d) = states.rows, keys_batch.shape[1:]
    kinds = (rows.total - rows.first) // b
    mean_keys = (states.sums / states.norm[:, rows.first :]).view(2, kinds, b, d)  # E by kind: [s] [t] [h]
    if grad:  # E_s -> G in place, so that u . G is one dot (no cancellation of two large ones)
        g = mean_keys[:, 0]
        if teacher:
            g.sub_(mean_keys[:, 1], alpha=alpha)
        g.sub_(mean_keys[:, -1] if rows.hard else keys_batch, alpha=1.0 - alpha)
    dots, names = _row_values(states, u_all, keys_batch, mean_keys, teacher, grad)
    # [loss, ce, kl, -u.G] x directions: one product of the row means with the coefficients
    # (out=: autocast, which would run a functional mm in bf16 / fp16, leaves out= ops alone)
    table = torch.mm(_coefficients(names, teacher, alpha, dots), dots.mean(-1).T, out=dots.new_empty(4, 2))
    losses, terms = table[0], table[1:3].flatten().clone()  # (ce_i2t, ce_t2i, kl_i2t, kl_t2i)
    grad_temp_dirs = table[3] * inv_t
    if grad:
        scale = inv_t * (0.5 / b)  # the 1 / B of the mean over rows, the 1 / 2 of the mean of directions
        grad_image, grad_text = (g[0] * scale).to(image_dtype), (g[1] * scale).to(text_dtype)
    else:
        grad_image = u_all.new_zeros((b, d), dtype=image_dtype)
        grad_text = u_all.new_zeros((b, d), dtype=text_dtype)
    return losses.mean(), losses, grad_image, grad_text, grad_temp_dirs.mean(), grad_temp_dirs, sims, terms


def _row_values(states: _States, u_all, keys_batch, mean_keys, teacher: bool, grad: bool):
    """([2, values, B] per row, their names in _ROW_COEFFICIENTS), in this order: lse_s, lse_m
    (teacher); u . E of each kind kept (g = u . G, t, h with retrieval); h = u . k_r (pretraining);
    x = u_m . E_t (teacher)."""
    rows, b = states.rows, keys_batch.shape[1]
    n_soft, kinds = rows.soft // b, mean_keys.shape[1]
    kind_names = ["g"] * grad + ["t"] * teacher + ["h"] * bool(rows.hard)
    names = ["lse_s", "lse_m"][:n_soft] + kind_names + ["h"] * (not rows.hard) + ["x"] * teacher
    dots = u_all.new_empty(2, len(names), b)
    lse = states.norm[:, : rows.soft].log().view(2, n_soft, b)
    torch.add(states.max.view(2, n_soft, b), lse, out=dots[:, :n_soft])
    u = u_all[:, :b]
    torch.sum(u[:, None] * mean_keys, -1, out=dots[:, n_soft : n_soft + kinds])
    row = n_soft + kinds
    if not rows.hard:
        torch.sum(u * keys_batch, -1, out=dots[:, row])
        row += 1
    if teacher:
        torch.sum(u_all[:, b:] * mean_keys[:, int(grad)], -1, out=dots[:, row])
    return dots, tuple(names)


# Coefficients of each row value in (loss, ce, kl, -u.G): (constant part, part times alpha).
# lse_s, lse_m: the soft rows' log-sum-exp; g = u.G; t = u.E_t; h = u.h_k; x = u_m.E_t.
_ROW_COEFFICIENTS = {
    "lse_s": ((1, 1, 1, 0), (0, 0, 0, 0)),
    "lse_m": ((0, 0, -1, 0), (0, 0, 0, 0)),
    "g": ((0, 0, 0, -1), (0, 0, 0, 0)),
    "t": ((0, 0, -1, 0), (-1, 0, 0, 0)),
    "h": ((-1, -1, 0, 0), (1, 0, 0, 0)),
    "x": ((0, 0, 1, 0), (0, 0, 0, 0)),
}
_COEFFICIENTS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_KEPT_WHILE_CAPTURED: List[torch.Tensor] = []  # pinned sources of copies in CUDA graphs (_to_device)


def _coefficients(names: Tuple[str, ...], teacher: bool, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """[4, rows] coefficients for these row values (kl is 0 without the teacher). Kept on the
    device per layout: one op a call, no host-to-device copy after the first."""
    key = (names, teacher, like.device, like.dtype)
    pair = _COEFFICIENTS.get(key)
    if pair is None:
        keep_kl = (1, 1, int(teacher), 1)
        parts = [[[c * k for c, k in zip(_ROW_COEFFICIENTS[name][i], keep_kl)] for name in names] for i in (0, 1)]
        # built on the CPU whatever the default device (torch.set_default_device), then copied
        pair = _COEFFICIENTS[key] = tuple(_to_device(torch.tensor(p, dtype=like.dtype, device="cpu").T, like.device)
                                          for p in parts)
    return torch.add(pair[0], pair[1], alpha=alpha)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Without a host sync (pinned memory, asynchronous copy) on CUDA. A copy captured in a CUDA
    graph reads its pinned source at every replay: kept for the process then (as the CUDA EMA
    keeps its table, csrc/cuda/ema.cu), since older torch recycles a freed pinned block."""
    if device.type != "cuda":
        return t.contiguous().to(device)
    pinned = t.contiguous().pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _KEPT_WHILE_CAPTURED.append(pinned)
    return pinned.to(device, non_blocking=True)
