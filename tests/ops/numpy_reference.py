"""Float64 NumPy M2RNN written from SPEC §2.1 and §4.1: a literal per-step loop, forward and hand-written BPTT.

Independent of JAX: it is the ground truth the ``lax.scan`` reference is checked against (forward, and gradients
including the fused-kernel clipping placement of SPEC §0.1).
"""

from __future__ import annotations

import numpy as np


def _expand(x: np.ndarray, num_heads: int, axis: int) -> np.ndarray:
    return np.repeat(x, num_heads // x.shape[axis], axis=axis)


def _reduce(x: np.ndarray, source_heads: int, axis: int) -> np.ndarray:
    shape = x.shape[:axis] + (source_heads, x.shape[axis] // source_heads) + x.shape[axis + 1 :]
    return x.reshape(shape).sum(axis=axis + 1)


def forward_sequence(q, k, v, W, f, h0):
    """One sequence, heads already expanded: q, k (S,N,K), v (S,N,V), f (S,N), W (N,V,V), h0 (N,K,V).

    Returns y (S,N,V), states H (S+1,N,K,V) with H[0] = h0, and the tanh outputs Z (S,N,K,V).
    """
    steps = q.shape[0]
    states = [h0]
    zs = []
    for t in range(steps):
        h_prev = states[-1]
        z = np.tanh(np.einsum("nkv,nvw->nkw", h_prev, W) + k[t][:, :, None] * v[t][:, None, :])
        ft = f[t][:, None, None]
        states.append(ft * h_prev + (1 - ft) * z)
        zs.append(z)
    states = np.stack(states)
    y = np.einsum("snkv,snk->snv", states[1:], q)
    return y, states, np.stack(zs) if zs else np.zeros((0,) + h0.shape)


def backward_sequence(q, k, v, W, f, states, zs, dy, dh_final, clip):
    """SPEC §4.1 BPTT for one sequence (heads expanded); returns dq, dk, dv, df, dW (per output head), dh0."""
    steps = q.shape[0]
    dq, dk, dv, df = (np.zeros_like(x) for x in (q, k, v, f))
    dW = np.zeros_like(W)
    r = dh_final.copy()
    for t in range(steps - 1, -1, -1):
        h_t, h_prev, z = states[t + 1], states[t], zs[t]
        dq[t] = np.einsum("nkv,nv->nk", h_t, dy[t])
        if clip is not None:
            r = np.clip(r, -clip, clip)
        g = q[t][:, :, None] * dy[t][:, None, :] + r
        df[t] = np.sum(g * (h_prev - z), axis=(1, 2))
        dp = (1 - f[t])[:, None, None] * g * (1 - z**2)
        dW += np.einsum("nkv,nkw->nvw", h_prev, dp)
        dv[t] = np.einsum("nkv,nk->nv", dp, k[t])
        dk[t] = np.einsum("nkv,nv->nk", dp, v[t])
        r = f[t][:, None, None] * g + np.einsum("nkw,nvw->nkv", dp, W)
    return dq, dk, dv, df, dW, r


def m2rnn_numpy(q, k, v, W, f, h0, cu_seqlens=None, dy=None, dh_final=None, clip=None):
    """Forward (and, if dy is given, backward) of the op in float64 for dense or varlen inputs.

    Shapes follow the op contract. Returns (y, h_final) or (y, h_final, grads) where grads is a dict with
    q, k, v, W, f, h0 gradients reduced to the source head counts.
    """
    q, k, v, W, f = (np.asarray(x, np.float64) for x in (q, k, v, W, f))
    varlen = cu_seqlens is not None
    if not varlen:
        batch, steps = q.shape[:2]  # pack (B, S, ...) as B sequences of S tokens
        q, k, v, f = (x.reshape((batch * steps,) + x.shape[2:]) for x in (q, k, v, f))
        offsets = np.arange(batch + 1) * steps
        dy_packed = None if dy is None else np.asarray(dy, np.float64).reshape((batch * steps,) + dy.shape[2:])
    else:
        offsets = np.asarray(cu_seqlens)
        batch = len(offsets) - 1
        dy_packed = None if dy is None else np.asarray(dy, np.float64)
    counts = {"q": q.shape[1], "k": k.shape[1], "v": v.shape[1], "f": f.shape[1], "W": W.shape[0]}
    n = max(counts.values())
    kd, vd = q.shape[-1], v.shape[-1]
    h0 = np.zeros((batch, n, kd, vd)) if h0 is None else np.asarray(h0, np.float64)
    qe, ke, ve = (_expand(x, n, 1) for x in (q, k, v))
    fe, We = _expand(f, n, 1), _expand(W, n, 0)
    y = np.zeros((q.shape[0], n, vd))
    finals = np.zeros_like(h0)
    grads = {name: np.zeros((q.shape[0],) + x.shape[1:]) for name, x in (("q", qe), ("k", ke), ("v", ve), ("f", fe))}
    grads["W"], grads["h0"] = np.zeros_like(We), np.zeros_like(h0)
    for b in range(batch):
        s, e = offsets[b], offsets[b + 1]
        yb, states, zs = forward_sequence(qe[s:e], ke[s:e], ve[s:e], We, fe[s:e], h0[b])
        y[s:e], finals[b] = yb, states[-1]
        if dy_packed is not None:
            dhf = np.zeros_like(h0[b]) if dh_final is None else np.asarray(dh_final, np.float64)[b]
            dq, dk, dv, df, dW, dh0 = backward_sequence(
                qe[s:e], ke[s:e], ve[s:e], We, fe[s:e], states, zs, dy_packed[s:e], dhf, clip
            )
            grads["q"][s:e], grads["k"][s:e], grads["v"][s:e], grads["f"][s:e] = dq, dk, dv, df
            grads["W"] += dW
            grads["h0"][b] = dh0
    if not varlen:
        y = y.reshape((batch, -1) + y.shape[1:])
        for name in ("q", "k", "v", "f"):
            grads[name] = grads[name].reshape((batch, -1) + grads[name].shape[1:])
    if dy is None:
        return y, finals
    head_axis = 1 if varlen else 2
    for name in ("q", "k", "v", "f"):
        grads[name] = _reduce(grads[name], counts[name], head_axis)
    grads["W"] = _reduce(grads["W"], counts["W"], 0)
    return y, finals, grads
