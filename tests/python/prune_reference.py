"""Pruning of one layer, from the papers, in numpy: an independent check of
oqt's Rust implementation (issue 38).

    prune_reference.py W.f32 X.f32 ROWS COLS METHOD PATTERN OUT

W is [ROWS, COLS] (rows = output channels), X is [n, COLS] calibration
inputs (one window). PATTERN is a fraction (`0.5`, unstructured) or `N:M`.
METHOD is one of

* `magnitude` — per output row, zero the floor(COLS * fraction) smallest |W|
  (N:M: the M-N smallest of every block of M), ties keeping the lower column;
* `wanda` — the same ranking on |W_ij| * ||X_j||_2 (Sun et al. 2023);
* `sparsegpt` — Frantar & Alistarh 2023, Algorithm 1, one column at a time:
  H = XᵀX + 1% of its mean diagonal, U the upper Cholesky factor of H^-1;
  at every block of 128 columns the unstructured mask is chosen over the whole
  block (all rows) by the OBS saliency w² / U[c,c]² (the paper's adaptive mask
  selection); N:M masks are chosen when the sweep reaches each block of M
  columns; a pruned weight's error w / U[i,i] is subtracted along U[i, i+1:];
* `dsnot` — Zhang et al. 2024 on the Wanda mask: with m_j = W_j * E[x_j]
  (E[x_j] = 2048 × the mean of x_j: the sum over a
  2048-token sequence, the authors' scale), r = sum of m_j over pruned j; while
  |r| > 0.1 and fewer than 50 swaps: grow the pruned weight of sign(m) =
  sign(r) with the largest |m_j| / Var(x_j), prune the kept weight with the
  lowest Wanda score (N:M: inside the grown weight's block, and only among
  weights with sign(m) opposite to r; the pair whose grown weight scores
  highest), keep the swap only if |r| shrinks; a weight swapped once is not
  swapped again.

Writes OUT.keep (uint8 mask, 1 = kept, [ROWS, COLS]) and OUT.w (f32 pruned
weights).
"""

import sys

import numpy as np


def pattern_of(s):
    if ":" in s:
        n, m = s.split(":")
        return ("nm", int(n), int(m))
    return ("frac", float(s))


def rank_mask(scores, pattern):
    """Keep the highest scores per row (ties: the lower column is kept)."""
    rows, cols = scores.shape
    keep = np.ones_like(scores, dtype=bool)
    for r in range(rows):
        if pattern[0] == "frac":
            drop = int(np.floor(cols * pattern[1] + 1e-4))
            # Lowest first; among equal scores the later column first.
            order = sorted(range(cols), key=lambda c: (scores[r, c], -c))
            keep[r, order[:drop]] = False
        else:
            _, n, m = pattern
            for b in range(0, cols, m):
                order = sorted(range(b, b + m), key=lambda c: (scores[r, c], -c))
                keep[r, order[: m - n]] = False
    return keep


def sparsegpt(W, X, pattern, block=128, damp=0.01):
    rows, cols = W.shape
    H = X.T @ X
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    d = np.diag(U)
    W = W.copy()
    keep = np.ones((rows, cols), dtype=bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        if pattern[0] == "frac":
            sal = W[:, b0:b1] ** 2 / d[None, b0:b1] ** 2
            flat = [(sal[r, c], -(r * (b1 - b0) + c), r, c) for r in range(rows) for c in range(b1 - b0)]
            flat.sort()
            drop = int(np.floor(len(flat) * pattern[1] + 1e-4))
            for _, _, r, c in flat[:drop]:
                keep[r, b0 + c] = False
        for i in range(b0, b1):
            if pattern[0] == "nm" and (i - b0) % pattern[2] == 0:
                _, n, m = pattern
                for r in range(rows):
                    order = sorted(range(i, i + m), key=lambda c: (W[r, c] ** 2 / d[c] ** 2, -c))
                    keep[r, order[: m - n]] = False
            pruned = ~keep[:, i]
            err = np.where(pruned, W[:, i] / U[i, i], 0.0)
            W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
            W[pruned, i] = 0.0
    return W, keep


def dsnot(W, X, pattern, cycles=50, threshold=0.1):
    rows, cols = W.shape
    norm = np.sqrt((X**2).sum(axis=0))
    keep = rank_mask(np.abs(W) * norm[None, :], pattern)
    mean = 2048.0 * X.mean(axis=0)
    var = X.var(axis=0)
    for r in range(rows):
        w = W[r]
        m = w * mean
        grow = np.abs(m) / np.maximum(var, 1e-12)
        wanda = np.abs(w) * norm
        err = m[~keep[r]].sum()
        touched = np.zeros(cols, dtype=bool)
        for _ in range(cycles):
            if abs(err) <= threshold:
                break
            sign = np.sign(err)
            growable = [j for j in range(cols) if not keep[r, j] and not touched[j] and m[j] * sign > 0]

            def prune_in(lo, hi, check):
                cands = [k for k in range(lo, hi) if keep[r, k] and not touched[k] and (not check or m[k] * sign < 0)]
                return min(cands, key=lambda k: wanda[k]) if cands else None

            pair = None
            if pattern[0] == "frac":
                if growable:
                    j = max(growable, key=lambda j: grow[j])
                    k = prune_in(0, cols, False)
                    pair = (j, k) if k is not None else None
            else:
                blk = pattern[2]
                best = None
                for j in growable:
                    k = prune_in(j // blk * blk, j // blk * blk + blk, True)
                    if k is not None and (best is None or grow[j] > grow[best[0]]):
                        best = (j, k)
                pair = best
            if pair is None:
                break
            j, k = pair
            nxt = err - m[j] + m[k]
            if abs(nxt) >= abs(err):
                break
            keep[r, j], keep[r, k] = True, False
            touched[j] = touched[k] = True
            err = nxt
    return np.where(keep, W, 0.0), keep


def main(w_path, x_path, rows, cols, method, pattern, out):
    rows, cols = int(rows), int(cols)
    W = np.fromfile(w_path, dtype="<f4").reshape(rows, cols).astype(np.float64)
    X = np.fromfile(x_path, dtype="<f4").reshape(-1, cols).astype(np.float64)
    p = pattern_of(pattern)
    if method == "magnitude":
        keep = rank_mask(np.abs(W), p)
        Wp = np.where(keep, W, 0.0)
    elif method == "wanda":
        keep = rank_mask(np.abs(W) * np.sqrt((X**2).sum(axis=0))[None, :], p)
        Wp = np.where(keep, W, 0.0)
    elif method == "sparsegpt":
        Wp, keep = sparsegpt(W, X, p)
    elif method == "dsnot":
        Wp, keep = dsnot(W, X, p)
    else:
        raise SystemExit(f"unknown method {method}")
    keep.astype(np.uint8).tofile(out + ".keep")
    Wp.astype("<f4").tofile(out + ".w")


if __name__ == "__main__":
    main(*sys.argv[1:])
