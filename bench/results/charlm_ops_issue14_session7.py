"""kiln ops against torch at the charlm Transformer's block shapes (B32 T96 dim128: 3072 rows), forward+backward,
kiln and torch alternating in one process (min of 3 medians of 9 rounds), default threads.

    python bench/results/charlm_ops_issue14_session7.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

import kiln


def tt(f, n=None):
    f(); f()
    s = time.perf_counter(); f(); once = time.perf_counter() - s
    n = max(1, int(0.03 / once))
    r = []
    for _ in range(9):
        s = time.perf_counter()
        for _ in range(n): f()
        r.append((time.perf_counter() - s) / n)
    return statistics.median(r) * 1e3


def pair(name, a, b):
    ta, tb = [], []
    for _ in range(3):
        ta.append(tt(a)); tb.append(tt(b))
    ka, kb = min(ta), min(tb)
    print("%-36s kiln %.3f ms torch %.3f ms  torch/kiln %.2fx" % (name, ka, kb, kb / ka))


torch.manual_seed(0)
R, D = 3072, 128
x = torch.randn(R, D, requires_grad=True); w = torch.randn(D, requires_grad=True); b = torch.randn(D, requires_grad=True)
dy = torch.randn(R, D)
pair("layer_norm 3072x128 f+b", lambda: kiln.ops.layer_norm(x, (D,), w, b).backward(dy), lambda: F.layer_norm(x, (D,), w, b).backward(dy))
for out, act in [(384, "identity"), (512, "gelu")]:
    W = torch.randn(out, D, requires_grad=True); bb = torch.randn(out, requires_grad=True); g2 = torch.randn(R, out)
    tf = (lambda W=W, bb=bb: F.gelu(F.linear(x, W, bb))) if act == "gelu" else (lambda W=W, bb=bb: F.linear(x, W, bb))
    pair(f"linear_act 3072x128x{out} {act} f+b", lambda W=W, bb=bb, g2=g2: kiln.ops.linear_act(x, W, bb, act).backward(g2), lambda tf=tf, g2=g2: tf().backward(g2))
h = torch.randn(R, 512, requires_grad=True); W2 = torch.randn(D, 512, requires_grad=True); b2 = torch.randn(D, requires_grad=True)
pair("linear_act 3072x512x128 f+b", lambda: kiln.ops.linear_act(h, W2, b2, "identity").backward(dy), lambda: F.linear(h, W2, b2).backward(dy))
q = torch.randn(32, 4, 96, 32, requires_grad=True); do = torch.randn(32, 4, 96, 32)
pair("attention 32x4x96x32 causal f+b", lambda: kiln.ops.attention(q, q, q, causal=True).backward(do), lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).backward(do))
Wv = torch.randn(128, D, requires_grad=True); t = torch.randint(0, 128, (R,))
pair("linear_cross_entropy V128 f+b", lambda: kiln.ops.linear_cross_entropy(x, Wv, t).backward(), lambda: F.cross_entropy(F.linear(x, Wv), t).backward())
pair("dropout 3072x128 p0.1 f+b", lambda: kiln.ops.dropout(x, 0.1).backward(dy), lambda: F.dropout(x, 0.1).backward(dy))
