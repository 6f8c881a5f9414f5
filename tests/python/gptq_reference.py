"""GPTQ, one layer, from the paper (Frantar et al. 2022, Algorithm 1), in numpy:
an independent check of oqt's Rust implementation.

    gptq_reference.py W.f32 X.f32 ROWS COLS BITS DAMP OUT

W is [ROWS, COLS] (rows = output channels), X is [n, COLS] calibration inputs.
The grid is symmetric per output channel with scale amax / (2^(BITS-1) - 1)
from the original row, values rounded half to even and clamped to
[-2^(BITS-1), 2^(BITS-1) - 1]. H = 2 XᵀX, dampened by DAMP × mean(diag H);
columns are swept in their natural order, one at a time (the paper's lazy
block updates only reorder this arithmetic). Writes OUT.q (the integer codes,
int8 [ROWS, COLS]), OUT.scales (f32 [ROWS]) and OUT.json (the layer's output
error ‖X Wᵀ − X Ŵᵀ‖² for RTN and GPTQ).
"""

import json
import sys

import numpy as np


def main(w_path, x_path, rows, cols, bits, damp, out_path):
    rows, cols, bits, damp = int(rows), int(cols), int(bits), float(damp)
    W = np.fromfile(w_path, dtype="<f4").reshape(rows, cols).astype(np.float64)
    X = np.fromfile(x_path, dtype="<f4").reshape(-1, cols).astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    # The grid, fixed from the original weights (per channel).
    scale = (np.abs(W).max(axis=1) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    s = scale.astype(np.float64)[:, None]

    def quant(col, s_col):
        return np.clip(np.round(col / s_col), qmin, qmax)

    H = 2.0 * X.T @ X
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    # Upper Cholesky factor of H^-1: U^T U = H^-1.
    U = np.linalg.cholesky(np.linalg.inv(H)).T

    Wk = W.copy()
    Q = np.zeros((rows, cols))
    for i in range(cols):
        q = quant(Wk[:, i : i + 1], s)[:, 0]
        Q[:, i] = q
        err = (Wk[:, i] - q * s[:, 0]) / U[i, i]
        Wk[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])

    def out_err(Wq):
        D = (W - Wq) @ X.T
        return float(np.sum(D * D))

    rtn = quant(W, s)
    Q.astype(np.int8).tofile(out_path + ".q")
    scale.astype("<f4").tofile(out_path + ".scales")
    with open(out_path + ".json", "w") as f:
        json.dump({"gptq_error": out_err(Q * s), "rtn_error": out_err(rtn * s)}, f)


if __name__ == "__main__":
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    main(*sys.argv[1:])
