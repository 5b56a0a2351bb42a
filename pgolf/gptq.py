"""Weight quantization: per-row symmetric scales, round-to-nearest (RTN) and GPTQ.

A matrix W [rows, cols] becomes integer codes Q in [-qmax, qmax] (qmax = 2**(bits-1) - 1) and one
float16 scale per row, W ≈ Q * scale[:, None]. Scales come either from a clip search: per row, the
clip ratio (scale = ratio * max|w| / qmax) whose error, weighted by the layer's input Hessian H = XᵀX,
is smallest - after rounding for RTN, after the whole GPTQ sweep for GPTQ; or from the records' SD
clip (PR #1394): scale = k * std(row) / qmax, one sweep, no search. Clipping at k standard deviations
instead of at the row's largest weight narrows the codes' distribution, so the entropy coder stores
them in fewer bits (about bits - log2(clip width) fewer per weight) at some cost in rounding error.

GPTQ (Frantar et al., 2022) quantizes one column at a time and spreads each column's error over the
columns not yet quantized, using the Cholesky factor of H⁻¹; columns may go in order of decreasing
H diagonal (act-order), and updates are applied lazily in blocks. Everything runs in float64 so that
the blocked implementation and the column-by-column reference give the same codes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def codes_for(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Nearest codes of w ([rows] or [rows, cols]) under per-row scales."""
    s = scale if w.ndim == 1 else scale[:, None]
    return torch.clamp(torch.round(w / s), -qmax(bits), qmax(bits))


def h_error(err: Tensor, H: Tensor | None) -> Tensor:
    """Per-row error e H eᵀ: H shared [cols, cols], per row [rows, cols, cols], or None (squared error)."""
    if H is None:
        return (err * err).sum(1)
    if H.ndim == 3:
        return torch.einsum("rc,rcd,rd->r", err, H, err)
    return ((err @ H) * err).sum(1)


def candidate_scales(W: Tensor, bits: int, sigmas: float | None) -> list[Tensor]:
    """Per-row scales to try (float16-representable, float64): CLIP_GRID's ratios of max|w| when sigmas
    is None, else the one SD-clip scale sigmas * std(row) / qmax."""
    if sigmas is None:
        spans = [ratio * W.abs().amax(1).clamp_min(1e-8) for ratio in CLIP_GRID]
    else:
        spans = [sigmas * W.std(1)]  # torch's std: the unbiased estimate, as the records compute it
    return [(span / qmax(bits)).half().double().clamp_min(torch.finfo(torch.float16).tiny) for span in spans]


def clip_search(W: Tensor, H: Tensor | None, quantize: Callable[[Tensor], Tensor], candidates: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per row, the candidate scale whose codes have the smallest H-weighted error of W (float64).

    quantize(scale) gives the codes [rows, cols] for per-row scales; rows are independent given H, so
    each keeps its own best candidate (with the SD clip there is one). Returns (int8 codes, float16 scales).
    """
    best_err = torch.full((W.size(0),), float("inf"), dtype=W.dtype)
    codes, scales = torch.zeros_like(W), torch.zeros_like(best_err)
    for scale in candidates:
        Q = quantize(scale)
        err = h_error(W - Q * scale[:, None], H)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        codes[better], scales[better] = Q[better], scale[better]
    return codes.to(torch.int8), scales.half()


def rtn(w: Tensor, bits: int, H: Tensor | None = None, sigmas: float | None = None) -> tuple[Tensor, Tensor]:
    """Round to nearest with the scales GPTQ would use: (int8 codes, float16 scales)."""
    W = w.double()
    return clip_search(W, None if H is None else H.double(), lambda scale: codes_for(W, scale, bits), candidate_scales(W, bits, sigmas))


def _prepare(w: Tensor, H: Tensor, damp: float, act_order: bool):
    W, H = w.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: any weight there is free to be 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.size(0))
    Hp = H[perm][:, perm]
    Hp += damp * torch.diag(Hp).mean() * torch.eye(Hp.size(0), dtype=Hp.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    return W, perm, Hinv


def _sweep_blocked(W: Tensor, Hinv: Tensor, scale: Tensor, bits: int, block_size: int) -> Tensor:
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block_size):
        i2 = min(i1 + block_size, W.size(1))
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            Q[:, i1 + i] = codes_for(W1[:, i], scale, bits)
            err = (W1[:, i] - Q[:, i1 + i] * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def _sweep_reference(W: Tensor, Hinv: Tensor, scale: Tensor, bits: int, block_size: int) -> Tensor:
    Q = torch.zeros_like(W)
    for j in range(W.size(1)):
        Q[:, j] = codes_for(W[:, j], scale, bits)
        err = (W[:, j] - Q[:, j] * scale) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
    return Q


def _gptq(w: Tensor, H: Tensor, bits: int, damp: float, block_size: int, act_order: bool, sweep, sigmas: float | None) -> tuple[Tensor, Tensor]:
    # The sweep runs once per candidate scale; each row keeps the one with its smallest output error.
    # Scales come from the weights as trained, before dead inputs are zeroed (as the records do).
    W, perm, Hinv = _prepare(w, H, damp, act_order)
    quantize = lambda scale: sweep(W[:, perm].clone(), Hinv, scale, bits, block_size)[:, torch.argsort(perm)]  # noqa: E731
    return clip_search(W, H.double(), quantize, candidate_scales(w.double(), bits, sigmas))


def gptq(w: Tensor, H: Tensor, bits: int, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
         sigmas: float | None = None) -> tuple[Tensor, Tensor]:
    """GPTQ with lazy block updates, per-row scales from the clip search or, given sigmas, the SD clip:
    (int8 codes [rows, cols], float16 scales [rows])."""
    return _gptq(w, H, bits, damp, block_size, act_order, _sweep_blocked, sigmas)


def gptq_reference(w: Tensor, H: Tensor, bits: int, damp: float = 0.01, act_order: bool = True, sigmas: float | None = None) -> tuple[Tensor, Tensor]:
    """The plain definition: quantize column j, then push its error onto every later column at once."""
    return _gptq(w, H, bits, damp, 0, act_order, _sweep_reference, sigmas)


def gptq_rows(w: Tensor, H: Tensor, bits: int, damp: float = 0.01, sigmas: float | None = None) -> tuple[Tensor, Tensor]:
    """GPTQ with one Hessian per row (H [rows, cols, cols]), all rows swept together, natural column order.

    For a matrix whose rows see different inputs, such as a tied embedding: each row gets exactly what
    gptq_reference gives that row alone with its own Hessian and act_order off (tested).
    """
    W, H = w.double(), H.double()
    candidates = candidate_scales(W, bits, sigmas)
    Hd = H.clone()
    dead = torch.diagonal(Hd, dim1=1, dim2=2) == 0
    Hd[dead.unsqueeze(2) & torch.eye(H.size(1), dtype=torch.bool)] = 1.0
    W = W * ~dead
    mean = torch.diagonal(Hd, dim1=1, dim2=2).mean(1)
    Hd += (damp * mean)[:, None, None] * torch.eye(H.size(1), dtype=Hd.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)

    def sweep(scale: Tensor) -> Tensor:
        Wc, Q = W.clone(), torch.zeros_like(W)
        for j in range(W.size(1)):
            Q[:, j] = codes_for(Wc[:, j], scale, bits)
            err = (Wc[:, j] - Q[:, j] * scale) / Hinv[:, j, j]
            Wc[:, j + 1 :] -= err[:, None] * Hinv[:, j, j + 1 :]
        return Q

    return clip_search(W, H, sweep, candidates)
