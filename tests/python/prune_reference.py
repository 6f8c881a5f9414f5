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
* `dsnot` — Zhang et al. 2024 on the Wanda mask, as the authors' code runs
  it: with m_j = W_j * E[x_j] (E[x_j] = 2048 × the mean of x_j: the sum over
  a 2048-token sequence, the authors' scale), r = sum of m_j over pruned j.
  The initially pruned weights are ranked by m_j / Var(x_j); the initially
  kept ones with m < 0 and with m > 0 are each ranked by Wanda score. While
  |r| > 0.1 and fewer than 50 swaps: grow the next pruned weight from the top
  of its ranking if r > 0, from the bottom if r < 0 (stop if its m does not
  share r's sign); prune, unstructured, the next kept weight of the opposite
  sign (lowest Wanda first), N:M, the kept weight of lowest Wanda score in
  the grown weight's block that has not itself grown; N:M stops a row rather
  than let r change sign.

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
    nm = pattern[0] != "frac"
    for r in range(rows):
        m = W[r] * mean
        wanda = np.abs(W[r]) * norm
        pruned0 = np.flatnonzero(~keep[r])
        growth = pruned0[np.lexsort((pruned0, m[pruned0] / np.maximum(var[pruned0], 1e-12)))]
        kept0 = np.flatnonzero(keep[r])
        neg = [k for k in kept0[np.lexsort((kept0, wanda[kept0]))] if m[k] < 0]
        pos = [k for k in kept0[np.lexsort((kept0, wanda[kept0]))] if m[k] > 0]
        err = m[pruned0].sum()
        sign0 = np.sign(err)
        lo, hi = 0, len(growth)
        grown = np.zeros(cols, dtype=bool)
        for _ in range(cycles):
            if abs(err) <= threshold or lo >= hi:
                break
            j = growth[hi - 1] if err > 0 else growth[lo]
            if m[j] * err <= 0:
                break
            if nm:
                b0 = j // pattern[2] * pattern[2]
                cands = [k for k in range(b0, b0 + pattern[2]) if keep[r, k] and not grown[k]]
                if not cands:
                    break
                k = min(cands, key=lambda k: (wanda[k], k))
            else:
                queue = neg if err > 0 else pos
                if not queue:
                    break
                k = queue.pop(0)
            nxt = err - m[j] + m[k]
            if nm and np.sign(nxt) != sign0:
                break
            if err > 0:
                hi -= 1
            else:
                lo += 1
            keep[r, j], keep[r, k] = True, False
            grown[j] = True
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
