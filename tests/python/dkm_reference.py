"""One DKM step in numpy, from the paper (Cho et al. 2022, Algorithm 1): an
independent check of oqt's Burn implementation (issue 39).

    dkm_reference.py W.f32 C.f32 G.f32 TAU ITERATIONS OUT

W holds N weights, C the K starting centroids, G an upstream gradient dL/dŴ
(N values). The step, in float64:

    repeat ITERATIONS times:
        A = softmax(-(w_i - c_j)^2 / TAU) over j      (the soft assignment, N x K)
        c_j = sum_i A_ij w_i / sum_i A_ij             (the centroid update)
    A = softmax(-(w_i - c_j)^2 / TAU) with the final centroids
    Ŵ = A c

and L = sum_i G_i Ŵ_i. The gradients dL/dW and dL/dC are taken by central
finite differences of that whole computation (no hand-derived backward, so
the check does not share a derivation with the code it checks).

Writes OUT.what (Ŵ), OUT.c (final centroids), OUT.gw, OUT.gc (f32).
"""

import sys

import numpy as np


def forward(w, c, tau, iterations):
    for _ in range(iterations):
        a = assignment(w, c, tau)
        c = (a * w[:, None]).sum(axis=0) / a.sum(axis=0)
    a = assignment(w, c, tau)
    return a @ c, c


def assignment(w, c, tau):
    logits = -((w[:, None] - c[None, :]) ** 2) / tau
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def main(w_path, c_path, g_path, tau, iterations, out):
    w = np.fromfile(w_path, dtype="<f4").astype(np.float64)
    c = np.fromfile(c_path, dtype="<f4").astype(np.float64)
    g = np.fromfile(g_path, dtype="<f4").astype(np.float64)
    tau, iterations = float(tau), int(iterations)
    w_hat, c_final = forward(w, c, tau, iterations)
    loss = lambda w_, c_: float(g @ forward(w_, c_, tau, iterations)[0])
    h = 1e-7
    gw = np.empty_like(w)
    for i in range(len(w)):
        up, down = w.copy(), w.copy()
        up[i] += h
        down[i] -= h
        gw[i] = (loss(up, c) - loss(down, c)) / (2 * h)
    gc = np.empty_like(c)
    for j in range(len(c)):
        up, down = c.copy(), c.copy()
        up[j] += h
        down[j] -= h
        gc[j] = (loss(w, up) - loss(w, down)) / (2 * h)
    for ext, v in [(".what", w_hat), (".c", c_final), (".gw", gw), (".gc", gc)]:
        v.astype("<f4").tofile(out + ext)


if __name__ == "__main__":
    main(*sys.argv[1:])
