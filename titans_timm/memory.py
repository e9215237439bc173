""" Titans neural long-term memory for Vision Transformers.

Paper: `Titans: Learning to Memorize at Test Time` - Behrouz, Zhong, Mirrokni, 2025 (arXiv 2501.00663).
Equation numbers in comments are that paper's.

The memory M is a small per-head MLP whose *weights are the state*. For each image the state starts from
learned initial weights M0 and is updated while the image is processed, by gradient descent on the
associative loss (12) ``loss_t(M) = ||M(k_t) - v_t||^2`` with momentum (the "surprise", 10) and forgetting (13):

    S_t = eta_t * S_{t-1} - theta_t * grad loss_t(M_{t-1})
    M_t = (1 - alpha_t) * M_{t-1} + S_t
    y   = M*(q)                                   (15) read without updating

Three memory types (``MEMORY_TYPES``):

* ``mlp``: the persistent memory MLP M0 read with queries, no test-time update (the cheapest ablation).
* ``simple``: the update rule with learned per-head *scalar* theta/eta/alpha; one fused projection gives
  queries, keys and values; a linear memory by default (``depth=1``: one d x d matrix per head).
* ``advanced``: separate W_Q / W_K / W_V views (keys/values may come from another depth of the backbone,
  ``qkv_diff_views``), data-dependent per-token theta and per-chunk eta/alpha from small linear heads, and a deep
  memory by default (``depth=2``: a two-layer MLP, hidden 4 x head dim).

The default depths follow the issue and DESIGN.md, which name the deep memory among ``advanced``'s features and
give ``simple`` (scalar gates) a lower cost budget: a depth-2 ``simple`` costs what ``advanced`` costs (the write
is the same), a linear one about a quarter of that. Either type takes any ``depth``.

Both ``simple`` and ``advanced`` use q/k L2 normalisation, multi-head memory (head dim 64) and the
chunk-parallel form (16-18): inside a chunk every token's gradient is taken at the weights of
the chunk start (mini-batch gradient descent), momentum is a linear recurrence over the chunk's tokens and
forgetting a cumulative product; both are folded into per-token coefficients, so a whole chunk costs one
forward and one closed-form backward of the memory MLP (batched matmuls, no autograd inside forward).
The weights at each chunk start are never built (the "dual form"): they are M0 plus a weighted sum of the earlier
tokens' rank-one updates, so reading them is a token-by-token matmul (``_DualWrite``); only the final
weights are built, once.
With ``chunk_size=1`` this is exactly the token-by-token rule above; ``chunk_size=None`` writes the whole image in
one step (the full-batch inner step that vision TTT work found best). A shorter last chunk is still written.

Choices where the paper is silent (written down here, as DESIGN.md asks):

* Per image: every image's memory starts from M0, so a batch never mixes images and calls never depend on
  earlier calls; forward changes no parameter or buffer.
* Read order: ``read_mode='after_write'`` (default) writes all tokens chunk by chunk, then every token reads the
  final memory (an image has no time axis); ``'causal'`` lets chunk j read the memory after chunks < j.
* Inner step size: ``theta_t = max_lr * sigmoid(.) / chunk_size``, i.e. bounded and normalised by the nominal chunk
  length, so one chunk's step is a bounded *mean* of its tokens' gradients whatever the chunk size.
* The inner loop always runs in float32 (also under bf16 autocast) for stability; the input is layer-normed
  inside the module and q/k are unit-normalised, so scaled inputs stay finite.
* The output projection is *not* zero-initialised here: the integrations in ``vit.py`` add the zero-initialised
  gate that makes every model equal its backbone at step 0.

Speed notes (``benchmarks/memory_speed.py``; D=192, 3 heads, N=197, batch 8, chunk 16, one CPU thread):

* ``simple`` at its default depth 1 costs about 1.06x a Block (the linear write has no hidden layer to carry);
  at depth 2 it writes exactly as ``advanced`` does.
* Where the time goes: ``advanced`` costs about 2.8x a timm Block; of that the write's backward is ~60%, its forward
  ~25%, projections + read the rest. The dual form does ~3.4 GMAC per forward+backward (the Block ~2.5 GMAC), a
  third of it in the token-pair terms between chunks, at roughly half the Block's matmul efficiency (16-row
  matmuls, hidden-sized elementwise passes that miss the L2 cache).
* Tried and measured: the explicit chunk loop (build W and S at every chunk start, ``_write``) costs 234 ms against
  the dual form's 137 ms (autograd backward; the W/S state traffic is 4 x 1.5 MB per chunk); materialising the state
  every few chunks to cut the pair terms saves no FLOPs at N=197 (the state build costs what the pairs saved);
  the explicit loop again as one node with a hand-written backward (half the dual form's FLOPs, the chunk states
  kept for the backward) measured 219 ms against 172 ms for this dual form in the same run: its 16-row matmuls
  read per-image weights, which stream from L3 at ~21 GMAC/s where the per-head ones run at ~60;
  bf16 matmuls (AMX) are 1.6-4x faster but break the float32 inner loop this module promises;
  ``torch.compile`` (inductor) of the explicit loop + read measured 2.4x a Block against this dual form's 3.1x
  in the same run, after 94 s of compiling (not something a model should do on its first call).
* Done: O(chunk) momentum coefficients (a log-sum-exp scan, not a chunk x chunk matrix: -20 ms at chunk None),
  contiguous matmul outputs (a strided ``out=`` made bmm fall back to per-image matmuls), one matmul for
  q/k/v/gates, hidden-sized temporaries from the scratch pool (fresh multi-MB tensors page-fault on CPU), recycled
  within a call so peak memory does not grow. The read stays outside the dual-form node (see ``_DualWrite``).
* Left: a fused kernel per chunk (one pass over the chunk's hidden-sized tensors) is what the 2x target needs.
"""
import contextlib
import functools
import math
import threading
import weakref
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, register_notrace_function, register_notrace_module, trunc_normal_

__all__ = ['MEMORY_TYPES', 'READ_MODES', 'create_memory', 'MemoryState', 'NotScriptableError',
           'PersistentMemory', 'SimpleNeuralMemory', 'AdvancedNeuralMemory']

MEMORY_TYPES = ('mlp', 'simple', 'advanced')
READ_MODES = ('after_write', 'causal')

# state of one batch of memories: per-layer weights [B, H, d_in, d_out] and momentum (None when off or not yet set)
MemoryState = Dict[str, Optional[List[torch.Tensor]]]

# Upper bounds of the size options (``_check_options``). Without them a typo (``depth=100000``, ``heads=100000``)
# builds for minutes and then cannot run. They sit far above anything useful: the defaults are depth 1-2, an
# inner width of dim (heads x 64) and a hidden width of 4 x 64, and the vision TTT work (DESIGN.md) found deeper
# inner models harder to optimise, not better.
MAX_DEPTH = 16            # memory MLP layers
MAX_WIDTH_FACTOR = 8      # heads * head_dim and the hidden width: at most 8 x max(dim, 64)
MAX_M0_FACTOR = 128       # parameters of M0 (all heads and layers): at most 128 x max(dim, 64)^2 (~10 timm Blocks)


class NotScriptableError(RuntimeError):
    """Raised by ``torch.jit.script`` on a Titans memory (or a model holding one): TorchScript cannot compile it.

    The write loops over a data-dependent number of chunks with a custom autograd node and Python-side buffers;
    ``torch.compile`` (speed) and ``torch.export`` (a deployable graph) handle it and are the supported routes."""


def _autocast_off(x: torch.Tensor):
    """Autocast switched off around the float32 inner loop. A device type autocast does not know (``meta``: the
    shape-only forward of a model built with ``device='meta'``) has no autocast to switch off."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _f32(t: torch.Tensor) -> torch.Tensor:
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


def _mlp_read(weights: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
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
def _write_coefficients(theta: torch.Tensor, eta: Optional[torch.Tensor], keep: torch.Tensor, b: int) -> Dict[str, torch.Tensor]:
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


def _coefficients_per_chunk(theta, eta, keep, b: int) -> List[Dict[str, torch.Tensor]]:
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
    """The whole chunked write from per-head initial weights, in the dual form of ``_NeuralMemory._write``, as one
    autograd node with a hand-written backward.

    Inputs: keys k and values v ``[H*B, N, d]`` (head-major), the token weights ``gamma`` [H*B, C+1, N] and decays
    ``r0`` [H*B, C+1] of ``_write_coefficients``, the chunk length b and the per-head initial weights
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


# FX: every memory call is one leaf node of a traced graph. The write loops over a number of chunks that depends
# on the token count, builds its coefficients with Python arithmetic on sizes and switches autocast off around the
# float32 inner loop, none of which symbolic tracing can follow; as a leaf, the graph runs this module's eager code
# (the fused write included). ``torch.fx.wrap`` makes every tracer (``torch.fx.symbolic_trace`` too) record these
# calls as single nodes; ``register_notrace_function`` / ``register_notrace_module`` (on the classes below) are
# timm's own registry, which its FX feature extraction (``features_only=True, feature_cls='fx'``,
# ``create_feature_extractor``, ``get_graph_node_names``) reads, as for timm's own untraceable layers.

@register_notrace_function
@torch.fx.wrap
def memory_forward(memory: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                   return_stats: bool = False):
    """``memory(x, context, return_stats)``, one FX leaf (see above)."""
    return memory._forward(x, context, return_stats)


@register_notrace_function
@torch.fx.wrap
def memory_write(memory: nn.Module, x: torch.Tensor, state: Optional[MemoryState] = None,
                 context: Optional[torch.Tensor] = None, return_stats: bool = False):
    """``memory.write(x, state, context, return_stats)``, one FX leaf (see above)."""
    return memory._write_tokens(x, state, context, return_stats)


@register_notrace_function
@torch.fx.wrap
def memory_read(memory: nn.Module, x: torch.Tensor, state: Optional[MemoryState] = None) -> torch.Tensor:
    """``memory.read(x, state)``, one FX leaf (see above)."""
    return memory._read_tokens(x, state)


class _MemoryBase(nn.Module):
    """Shared parts: input norm, head layout, per-head memory MLP M0 and the output projection.

    Built through :func:`create_memory`, which checks every option (``_check_options``).

    timm manners: ``reset_parameters()`` initialises every parameter in place (what timm's ``init_weights()`` needs
    after ``to_empty()``, e.g. for a model built with ``device='meta'``); under FX tracing every call is one leaf
    node (``memory_forward``); ``torch.jit.script`` raises ``NotScriptableError`` at once."""

    # the create_memory options this type takes, as stored on the instance (see ``options``)
    option_names = ('heads', 'head_dim', 'depth', 'expansion')

    @property
    def options(self) -> Dict[str, Union[int, float, str, bool, None]]:
        """Every ``create_memory`` option at the value this module resolved it to (``heads=None`` -> the count).

        Checkpoints and Hub configs record these, so a later change of a default cannot change a saved model."""
        return {name: getattr(self, name) for name in self.option_names}

    def __init__(
            self,
            dim: int,
            heads: Optional[int] = None,
            head_dim: int = 64,
            depth: int = 2,
            expansion: float = 4.0,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.heads = heads or max(1, dim // head_dim)
        self.head_dim = head_dim
        self.depth = depth
        self.expansion = expansion
        inner = self.heads * head_dim
        hidden = int(head_dim * expansion)
        sizes = [head_dim] + [hidden] * (depth - 1) + [head_dim]
        self.norm = LayerNorm(dim, **dd)
        # M0: per-head initial memory weights (the learned state every image starts from)
        self.initial_weights = nn.ParameterList([
            nn.Parameter(torch.randn(self.heads, sizes[i], sizes[i + 1], **dd) / math.sqrt(sizes[i]))
            for i in range(depth)
        ])
        self.proj = nn.Linear(inner, dim, **dd)
        self.inner = inner

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, return_stats: bool = False):
        """[B, N, D] -> [B, N, D] retrieved values; with ``return_stats`` also ``{'surprise': [B, N]}``.

        ``context`` (``advanced`` with ``qkv_diff_views``): tokens [B, N, D] the keys and values are taken from."""
        return memory_forward(self, x, context, return_stats)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor], return_stats: bool):
        raise NotImplementedError

    def _init_views(self) -> None:
        """Initialise the subclass's projections and gates in place (construction and ``reset_parameters``)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise every parameter in place as construction does (new random values). timm's
        ``init_weights()`` calls it after ``to_empty()``; a model built on the meta device has no values until then."""
        self.norm.reset_parameters()
        with torch.no_grad():
            for w in self.initial_weights:
                w.normal_(0., 1. / math.sqrt(w.shape[1]))   # as construction: randn / sqrt(d_in)
        self.proj.reset_parameters()
        self._init_views()

    def __prepare_scriptable__(self):
        # torch.jit.script calls this hook before compiling anything: one clear error instead of a parse failure
        raise NotScriptableError(
            f'{type(self).__name__} cannot be compiled with TorchScript (torch.jit.script): the Titans memory writes '
            f'each image with a data-dependent chunk loop and a custom autograd node. Use torch.compile(model) for '
            f'speed or torch.export.export(model, (x,)) for a deployable graph.')

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, dh]

    def _merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, H, N, dh = t.shape
        return self.proj(t.transpose(1, 2).reshape(B, N, H * dh))  # [B, N, D]


@register_notrace_module
class PersistentMemory(_MemoryBase):
    """``mlp`` memory: the per-head memory MLP M0 read with queries, never updated (y = M0(q))."""

    kind = 'mlp'

    def __init__(self, dim: int, heads: Optional[int] = None, head_dim: int = 64, depth: int = 2,
                 expansion: float = 4.0, device=None, dtype=None, **unused):
        super().__init__(dim, heads=heads, head_dim=head_dim, depth=depth, expansion=expansion, device=device, dtype=dtype)
        self.q = nn.Linear(dim, self.inner, **{'device': device, 'dtype': dtype})
        self._init_views()

    def _init_views(self) -> None:
        trunc_normal_(self.q.weight, std=.02)
        nn.init.zeros_(self.q.bias)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor], return_stats: bool):
        q = F.normalize(self._split_heads(self.q(self.norm(x))), dim=-1)  # [B, H, N, dh]
        y = _mlp_read(list(self.initial_weights), q)
        out = self._merge_heads(y)
        if return_stats:
            return out, {'surprise': torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)}
        return out


class _NeuralMemory(_MemoryBase):
    """Test-time-updated memory: the chunk-parallel write loop and the reads, shared by ``simple`` and ``advanced``."""

    def __init__(
            self,
            dim: int,
            heads: Optional[int] = None,
            head_dim: int = 64,
            depth: int = 2,
            expansion: float = 4.0,
            chunk_size: Optional[int] = 16,
            read_mode: str = 'after_write',
            momentum: bool = True,
            max_lr: float = 1.0,
            device=None,
            dtype=None,
    ):
        super().__init__(dim, heads=heads, head_dim=head_dim, depth=depth, expansion=expansion, device=device, dtype=dtype)
        self.chunk_size = chunk_size
        self.read_mode = read_mode
        self.momentum = momentum
        self.max_lr = max_lr

    option_names = _MemoryBase.option_names + ('chunk_size', 'read_mode', 'momentum', 'max_lr')

    # set by the model's set_grad_checkpointing: write with autograd ops (see forward)
    grad_checkpointing = False

    # Subclasses define their views and gates:
    #   _qkv(x, context) -> q, k, v [B, H, N, dh];  _queries(x) -> q [B, H, M, dh]
    #   _gates(x, chunk) -> theta, eta, keep (= 1 - alpha), each [B, H, N]  (or override _views(x, context) -> all six)

    def initial_state(self, batch_size: int) -> MemoryState:
        """The state every image starts from: M0 (expanded over the batch, no copy) and no momentum."""
        return {'weights': [w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_weights], 'momentum': None}

    def _write_read(self, q, k, v, theta, eta, keep):
        """forward()'s case: write from M0, then every token reads the final memory. Returns (y [B, H, N, dh], stats).

        The dual form, in one autograd node with a hand-written backward (``_DualWrite``): the weights at each chunk
        start are never built, the chunk's forward ``x W`` and closed-form backward ``g W^T`` are
        ``r0 x W0 - ((x X^T) * gamma) G`` and ``r0 g W0^T - ((g G^T) * gamma) X`` over the earlier tokens (x their
        layer inputs, G their scaled gradients, see ``_write_coefficients``); only the final weights are built,
        then read. Per head with the batch folded into the rows. Tests check it against ``_write`` + a read, against a
        token-by-token reference and with gradcheck.
        """
        B, H, N, _ = k.shape
        b = self.chunk_size or N
        hm = lambda t: None if t is None else t.transpose(0, 1).flatten(0, 1)   # [B, H, ...] -> [H*B, ...]
        co = _write_coefficients(hm(theta), hm(eta), hm(keep), b)
        surprise, *weights = _DualWrite.apply(hm(k), hm(v), co['gamma'], co['r0'], b,
                                              *[_f32(w) for w in self.initial_weights])
        weights = [w.view(H, B, *w.shape[1:]).transpose(0, 1) for w in weights]        # head-major, as [B, H, ...]
        return _mlp_read(weights, q), {'surprise': surprise.view(H, B, N).mean(0)}

    def _write(self, k, v, theta, eta, keep, state: MemoryState, q=None):
        """Write keys/values chunk by chunk. k, v: [B, H, N, dh]; gates [B, H, N]. Returns (state, stats, reads).

        When q is given (causal read) each chunk's queries read the memory *before* that chunk is written.

        Used by ``write()`` (which returns the momentum too, and may start from a given state) and causal reads;
        forward's after-write read takes ``_write_read``, the same update in the dual form. This loop is built from
        autograd ops: with momentum, each layer's weights W and momentum S are kept stacked as one
        ``[B*H, 2, d_in, d_out]`` tensor, so a chunk's forgetting/momentum mixing is one small bmm and its gradient
        step one baddbmm.
        """
        B, H, N, _ = k.shape
        BH = B * H
        b = self.chunk_size or N
        coefs = _coefficients_per_chunk(theta.flatten(0, 1), None if eta is None else eta.flatten(0, 1), keep.flatten(0, 1), b)
        k, v = k.flatten(0, 1), v.flatten(0, 1)                               # [B*H, N, dh]
        ks, vs, kks = k.split(b, dim=1), v.split(b, dim=1), k.pow(2).sum(-1).split(b, dim=-1)
        qs = q.flatten(0, 1).split(b, dim=1) if q is not None else None
        use_mom = eta is not None
        weights = [_f32(w).expand(B, H, *w.shape[-2:]).flatten(0, 1) for w in state['weights']]
        if use_mom:
            moms = state['momentum'] or [torch.zeros_like(w) for w in weights]
            packed = [torch.stack([w, _f32(m).reshape(w.shape)], dim=1) for w, m in zip(weights, moms)]  # [BH, 2, din, dout]
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

    def _views(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        q, k, v = self._qkv(x, context)
        return (q, k, v) + self._gates(x if context is None else context, self.chunk_size or k.shape[2])

    def _prepare(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        xn = self.norm(x)
        cn = self.norm(context) if context is not None else None
        q, k, v, theta, eta, keep = self._views(xn, cn)
        if not self.momentum:
            eta = None
        with _autocast_off(x):
            q, k = F.normalize(_f32(q), dim=-1), F.normalize(_f32(k), dim=-1)
            v, theta, keep = _f32(v), _f32(theta), _f32(keep)
            eta = _f32(eta) if eta is not None else None
        return q, k, v, theta, eta, keep

    def write(self, x: torch.Tensor, state: Optional[MemoryState] = None, context: Optional[torch.Tensor] = None,
              return_stats: bool = False):
        """Write the tokens ``x`` [B, N, D] into the memory (from M0 when ``state`` is None); returns the new state,
        or ``(state, {'surprise': [B, N]})`` with ``return_stats``."""
        return memory_write(self, x, state, context, return_stats)

    def read(self, x: torch.Tensor, state: Optional[MemoryState] = None) -> torch.Tensor:
        """Read the memory ``state`` (M0 when None) with queries from ``x`` [B, M, D] without updating it (15)."""
        return memory_read(self, x, state)

    def _write_tokens(self, x: torch.Tensor, state: Optional[MemoryState], context: Optional[torch.Tensor],
                      return_stats: bool):
        _, k, v, theta, eta, keep = self._prepare(x, context)
        with _autocast_off(x):
            state, stats, _ = self._write(k, v, theta, eta, keep, state or self.initial_state(x.shape[0]))
        return (state, stats) if return_stats else state

    def _read_tokens(self, x: torch.Tensor, state: Optional[MemoryState]) -> torch.Tensor:
        q = self._queries(self.norm(x))
        with _autocast_off(x):
            q = F.normalize(_f32(q), dim=-1)
            weights = (state or self.initial_state(x.shape[0]))['weights']
            y = _mlp_read([_f32(w) for w in weights], q)
        return self._merge_heads(y.to(x.dtype) if not torch.is_autocast_enabled() else y)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor], return_stats: bool):
        # write the image's tokens, then read them (``read_mode``)
        q, k, v, theta, eta, keep = self._prepare(x, context)
        with _autocast_off(x):
            causal = self.read_mode == 'causal'
            if causal:
                _, stats, reads = self._write(k, v, theta, eta, keep, self.initial_state(x.shape[0]), q=q)
                y = torch.cat(reads, dim=2)
            elif torch.compiler.is_compiling() or (self.grad_checkpointing and torch.is_grad_enabled()):
                # the same update as plain autograd ops: the dual form's node (scratch buffers, out= writes, a
                # finalizer) is not traceable, while this loop is and inductor fuses it well (see the speed
                # notes); and its saved tensors go through checkpointing's hooks, the node's buffers do not
                state, stats, _ = self._write(k, v, theta, eta, keep, self.initial_state(x.shape[0]))
                y = _mlp_read(state['weights'], q)
            else:
                y, stats = self._write_read(q, k, v, theta, eta, keep)  # (15) every token reads the final memory
        out = self._merge_heads(y.to(x.dtype) if not torch.is_autocast_enabled() else y)
        return (out, stats) if return_stats else out


@register_notrace_module
class SimpleNeuralMemory(_NeuralMemory):
    """``simple`` memory: learned per-head scalar theta (inner lr), eta (momentum) and alpha (forgetting).

    One fused linear gives queries, keys and values (like timm's Attention qkv). The memory is linear by default
    (``depth=1``); ``depth=2`` makes it as deep, and as costly to write, as ``advanced``'s."""

    kind = 'simple'

    def __init__(self, dim: int, heads: Optional[int] = None, head_dim: int = 64, depth: int = 1,
                 expansion: float = 4.0, chunk_size: Optional[int] = 16, read_mode: str = 'after_write',
                 momentum: bool = True, max_lr: float = 1.0, device=None, dtype=None, **unused):
        super().__init__(dim, heads, head_dim, depth, expansion, chunk_size, read_mode, momentum, max_lr, device, dtype)
        dd = {'device': device, 'dtype': dtype}
        self.qkv = nn.Linear(dim, 3 * self.inner, **dd)
        # logits of the per-head gates (values: _init_views)
        self.theta_logit = nn.Parameter(torch.empty(self.heads, **dd))
        # without momentum there is no eta: no parameter that would never get a gradient (DDP needs none)
        self.eta_logit = nn.Parameter(torch.empty(self.heads, **dd)) if momentum else None
        self.alpha_logit = nn.Parameter(torch.empty(self.heads, **dd))
        self._init_views()

    def _init_views(self) -> None:
        trunc_normal_(self.qkv.weight, std=.02)
        nn.init.zeros_(self.qkv.bias)
        # theta ~ 0.5 * max_lr, eta ~ 0.5, alpha ~ 0.02 at init
        nn.init.zeros_(self.theta_logit)
        if self.eta_logit is not None:
            nn.init.zeros_(self.eta_logit)
        nn.init.constant_(self.alpha_logit, -4.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.eta_logit is None:
            state_dict.pop(prefix + 'eta_logit', None)   # saved before momentum-free memories dropped it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _qkv(self, x, context):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def _queries(self, x):
        return self._split_heads(F.linear(x, self.qkv.weight[:self.inner], self.qkv.bias[:self.inner]))

    def _gates(self, x, chunk):
        B, N, _ = x.shape
        shape = (B, self.heads, N)
        theta = (self.max_lr / chunk * torch.sigmoid(self.theta_logit))[None, :, None].expand(shape)
        eta = torch.sigmoid(self.eta_logit)[None, :, None].expand(shape) if self.momentum else None
        keep = (1 - torch.sigmoid(self.alpha_logit))[None, :, None].expand(shape)
        return theta, eta, keep


@register_notrace_module
class AdvancedNeuralMemory(_NeuralMemory):
    """``advanced`` memory: separate W_Q / W_K / W_V, data-dependent per-token theta and per-chunk eta / alpha.

    With ``qkv_diff_views=True`` keys and values come from ``context`` (e.g. an earlier depth of the backbone)
    while queries come from the input.
    """

    kind = 'advanced'
    option_names = _NeuralMemory.option_names + ('qkv_diff_views',)

    def __init__(self, dim: int, heads: Optional[int] = None, head_dim: int = 64, depth: int = 2,
                 expansion: float = 4.0, chunk_size: Optional[int] = 16, read_mode: str = 'after_write',
                 momentum: bool = True, max_lr: float = 1.0, qkv_diff_views: bool = False,
                 device=None, dtype=None, **unused):
        super().__init__(dim, heads, head_dim, depth, expansion, chunk_size, read_mode, momentum, max_lr, device, dtype)
        dd = {'device': device, 'dtype': dtype}
        self.qkv_diff_views = qkv_diff_views
        self.q = nn.Linear(dim, self.inner, **dd)
        self.k = nn.Linear(dim, self.inner, **dd)
        self.v = nn.Linear(dim, self.inner, **dd)
        self.gates = nn.Linear(dim, 3 * self.heads, **dd)  # per head: theta (per token), eta, alpha (per chunk)
        self._init_views()

    def _init_views(self) -> None:
        for lin in (self.q, self.k, self.v):
            trunc_normal_(lin.weight, std=.02)
            nn.init.zeros_(lin.bias)
        trunc_normal_(self.gates.weight, std=.02)
        with torch.no_grad():   # gate logits per head: theta 0, eta 0, alpha -4 (theta ~ 0.5 max_lr, alpha ~ 0.02)
            bias = self.gates.bias.view(3, self.heads)
            bias[:2].zero_()
            bias[2].fill_(-4.0)

    def _views(self, x, context):
        # one matmul for every projection that reads the same tokens (the parameters stay separate modules)
        chunk = self.chunk_size or x.shape[1]
        split = self._split_heads
        if self.qkv_diff_views and context is not None:
            k, v, g = self._fused((self.k, self.v, self.gates), context)
            q = self.q(x)
        else:
            q, k, v, g = self._fused((self.q, self.k, self.v, self.gates), x)
        return (split(q), split(k), split(v)) + self._gate_values(g, chunk)

    @staticmethod
    def _fused(linears, x):
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears])
        return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)

    def _queries(self, x):
        return self._split_heads(self.q(x))

    def _gate_values(self, g, chunk):
        B, N, _ = g.shape
        g = g.transpose(1, 2)                                                  # [B, 3H, N]
        theta = self.max_lr / chunk * torch.sigmoid(g[:, :self.heads])         # per token
        # eta, alpha: one value per chunk from the chunk's mean token, broadcast back to its tokens
        pooled = g[:, self.heads:]
        n_chunks = math.ceil(N / chunk)
        pad = n_chunks * chunk - N
        counts = torch.full((n_chunks,), float(chunk), device=g.device, dtype=g.dtype)
        if pad:
            counts[-1:].fill_(chunk - pad)   # a fill, not a host-to-device copy (CUDA graphs cannot capture one)
            pooled = F.pad(pooled, (0, pad))
        pooled = pooled.reshape(B, 2 * self.heads, n_chunks, chunk).sum(-1) / counts  # [B, 2H, C]
        pooled = pooled.repeat_interleave(chunk, dim=-1)[..., :N]              # [B, 2H, N]
        eta = torch.sigmoid(pooled[:, :self.heads])
        keep = 1 - torch.sigmoid(pooled[:, self.heads:])
        return theta, eta, keep


_MEMORY_CLASSES = {'mlp': PersistentMemory, 'simple': SimpleNeuralMemory, 'advanced': AdvancedNeuralMemory}


def create_memory(kind: str, dim: int, **options) -> nn.Module:
    """Build a Titans memory module mapping tokens ``[B, N, dim]`` to retrieved values ``[B, N, dim]``.

    Args:
        kind: one of ``MEMORY_TYPES`` (``'mlp'``, ``'simple'``, ``'advanced'``).
        dim: token width.
        **options: ``heads`` (default ``dim // head_dim``), ``head_dim`` (64), ``depth`` (memory MLP layers: 1 for
            ``simple``, 2 for ``mlp`` and ``advanced``),
            ``expansion`` (hidden width / head_dim, 4), ``chunk_size`` (16; None = whole image in one step),
            ``read_mode`` (``'after_write'`` or ``'causal'``), ``momentum`` (True), ``max_lr`` (bound of the inner
            step, 1.0), ``qkv_diff_views`` (advanced only). Sizes are bounded: ``depth <= MAX_DEPTH`` (16), the
            inner width ``heads * head_dim`` and the hidden width at most ``MAX_WIDTH_FACTOR`` (8) x max(dim, 64),
            M0 at most ``MAX_M0_FACTOR`` (128) x max(dim, 64)^2 parameters; anything else is a ValueError.

    ``module(x, return_stats=True)`` also returns ``{'surprise': [B, N]}``, each token's associative loss (12) at
    the weights it was written with (zeros for ``mlp``, which is never written).
    """
    if kind not in _MEMORY_CLASSES:
        raise ValueError(f'unknown memory type {kind!r}; choose one of {MEMORY_TYPES}')
    _check_options(kind, options, dim)
    return _MEMORY_CLASSES[kind](dim, **options)


def _check_options(kind: str, options: Dict[str, object], dim: Optional[int] = None) -> None:
    """One clear ValueError for an unknown option or a value of the wrong type or range. ``mlp`` is never written:
    it checks the write options (a sweep passes the same ones to every type) and ignores them.

    Sizes are bounded (``MAX_DEPTH``, ``MAX_WIDTH_FACTOR``, ``MAX_M0_FACTOR``; relative to the token width ``dim``
    when given), so a typo fails at once instead of building for minutes."""
    known = {'heads', 'head_dim', 'depth', 'expansion', 'chunk_size', 'read_mode', 'momentum', 'max_lr',
             'qkv_diff_views', 'device', 'dtype'}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f'unknown memory option(s) {sorted(unknown)}; known: {sorted(known - {"device", "dtype"})}')
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    rules = {
        'heads': (lambda v: v is None or (is_int(v) and v >= 1), 'an int >= 1 or None (dim // head_dim)'),
        'head_dim': (lambda v: is_int(v) and v >= 1, 'an int >= 1'),
        'depth': (lambda v: is_int(v) and 1 <= v <= MAX_DEPTH, f'an int in [1, {MAX_DEPTH}]'),
        'expansion': (lambda v: is_real(v) and v > 0, 'a number > 0'),
        'chunk_size': (lambda v: v is None or (is_int(v) and v >= 1), 'an int >= 1, or None (the whole image)'),
        'read_mode': (lambda v: v in READ_MODES, f'one of {READ_MODES}'),
        'momentum': (lambda v: isinstance(v, bool), 'True or False'),
        'max_lr': (lambda v: is_real(v) and v > 0, 'a number > 0 (the inner step must descend)'),
        'qkv_diff_views': (lambda v: isinstance(v, bool), 'True or False'),
    }
    for name, (ok, what) in rules.items():
        if name in options and not ok(options[name]):
            raise ValueError(f'memory option {name} must be {what}, got {options[name]!r}')
    if dim is not None:
        _check_sizes(kind, options, dim)
    if options.get('qkv_diff_views') and kind != 'advanced':
        raise ValueError("qkv_diff_views needs memory type 'advanced'")
    if kind != 'mlp' and options.get('read_mode') == 'causal' and options.get('chunk_size', 16) is None:
        raise ValueError("read_mode='causal' needs a chunk_size: with the whole image as one chunk every token "
                         "would read the initial memory and the write would be lost (e.g. chunk_size=16)")


def _check_sizes(kind: str, options: Dict[str, object], dim: int) -> None:
    """The memory's widths and M0's size at the values the module would resolve them to (see ``MAX_*``)."""
    head_dim = options.get('head_dim', 64)
    heads = options.get('heads') or max(1, dim // head_dim)
    depth = options.get('depth', 1 if kind == 'simple' else 2)
    hidden = int(head_dim * options.get('expansion', 4.0))
    limit = MAX_WIDTH_FACTOR * max(dim, 64)
    if heads * head_dim > limit:
        raise ValueError(f'memory options heads x head_dim = {heads} x {head_dim} = {heads * head_dim} exceed '
                         f'{limit} ({MAX_WIDTH_FACTOR} x max(dim={dim}, 64)); the default is dim // 64 heads of 64')
    if hidden > limit or (depth > 1 and hidden < 1):   # one upper bound whatever the depth (unused at depth 1)
        raise ValueError(f'memory options head_dim x expansion = {head_dim} x {options.get("expansion", 4.0)} give a '
                         f'hidden width of {hidden}; it must be in [1, {limit}] ({MAX_WIDTH_FACTOR} x max(dim={dim}, 64))')
    sizes = [head_dim] + [hidden] * (depth - 1) + [head_dim]
    m0 = heads * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    m0_limit = MAX_M0_FACTOR * max(dim, 64) ** 2
    if m0 > m0_limit:
        raise ValueError(f'memory options heads={heads}, head_dim={head_dim}, depth={depth}, hidden width {hidden} '
                         f'give M0 {m0:,} parameters, more than {m0_limit:,} ({MAX_M0_FACTOR} x max(dim={dim}, 64)^2, '
                         f'about ten timm Blocks); use fewer or narrower layers')
