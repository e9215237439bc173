""" The fused CPU write of the Titans memory: the chunked update in the dual form, as one autograd node with a
hand-written backward, and the scratch pool its buffers come from.

This is the fast path of ``memory.py``'s forward (write from M0, then every token reads the final memory). It
computes exactly the update of ``memory_functional.chunked_write`` (the readable loop), which the tests hold it to,
together with a float64 token-by-token reference and ``gradcheck`` of the backward. The tricks below are here
because they were measured to pay; the readable path stays in ``memory_functional.py``.

The dual form: the weights at each chunk start are never built; they are M0 plus a weighted sum of the earlier
tokens' rank-one updates (``memory_functional.write_coefficients``), so reading them is a token-by-token matmul;
only the final weights are built, once.

Speed notes (``benchmarks/memory_speed.py``; D=192, 3 heads, N=197, batch 8, chunk 16, one CPU thread):

* ``simple`` at its default depth 1 costs about 0.8x a Block (the linear write has no hidden layer to carry);
  at depth 2 it writes exactly as ``advanced`` does.
* Where the time goes: ``advanced`` costs about 2.8x a timm Block; of that the write's backward is ~60%, its forward
  ~25%, projections + read the rest. The dual form does ~3.4 GMAC per forward+backward (the Block ~2.5 GMAC), a
  third of it in the token-pair terms between chunks, at roughly half the Block's matmul efficiency (16-row
  matmuls, hidden-sized elementwise passes that miss the L2 cache).
* Tried and measured: the explicit chunk loop (build W and S at every chunk start, ``chunked_write``) costs 234 ms
  against the dual form's 137 ms (autograd backward; the W/S state traffic is 4 x 1.5 MB per chunk); materialising
  the state every few chunks to cut the pair terms saves no FLOPs at N=197 (the state build costs what the pairs
  saved);
  the explicit loop again as one node with a hand-written backward (half the dual form's FLOPs, the chunk states
  kept for the backward) measured 219 ms against 172 ms for this dual form in the same run: its 16-row matmuls
  read per-image weights, which stream from L3 at ~21 GMAC/s where the per-head ones run at ~60;
  bf16 matmuls (AMX) are 1.6-4x faster but break the float32 inner loop the memory promises;
  ``torch.compile`` (inductor) of the explicit loop + read measured 2.4x a Block against this dual form's 3.1x
  in the same run, after 94 s of compiling (not something a model should do on its first call).
* Done: O(chunk) momentum coefficients (a log-sum-exp scan, not a chunk x chunk matrix: -20 ms at chunk None),
  contiguous matmul outputs (a strided ``out=`` made bmm fall back to per-image matmuls), one matmul for
  q/k/v/gates, hidden-sized temporaries from the scratch pool (fresh multi-MB tensors page-fault on CPU), recycled
  within a call so peak memory does not grow. The read stays outside the dual-form node (see ``_DualWrite``).
* Left: a fused kernel per chunk (one pass over the chunk's hidden-sized tensors) is what the 2x target needs.
"""
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from .memory_functional import NORMALISER_MIN, upcast, write_coefficients

__all__ = ['dual_form_write', 'empty_scratch_pool']


_silu_backward = torch.ops.aten.silu_backward
_sigmoid_backward = torch.ops.aten.sigmoid_backward


def _per_head(x: torch.Tensor, H: int) -> torch.Tensor:
    """[H*B, T, d] (head-major) -> [H, B*T, d], so a matmul with per-head weights reads each weight once."""
    return x.reshape(H, -1, x.shape[-1])


class _ScratchPool:
    """Large scratch buffers of the fused write, kept for the next call of the same shapes (CPU only).

    On CPU every call otherwise allocates tens of MB of fresh buffers, and touching fresh pages costs the kernel a page
    fault each (measured: about 15% of the write's time). A buffer comes back here only when nothing can read it any
    more: forward buffers when the autograd graph holding them is freed, backward buffers at the end of backward.
    At most ``max_bytes`` are kept; ``empty()`` drops them. (CUDA has its own caching allocator: not pooled.)
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._free: Dict[tuple, List[torch.Tensor]] = {}
        self._bytes = 0
        self._lock = threading.RLock()   # reentrant: a finalizer that runs inside take() gives back

    def take(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        if like.device.type == 'cpu' and not torch.is_inference_mode_enabled():
            with self._lock:
                free = self._free.get((shape, like.dtype))
                if free:
                    t = free.pop()
                    self._bytes -= t.numel() * t.element_size()
                    return t
        return like.new_empty(shape)

    def give(self, tensors: List[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                size = t.numel() * t.element_size()
                # inference tensors cannot be written outside inference mode: never pooled
                if t.device.type == 'cpu' and not t.is_inference() and self._bytes + size <= self.max_bytes:
                    self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)
                    self._bytes += size
            tensors.clear()

    def empty(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


_SCRATCH = _ScratchPool()


def empty_scratch_pool() -> None:
    """Free the CPU scratch buffers the fused write keeps for its next call (at most 1 GiB, see ``_ScratchPool``),
    e.g. after training, or before measuring a step's peak memory (pooled buffers are real memory it needs)."""
    _SCRATCH.empty()


class _Scratch:
    """The buffers one call took from ``_SCRATCH``; they go back when this object is freed, or earlier with
    ``recycle`` once the caller is done with them (then the next take of the same call reuses them, so the
    temporaries of one chunk do not pile up over the chunks)."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.tensors: List[torch.Tensor] = []
        weakref.finalize(self, _SCRATCH.give, self.tensors)

    def __call__(self, *shape: int) -> torch.Tensor:
        t = _SCRATCH.take(self.like, *shape)
        self.tensors.append(t)
        return t

    def recycle(self, *tensors: torch.Tensor) -> None:
        """Give these buffers (taken from this object, read by nothing any more) back to the pool now. Only for
        buffers of the running forward or backward: a backward may run again on a retained graph."""
        done = {id(t) for t in tensors}
        self.tensors[:] = [t for t in self.tensors if id(t) not in done]
        _SCRATCH.give(list(tensors))


class _DualWrite(torch.autograd.Function):
    """The whole chunked write from per-head initial weights, in the dual form of ``memory_functional.chunked_write``,
    as one autograd node with a hand-written backward.

    Inputs: keys k and values v ``[H*B, N, d]`` (head-major), the token weights ``gamma`` [H*B, C+1, N] and decays
    ``r0`` [H*B, C+1] of ``write_coefficients``, the chunk length b and the per-head initial weights
    ``w0[l]`` [H, d_in, d_out]. Returns the per-token surprise [H*B, N] and the final weights [H*B, d_in, d_out].
    (The read stays outside, in autograd ops: autograd frees its saved tensors as soon as their backward ran,
    while this node's buffers live until the whole graph is freed; inside, it measured no faster and +10 MB.)

    Everything is carried by the *scaled* layer-output gradients G_l (each token's closed-form gradient times its
    step scale): ``G_last = scale * (pred - v)`` and ``G_{l-1} = silu'(H_{l-1}) * (rc G_l W0_l^T - ((G_l G_l[<]^T)
    * gamma) X_l[<])`` (X_l the layer inputs, ``[<]`` the tokens of earlier chunks, rc the chunk's decay of W0), so
    per-token factors are applied to narrow tensors and each hidden-sized step is one fused op. Products with the
    initial weights run per head with the batch folded into the rows (each weight is read once, not once per image).
    The tokens' inputs, gradients and token-by-token scores go into buffers allocated once per call: no per-chunk
    concatenation (autograd's cat copies, slice backwards and gradient sums made the loop memory-bound). The
    backward walks the chunks in reverse and *pulls* what a chunk's tokens receive from all later chunks with one
    matmul per term over the later rows of those buffers. ``tests/test_memory.py`` checks it with gradcheck.
    """

    @staticmethod
    def forward(ctx, k, v, gamma, r0, b: int, *w0):
        HB, N, _ = k.shape
        H, L, C = w0[0].shape[0], len(w0), gamma.shape[1] - 1
        grad = any(ctx.needs_input_grad)
        new = _Scratch(k)
        chunk_of = torch.arange(N, device=k.device) // b
        pairs = C > 1                                                 # token-pair terms between chunks
        g_rows = sc0 = None
        if pairs:
            g_rows = torch.index_select(gamma, 1, chunk_of, out=new(HB, N, N))  # gamma of each row's chunk
            sc0 = torch.bmm(k, k.transpose(1, 2), out=new(HB, N, N)).mul_(g_rows)  # layer-0 scores (k_r . k_j) * gamma
        X = [k] + [new(HB, N, w.shape[1]) for w in w0[1:]]           # layer inputs
        G = [new(HB, N, w.shape[2]) for w in w0]                      # scaled layer-output gradients
        # per chunk (matmul results are written to fresh contiguous tensors: a strided out= makes bmm fall back
        # to one small matmul per batch entry)
        Hs = [[] for _ in w0[:-1]]                                    # hidden pre-activations
        Bp = [None] + [[] for _ in w0[1:]]                            # backprop at the hidden outputs (pre silu')
        keep_pairs = grad and pairs
        raw = [None] + [new(HB, N, N) if keep_pairs else None for _ in w0[1:]]   # x_r . x_j (layers >= 1)
        es = [None] + [new(HB, N, N) if keep_pairs else None for _ in w0[1:]]    # (G_r . G_j) * gamma
        err = new(HB, N, w0[-1].shape[2])
        scale = new(HB, N)
        kk = k.pow(2).sum(-1)
        # layer 0 of every token at its chunk-start decay, one matmul per head
        h0 = new(HB, N, w0[0].shape[2])
        torch.bmm(_per_head(k * r0[:, chunk_of, None], H), w0[0], out=h0.view(H, -1, h0.shape[-1]))
        for c in range(C):
            s, t = c * b, min(c * b + b, N)
            n, R = t - s, slice(s, t)
            rc = r0[:, c, None, None]
            norm = kk[:, R]
            x = k[:, R]                                                # the layer input (layer 0: via h0)
            for l in range(L):
                last = l == L - 1
                if l:
                    h = new(HB, n, w0[l].shape[2])
                    torch.bmm(_per_head(x, H), w0[l], out=h.view(H, -1, h.shape[-1]))
                    h.mul_(rc)
                else:
                    h = h0[:, R]
                if s:
                    if l:
                        r = torch.bmm(x, X[l][:, :s].transpose(1, 2))
                        if grad:
                            raw[l][:, R, :s] = r
                        sc = r.mul_(g_rows[:, R, :s])
                        h.baddbmm_(sc, G[l][:, :s], alpha=-1)
                    else:
                        h = torch.baddbmm(h0[:, R], sc0[:, R, :s], G[l][:, :s], alpha=-1)
                if not last:
                    Hs[l].append(h)
                    x = torch.ops.aten.silu.out(h, out=X[l + 1][:, R])
                    norm = norm + torch.linalg.vector_norm(x, dim=-1).square()
            e = torch.sub(h, v[:, R], out=err[:, R])
            if L > 1:
                new.recycle(h)                                         # the chunk's prediction: read by nothing else
            sc_r = torch.reciprocal(norm.clamp_min(NORMALISER_MIN), out=scale[:, R]).mul_(2).unsqueeze(-1)
            g = torch.mul(e, sc_r, out=G[L - 1][:, R])
            for l in range(L - 1, 0, -1):
                bp = new(HB, n, w0[l].shape[1])
                torch.bmm(_per_head(g * rc, H), w0[l].transpose(1, 2), out=bp.view(H, -1, bp.shape[-1]))
                if s:
                    er = torch.bmm(g, G[l][:, :s].transpose(1, 2))
                    ee = torch.mul(er, g_rows[:, R, :s], **({'out': es[l][:, R, :s]} if grad else {}))
                    bp.baddbmm_(ee, X[l][:, :s], alpha=-1)
                Bp[l].append(bp)
                g = _silu_backward.grad_input(bp, Hs[l - 1][c], grad_input=G[l - 1][:, R])
        rC = r0[:, C].view(H, -1, 1, 1)
        gC = gamma[:, C].unsqueeze(-1)
        wf = []
        for w, x, g in zip(w0, X, G):
            if x.shape[-1] <= g.shape[-1]:                            # scale the narrower side by gamma_C
                x = x * gC
            else:
                g = g * gC
            wf.append(torch.baddbmm((w.unsqueeze(1) * rC).flatten(0, 1), x.transpose(1, 2), g, alpha=-1))
        surprise = err.pow(2).sum(-1)
        if grad:
            ctx.save_for_backward(k, gamma, r0, *w0)
            ctx.b = b
            ctx.bufs = (g_rows, sc0, raw, es, X, G, Hs, Bp, err, scale)
            ctx.scratch = new       # the buffers go back to the pool when the graph is freed
        return (surprise, *wf)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_surprise, *d_wf):
        k, gamma, r0, *w0 = ctx.saved_tensors
        g_rows, sc0, raw, es, X, G, Hs, Bp, err, scale = ctx.bufs
        b = ctx.b
        HB, N, _ = k.shape
        H, L, C = w0[0].shape[0], len(w0), gamma.shape[1] - 1
        new = k.new_empty
        chunk_of = torch.arange(N, device=k.device) // b
        d_gamma = torch.zeros_like(gamma)
        d_r0 = torch.zeros_like(r0)
        d_w0 = [torch.zeros_like(w) for w in w0]
        dk, dv = new(k.shape), new(k.shape)
        new = _Scratch(k)
        # final weights wf = r0_C w0 - x^T (gamma_C * G): what they send to every token
        gC = gamma[:, C].unsqueeze(-1)
        dG_fin, dX_fin = [None] * L, [None] * L
        for l, dw in enumerate(d_wf):
            if dw is None:
                continue
            flat = dw.reshape(H, -1, dw.shape[1] * dw.shape[2])                        # [H, B, d_in * d_out]
            d_w0[l] += torch.bmm(r0[:, C].view(H, 1, -1), flat).view_as(w0[l])
            d_r0[:, C] += torch.bmm(flat, w0[l].reshape(H, -1, 1)).flatten()
            dgg = torch.bmm(X[l], dw, out=new(HB, N, dw.shape[2]))                   # -d (gamma_C * G)
            tmp = torch.mul(dgg, G[l], out=new(*dgg.shape))
            d_gamma[:, C] -= tmp.sum(-1)
            dG_fin[l] = dgg.mul_(gC).neg_()
            dX_fin[l] = torch.bmm(torch.mul(G[l], gC, out=tmp), dw.transpose(1, 2), out=new(HB, N, dw.shape[1])).neg_()
            new.recycle(tmp)
        dH = [new(HB, N, w.shape[2]) for w in w0]                        # d pre-activations of every token
        dBp = [None] + [new(HB, N, w.shape[1]) for w in w0[1:]]
        pairs = C > 1
        draw = [new(HB, N, N) if pairs else None for _ in w0]            # d ((x_r . x_j) * gamma)
        des = [None] + [new(HB, N, N) if pairs else None for _ in w0[1:]]  # d ((G_r . G_j) * gamma), w.r.t. G_r . G_j
        for c in range(C - 1, -1, -1):
            s, t = c * b, min(c * b + b, N)
            n, R = t - s, slice(s, t)
            rc = r0[:, c, None, None]
            # pull what the later chunks and the final weights send to this chunk's tokens
            dG, dX = [None] * L, [None] * L
            for l in range(L):
                dg = dG_fin[l][:, R] if dG_fin[l] is not None else torch.zeros_like(G[l][:, R])
                dx = dX_fin[l][:, R] if dX_fin[l] is not None else torch.zeros_like(X[l][:, R])
                if t < N:
                    sc = sc0[:, t:, R] if l == 0 else raw[l][:, t:, R] * g_rows[:, t:, R]
                    dg = torch.baddbmm(dg, sc.transpose(1, 2), dH[l][:, t:], alpha=-1)
                    dx = torch.baddbmm(dx, draw[l][:, t:, R].transpose(1, 2), X[l][:, t:])
                    if l:
                        dg.baddbmm_(des[l][:, t:, R].transpose(1, 2), G[l][:, t:])
                        dx.baddbmm_(es[l][:, t:, R].transpose(1, 2), dBp[l][:, t:], alpha=-1)
                dG[l], dX[l] = dg, dx
            # this chunk's backprop chain, in reverse: G_{l-1} = silu'(H_{l-1}) * bp_l
            dg = dG[0]
            extra = [None] * L
            for l in range(1, L):
                hp, gl = Hs[l - 1][c], G[l][:, R]
                dbp = _silu_backward.grad_input(dg, hp, grad_input=dBp[l][:, R])
                # d silu'(h) / dh = s (1 - s) (2 + h (1 - 2 s))
                sg = torch.sigmoid(hp, out=new(*hp.shape))
                ex = torch.mul(dg, Bp[l][c], out=new(*hp.shape))
                ex = _sigmoid_backward.grad_input(ex, sg, grad_input=ex)
                extra[l - 1] = ex.addcmul_(ex, sg.mul_(-1).add_(0.5).mul_(hp)).mul_(2)
                new.recycle(sg)
                # bp = (rc G_l) W0^T - ((G_l G_l[<]^T) * gamma) X_l[<]
                u = torch.bmm(_per_head(dbp, H), w0[l]).view(HB, n, -1)       # d (rc G_l)
                d_r0[:, c] += (u * gl).sum((1, 2))
                dg = torch.addcmul(dG[l], u, rc)
                if s:
                    de = torch.bmm(dbp, X[l][:, :s].transpose(1, 2))                 # -d es
                    d_gamma[:, c, :s] -= (de * torch.bmm(gl, G[l][:, :s].transpose(1, 2))).sum(1)
                    der = torch.mul(de, g_rows[:, R, :s], out=des[l][:, R, :s]).neg_()
                    dg.baddbmm_(der, G[l][:, :s])
            # G_last = scale * err, scale = 2 / (||k||^2 + sum ||x_l||^2), err = h_last - v
            e, sc_r = err[:, R], scale[:, R].unsqueeze(-1)
            d_err = dg * sc_r
            if d_surprise is not None:
                d_err.addcmul_(e, d_surprise[:, R].unsqueeze(-1), value=2)
            d_norm2 = (dg * e).sum(-1, keepdim=True).mul_(sc_r * sc_r).neg_()     # 2 d norm
            d_norm2.masked_fill_(sc_r > 1.9999 / NORMALISER_MIN, 0.0)   # clamped (scale 2 / min, float32): no gradient
            torch.neg(d_err, out=dv[:, R])
            dh = dH[L - 1][:, R].copy_(d_err)
            for l in range(L - 1, -1, -1):
                # h_l = rc x_l W0 - ((x_l x_l[<]^T) * gamma) G_l[<]   (layer 0's x W0 term and every layer's
                # W0 gradient: after the loop, for all tokens at once)
                x = X[l][:, R]
                dx = dX[l].addcmul_(x, d_norm2)
                if l:
                    u = new(HB, n, w0[l].shape[1])                                      # d (rc x_l) / rc
                    torch.bmm(_per_head(dh, H), w0[l].transpose(1, 2), out=u.view(H, -1, u.shape[-1]))
                    tmp = torch.mul(u, x, out=new(*u.shape))
                    d_r0[:, c] += tmp.sum((1, 2))
                    dx.addcmul_(u, rc)
                    new.recycle(u, tmp)
                if s:
                    dsc = torch.bmm(dh, G[l][:, :s].transpose(1, 2))                  # -d sc
                    r = raw[l][:, R, :s] if l else torch.bmm(x, k[:, :s].transpose(1, 2))
                    d_gamma[:, c, :s] -= (dsc * r).sum(1)
                    dr = torch.mul(dsc, g_rows[:, R, :s], out=draw[l][:, R, :s]).neg_()
                    dx.baddbmm_(dr, X[l][:, :s])
                if l:
                    dh = _silu_backward.grad_input(dx, Hs[l - 1][c], grad_input=dH[l - 1][:, R]).add_(extra[l - 1])
                    new.recycle(extra[l - 1])
                else:
                    dk[:, R] = dx
        # layer 0's base term for all tokens: h0 = (r0_row k) W0
        r0k = r0[:, chunk_of, None]
        u = torch.bmm(_per_head(dH[0], H), w0[0].transpose(1, 2)).view(HB, N, -1)   # d (r0_row k)
        dk.addcmul_(u, r0k)
        d_r0.index_add_(1, chunk_of, (u * k).sum(-1))
        d_w0[0] += torch.bmm(_per_head(k * r0k, H).transpose(1, 2), _per_head(dH[0], H))
        for l in range(1, L):
            # h_l = rc x_l W0 + ... and bp_l = (rc G_l) W0^T + ...: scale the narrower side by each token's rc
            dh_r = dH[l] * r0k if dH[l].shape[-1] <= X[l].shape[-1] else None
            x_r = X[l] if dh_r is not None else X[l] * r0k
            d_w0[l] += torch.bmm(_per_head(x_r, H).transpose(1, 2), _per_head(dh_r if dh_r is not None else dH[l], H))
            g_r = G[l] * r0k if G[l].shape[-1] <= dBp[l].shape[-1] else None
            d_w0[l] += torch.bmm(_per_head(dBp[l] if g_r is not None else dBp[l] * r0k, H).transpose(1, 2),
                                 _per_head(g_r if g_r is not None else G[l], H))
        _SCRATCH.give(new.tensors)
        return (dk, dv, d_gamma, d_r0, None, *d_w0)


def dual_form_write(k, v, theta, eta, keep, initial_weights: List[torch.Tensor],
                    chunk_size: Optional[int]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Write from M0 in the dual form (``_DualWrite``); returns the final weights and the surprise [B, N].

    k, v: [B, H, N, dh]; gates [B, H, N] (eta None: no momentum); ``initial_weights``: M0 per layer [H, d_in, d_out];
    ``chunk_size`` None: the whole image in one chunk. The chunk's forward ``x W`` and closed-form backward ``g W^T``
    are ``r0 x W0 - ((x X^T) * gamma) G`` and ``r0 g W0^T - ((g G^T) * gamma) X`` over the earlier tokens (x their
    layer inputs, G their scaled gradients, see ``write_coefficients``). Per head with the batch folded into the
    rows. The weights come back head-major, viewed as [B, H, d_in, d_out] (``memory_mlp_read`` reads them in place).
    """
    B, H, N, _ = k.shape
    b = chunk_size or N
    hm = lambda t: None if t is None else t.transpose(0, 1).flatten(0, 1)   # [B, H, ...] -> [H*B, ...]
    co = write_coefficients(hm(theta), hm(eta), hm(keep), b)
    surprise, *weights = _DualWrite.apply(hm(k), hm(v), co['gamma'], co['r0'], b, *[upcast(w) for w in initial_weights])
    weights = [w.view(H, B, *w.shape[1:]).transpose(0, 1) for w in weights]        # head-major, as [B, H, ...]
    return weights, surprise.view(H, B, N).mean(0)
