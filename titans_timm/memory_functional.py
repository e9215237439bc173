""" The Titans memory update as pure functions, and its float64 token-by-token reference.

Paper: `Titans: Learning to Memorize at Test Time` - Behrouz, Zhong, Mirrokni, 2025 (arXiv 2501.00663).
Equation numbers in comments are that paper's.

Everything here is a plain tensor function, no module state, so the rule can be read (and changed) in one place:

* the memory MLP: its forward (``memory_mlp_forward``), its read (``memory_mlp_read``, 15) and its closed-form
  backward (``memory_mlp_backprop`` / ``memory_mlp_grads``) with the per-token step normaliser;
* the chunk-parallel form (16-18): momentum (10) and forgetting (13) of a chunk folded into per-token
  coefficients (``chunk_coefficients``), and those of every chunk start for the dual form (``write_coefficients``,
  used by the fused write in ``memory_fused.py``);
* ``chunked_write``: the chunked write as a loop of autograd ops (readable; what ``write()``, causal reads,
  ``torch.compile`` and gradient checkpointing run);
* ``token_by_token_write``: the rule exactly as the paper states it, one token at a time with autograd gradients.
  It is the reference the tests hold the chunked and fused writes to in float64; far too slow to serve.
"""
import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'MemoryState', 'NORMALISER_MIN', 'upcast', 'memory_mlp_forward', 'memory_mlp_read', 'memory_mlp_backprop',
    'memory_mlp_grads', 'step_normaliser', 'chunk_coefficients', 'write_coefficients', 'coefficients_per_chunk',
    'chunked_write', 'token_by_token_write',
]

# state of one batch of memories: per-layer weights [B, H, d_in, d_out] and momentum (None when off or not yet set)
MemoryState = Dict[str, Optional[List[torch.Tensor]]]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32: the inner loop never runs in half precision (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def memory_mlp_forward(weights: List[torch.Tensor], x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Run the memory MLP ``x -> silu(x W1) W2 ...`` and keep what the closed-form backward needs.

    weights: per layer ``[..., d_in, d_out]`` (broadcast over leading dims); x: ``[..., T, d_in]``.
    Returns (output, layer inputs, silu derivative at each hidden layer).
    """
    inputs, act_grads = [], []
    h = x
    for i, w in enumerate(weights):
        inputs.append(h)
        h = h @ w
        if i < len(weights) - 1:
            s = torch.sigmoid(h)
            a = h * s                                   # silu
            act_grads.append(s + a - a * s)             # silu'(h) = s (1 + h (1 - s))
            h = a
    return h, inputs, act_grads


def memory_mlp_read(weights: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``M(x)`` (15), the memory read: x ``[B, H, T, d_in]``; weights per layer ``[B, H, d_in, d_out]`` or per head
    ``[H, d_in, d_out]``. Unlike ``memory_mlp_forward`` it keeps nothing for a closed-form backward.

    It computes in the layout the weights are stored in: per head with the batch folded into the rows for ``[H, ...]``
    weights (each weight read once), head-major when the weights are ``[H, B, ...]`` transposed to ``[B, H, ...]``
    (as the fused write returns them), so no weight is copied."""
    B, H, T, _ = x.shape
    if weights[0].dim() == 4 and weights[0].stride(0) == 0:   # M0 expanded over the batch
        weights = [w[0] for w in weights]
    if weights[0].dim() == 3:
        h = x.transpose(0, 1).reshape(H, B * T, -1)
        for i, w in enumerate(weights):
            h = torch.bmm(h, w)
            if i < len(weights) - 1:
                h = F.silu(h)
        return h.view(H, B, T, -1).transpose(0, 1)
    head_major = not weights[0].is_contiguous() and weights[0].transpose(0, 1).is_contiguous()
    h = x.transpose(0, 1) if head_major else x
    for i, w in enumerate(weights):
        h = torch.matmul(h, w.transpose(0, 1) if head_major else w)
        if i < len(weights) - 1:
            h = F.silu(h)
    return h.transpose(0, 1) if head_major else h


def memory_mlp_backprop(weights: List[torch.Tensor], act_grads: List[torch.Tensor], grad_out: torch.Tensor):
    """Closed-form backward of the memory MLP: yields ``(layer, grad of that layer's output)`` per token, last
    layer first. The weight gradient of layer i is ``inputs[i]^T @ grad`` (summed over tokens)."""
    g = grad_out
    for i in range(len(weights) - 1, -1, -1):
        yield i, g
        if i > 0:
            g = (g @ weights[i].transpose(-1, -2)) * act_grads[i - 1]


def memory_mlp_grads(weights, inputs, act_grads, grad_out, token_coef):
    """Token-weighted weight gradients ``sum_t coef[t] grad_W loss_t`` per layer (token_coef: ``[..., T]``)."""
    grads = [None] * len(weights)
    for i, g in memory_mlp_backprop(weights, act_grads, grad_out):
        grads[i] = inputs[i].transpose(-1, -2) @ (g * token_coef.unsqueeze(-1))
    return grads


def step_normaliser(inputs: List[torch.Tensor], first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token sum of squared layer inputs ``||k||^2 + ||a_1||^2 + ...`` ([..., T]).

    Each token's step is divided by it (normalised LMS): the change a step of size theta makes to that token's
    own prediction is then about ``2 theta`` times its error whatever the scale of the memory's activations, so
    theta < 1 descends and the write cannot blow up as the memory weights grow. ``first``: ``||k||^2`` if known.
    At least ``NORMALISER_MIN``: a zero key (a constant or zero-padded token, layer-normed to zero) has a zero
    gradient, and 0 / 0 would turn the whole image's memory into NaN.
    """
    total = inputs[0].pow(2).sum(-1) if first is None else first
    for t in inputs[1:]:
        total = total + t.pow(2).sum(-1)
    return total.clamp_min(NORMALISER_MIN)


NORMALISER_MIN = 1e-6   # keys are unit vectors, so only a (near-)zero key reaches it


def _exp(log_value: torch.Tensor) -> torch.Tensor:
    """exp, with products below 1e-20 set to exactly 0: they are negligible, and as float32 denormals they would
    make every later matmul that touches them many times slower on CPU."""
    return torch.exp(log_value).masked_fill(log_value < -46.0, 0.0)


def _in_float64(fn):
    """Compute gate coefficients in float64 and return them in the gates' dtype: their log-space cumulative sums
    reach thousands over an image (log eta summed over 197 tokens), where float32 keeps only ~4 digits of the
    differences that get exponentiated. The tensors are gate-sized ([B*H, N]), so this costs nothing measurable.
    (MPS has no float64: there it stays in the input dtype.)"""
    @functools.wraps(fn)
    def wrapper(theta, eta, keep, *args):
        dtype = theta.dtype
        if dtype == torch.float64 or theta.device.type == 'mps':
            return fn(theta, eta, keep, *args)
        up = lambda t: None if t is None else t.double()
        out = fn(up(theta), up(eta), up(keep), *args)
        return {name: None if t is None else t.to(dtype) for name, t in out.items()}
    return wrapper


@_in_float64
def chunk_coefficients(theta: torch.Tensor, eta: Optional[torch.Tensor], keep: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fold momentum (a scan) and forgetting (a cumulative product) of one chunk into per-token coefficients.

    theta, eta, keep (= 1 - alpha): ``[..., b]`` per token of the chunk. With u_i the gradient of token i at the
    chunk-start weights W0 and S0 the incoming momentum, the token recurrence (10, 13)
    ``S_j = eta_j S_{j-1} - theta_j u_j;  W_j = keep_j W_{j-1} + S_j`` ends at
    ``W_b = w_decay W0 + w_from_s S0 - sum_i w_tok_i u_i`` and ``S_b = s_decay S0 - sum_i s_tok_i u_i``.
    Without momentum (eta None): ``W_b = w_decay W0 - sum_i w_tok_i u_i``.
    """
    log_keep = torch.log(keep.clamp_min(1e-12))
    lk = torch.cumsum(log_keep, dim=-1)                    # [..., b] log prod_{m<=j} keep_m
    lk_total = lk[..., -1:]
    keep_after = _exp(lk_total - lk)                  # F(j, b) = prod_{m>j} keep_m
    out = {'w_decay': _exp(lk_total[..., 0])}
    if eta is None:
        out['w_tok'] = theta * keep_after
        return out
    le = torch.cumsum(torch.log(eta.clamp_min(1e-12)), dim=-1)  # log prod_{m<=j} eta_m
    # w_tok_i = theta_i sum_{j>=i} E(i, j) F(j, b) with E(i, j) = prod_{i<m<=j} eta_m: a reverse log-sum-exp scan,
    # exp(lk_b - le_i + logsumexp_{j>=i}(le_j - lk_j)); every term of the sum is <= 1, so the result is <= b
    tail = torch.logcumsumexp((le - lk).flip(-1), dim=-1).flip(-1)
    out['w_tok'] = theta * _exp(lk_total - le + tail)
    out['s_tok'] = theta * _exp(le[..., -1:] - le)
    out['s_decay'] = _exp(le[..., -1])
    out['w_from_s'] = (keep_after * _exp(le)).sum(-1)
    return out


@_in_float64
def write_coefficients(theta: torch.Tensor, eta: Optional[torch.Tensor], keep: torch.Tensor, b: int) -> Dict[str, torch.Tensor]:
    """How much each written token still weighs in the weights at the start of every chunk (the dual form).

    theta, eta, keep: ``[BH, N]`` per token; chunks of b tokens (the last may be shorter), C of them. Chunk m maps
    the state (W, S) at its start to ``(wd_m W + wfs_m S - sum wt_i u_i, sd_m S - sum st_i u_i)``
    (``chunk_coefficients``), a 2x2 upper-triangular linear map plus the chunk's token terms. Composing them,
    the weights at the start of chunk c (c = C: after the last chunk) are

        W^(c) = r0_c W0 + r1_c S0 - sum_{tokens i before chunk c} gamma[c, i] u_i

    Returns ``gamma`` [BH, C+1, N] (0 for tokens of chunk c and later), ``r0``, ``r1`` [BH, C+1], and for the
    final momentum ``S = s0_final S0 - sum_i sigma_i u_i``: ``sigma`` [BH, N], ``s0_final`` [BH].
    Everything is built from log-space cumulative sums, like ``chunk_coefficients``, so nothing overflows.
    """
    N = theta.shape[-1]
    n_full = N // b
    parts = []
    if n_full:
        parts.append(chunk_coefficients(*(t[..., :n_full * b].unflatten(-1, (n_full, b)) if t is not None else None
                                          for t in (theta, eta, keep))))
    if n_full * b < N:
        parts.append(chunk_coefficients(*(t[..., n_full * b:].unsqueeze(-2) if t is not None else None
                                          for t in (theta, eta, keep))))
    cat = lambda name, flat: torch.cat([p[name].flatten(-2) if flat else p[name] for p in parts], dim=-1)
    wt = cat('w_tok', True)                                                   # [BH, N]
    ends = torch.arange(b - 1, N + b - 1, b, device=theta.device).clamp_max(N - 1)  # last token of every chunk
    chunk_of = torch.arange(N, device=theta.device) // b                     # chunk index of every token

    def between(log_gate):
        # prod of the gate over the chunks jb .. c-1, as [BH, c in 0..C, jb in 0..C] (0 where jb > c)
        cum = torch.cumsum(torch.log(log_gate.clamp_min(1e-12)), dim=-1)[..., ends]
        bound = F.pad(cum, (1, 0))                                            # [BH, C+1]: 0 at the image start
        C1 = bound.shape[-1]
        upper = torch.ones(C1, C1, dtype=torch.bool, device=theta.device).tril()
        return _exp((bound.unsqueeze(-1) - bound.unsqueeze(-2)).masked_fill(~upper, -float('inf')))

    r_w = between(keep)                                                       # prod of wd_m over chunks jb..c-1
    gamma = r_w[..., 1:][..., chunk_of] * wt.unsqueeze(-2)                    # [BH, C+1, N]
    out = {'r0': r_w[..., 0], 'r1': None}
    if eta is not None:
        st = cat('s_tok', True)
        wfs = cat('w_from_s', False)                                          # [BH, C]
        r_s = between(eta)                                                    # prod of sd_m over chunks jb..c-1
        # W-row coefficient of S after chunks jb..c-1: sum_m (prod_{m<l<c} wd_l) wfs_m (prod_{jb<=l<m} sd_l)
        r_ws = (r_w[..., 1:] * wfs.unsqueeze(-2)) @ r_s[..., :-1, :]           # [BH, C+1, C+1]
        gamma = gamma + r_ws[..., 1:][..., chunk_of] * st.unsqueeze(-2)
        out.update(r1=r_ws[..., 0], sigma=r_s[..., -1, 1:][..., chunk_of] * st, s0_final=r_s[..., -1, 0])
    out['gamma'] = gamma
    return out


def coefficients_per_chunk(theta, eta, keep, b: int) -> List[Dict[str, torch.Tensor]]:
    """``chunk_coefficients`` of every chunk of length b (the last may be shorter), computed in one go."""
    N = theta.shape[-1]
    n_full = N // b
    out = []
    if n_full:
        gates = [t[..., :n_full * b].unflatten(-1, (n_full, b)) if t is not None else None for t in (theta, eta, keep)]
        c = chunk_coefficients(*gates)                                          # values [..., C, (b)]
        per_chunk = {name: val.unbind(theta.dim() - 1) for name, val in c.items()}
        out = [{name: val[j] for name, val in per_chunk.items()} for j in range(n_full)]
    if n_full * b < N:
        out.append(chunk_coefficients(*(t[..., n_full * b:] if t is not None else None for t in (theta, eta, keep))))
    return out



def chunked_write(k, v, theta, eta, keep, state: MemoryState, chunk_size: Optional[int], q=None):
    """Write keys/values chunk by chunk (10, 13, 16-18). k, v: [B, H, N, dh]; gates theta, eta (None: no momentum),
    keep (= 1 - alpha) [B, H, N]; ``state`` the weights (and momentum) to start from; ``chunk_size`` None: the whole
    image in one chunk. Returns (state, stats, reads); ``stats['surprise']`` [B, N] is each token's loss (12) at the
    weights it was written with, mean over heads.

    When q is given (causal read) each chunk's queries read the memory *before* that chunk is written (``reads``).

    Built from autograd ops: with momentum, each layer's weights W and momentum S are kept stacked as one
    ``[B*H, 2, d_in, d_out]`` tensor, so a chunk's forgetting/momentum mixing is one small bmm and its gradient
    step one baddbmm. (The memory's forward takes the same update in the dual form, ``memory_fused.dual_form_write``.)
    """
    B, H, N, _ = k.shape
    BH = B * H
    b = chunk_size or N
    coefs = coefficients_per_chunk(theta.flatten(0, 1), None if eta is None else eta.flatten(0, 1), keep.flatten(0, 1), b)
    k, v = k.flatten(0, 1), v.flatten(0, 1)                               # [B*H, N, dh]
    ks, vs, kks = k.split(b, dim=1), v.split(b, dim=1), k.pow(2).sum(-1).split(b, dim=-1)
    qs = q.flatten(0, 1).split(b, dim=1) if q is not None else None
    use_mom = eta is not None
    weights = [upcast(w).expand(B, H, *w.shape[-2:]).flatten(0, 1) for w in state['weights']]
    if use_mom:
        moms = state['momentum'] or [torch.zeros_like(w) for w in weights]
        packed = [torch.stack([w, upcast(m).reshape(w.shape)], dim=1) for w, m in zip(weights, moms)]  # [BH, 2, din, dout]
        weights = [p[:, 0] for p in packed]
    surprise, reads = [], []
    for ci, (kc, vc, c) in enumerate(zip(ks, vs, coefs)):
        nk = kc.shape[1]
        inp = kc if q is None else torch.cat([kc, qs[ci]], dim=1)  # one forward serves write and read
        pred, inputs, act_grads = memory_mlp_forward(weights, inp)
        if q is not None:
            reads.append(pred[:, nk:])
            pred, inputs, act_grads = pred[:, :nk], [t[:, :nk] for t in inputs], [t[:, :nk] for t in act_grads]
        err = pred - vc                                                   # [B*H, b, dh]
        surprise.append(err.pow(2).sum(-1))                               # (12) loss_t at the chunk-start weights
        # d||M(k)-v||^2/dM = 2 err; each token's step normalised (see step_normaliser)
        scale = 2 / step_normaliser(inputs, kks[ci])                      # [B*H, b]
        if use_mom:
            zero = torch.zeros_like(c['w_decay'])
            mix = torch.stack([c['w_decay'], c['w_from_s'], zero, c['s_decay']], dim=-1).view(BH, 2, 2)
            tok = torch.stack([c['w_tok'], c['s_tok']], dim=1) * scale.unsqueeze(1)  # [B*H, 2, b]
        else:
            tok = c['w_tok'] * scale
        new_packed = [None] * len(weights)
        for i, g in memory_mlp_backprop(weights, act_grads, err):
            xt = inputs[i].transpose(-1, -2)                               # [B*H, d_in, b]
            d_in, d_out = xt.shape[1], g.shape[-1]
            if use_mom:
                # (13) forget W and add momentum, (10) decay S: [W; S] <- mix @ [W; S]
                mixed = torch.bmm(mix, packed[i].view(BH, 2, d_in * d_out)).view(BH * 2, d_in, d_out)
                xt2 = xt.unsqueeze(1).expand(BH, 2, d_in, nk).reshape(BH * 2, d_in, nk)
                gg = (g.unsqueeze(1) * tok.unsqueeze(-1)).view(BH * 2, nk, d_out)
                # minus the chunk's token-weighted surprise, for W and S at once
                new_packed[i] = torch.baddbmm(mixed, xt2, gg, alpha=-1).view(BH, 2, d_in, d_out)
            else:
                new_packed[i] = torch.baddbmm(weights[i] * c['w_decay'][:, None, None], xt, g * tok.unsqueeze(-1), alpha=-1)
        if use_mom:
            packed = new_packed
            weights = [p[:, 0] for p in packed]
        else:
            weights = new_packed
    stats = {'surprise': torch.cat(surprise, dim=-1).view(B, H, N).mean(1)}  # [B, N], mean over heads
    unflat = lambda t: t.reshape(B, H, *t.shape[-2:])
    state = {'weights': [unflat(w) for w in weights],
             'momentum': [unflat(p[:, 1]) for p in packed] if use_mom else None}
    return state, stats, [unflat(r) for r in reads]


def token_by_token_write(initial_weights: List[torch.Tensor], q, k, v, theta, eta, keep, chunk_size: int,
                         causal: bool = False) -> torch.Tensor:
    """The reference: the Titans update written token by token with autograd gradients, then the read.

    initial_weights: M0 per layer ``[H, d_in, d_out]``; q, k, v ``[B, H, N, dh]``; gates ``[B, H, N]`` (eta None:
    no momentum), as a memory's views give them. For every token t (10, 12, 13):
    ``S_t = eta_t S_{t-1} - theta_t / n_t grad ||M(k_t) - v_t||^2;  M_t = keep_t M_{t-1} + S_t`` with
    ``n_t = ||k_t||^2 + ||a_t||^2 + ...`` (the normalised step of ``step_normaliser``), every gradient inside a chunk
    of ``chunk_size`` tokens taken at the chunk-start weights (16-18). Returns the read ``[B, H, N, dh]``: every
    query against the final memory, or (``causal``) each chunk's queries against the memory before that chunk.

    One autograd call per token: for tests (float64), never for serving.
    """
    B, H, N, _ = k.shape
    weights = [w.unsqueeze(0).expand(B, *w.shape).clone() for w in initial_weights]
    mom = [torch.zeros_like(w) for w in weights]
    reads = []
    for start in range(0, N, chunk_size):
        w0 = [w.detach().requires_grad_(True) for w in weights]
        if causal:
            reads.append(memory_mlp_forward(w0, q[:, :, start:start + chunk_size])[0].detach())
        for t in range(start, min(start + chunk_size, N)):
            with torch.enable_grad():
                pred = memory_mlp_forward(w0, k[:, :, t:t + 1])[0]
                # (12), summed over B, H: each (B, H) gets its own gradient
                loss = (pred - v[:, :, t:t + 1]).pow(2).sum()
                grads = torch.autograd.grad(loss, w0)
            # normalised step: theta_t / (||k_t||^2 + ||a_t||^2), activations at the chunk-start weights
            norm = sum(h.pow(2).sum(-1) for h in memory_mlp_forward(w0, k[:, :, t:t + 1])[1]).detach()
            th = theta[:, :, t, None, None] / norm[..., None]
            et = eta[:, :, t, None, None] if eta is not None else 0.0
            kp = keep[:, :, t, None, None]
            mom = [et * s - th * g for s, g in zip(mom, grads)]        # (10)
            weights = [kp * w + s for w, s in zip(weights, mom)]      # (13)
    return torch.cat(reads, dim=2) if causal else memory_mlp_forward(weights, q)[0]
