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

The default depths: the deep memory is one of ``advanced``'s features, and ``simple`` (scalar gates) is the
cheaper type: a depth-2 ``simple`` costs what ``advanced`` costs (the write
is the same), a linear one about a quarter of that. Either type takes any ``depth``.

Both ``simple`` and ``advanced`` use q/k L2 normalisation, multi-head memory (head dim 64) and the
chunk-parallel form (16-18): inside a chunk every token's gradient is taken at the weights of
the chunk start (mini-batch gradient descent), momentum is a linear recurrence over the chunk's tokens and
forgetting a cumulative product; both are folded into per-token coefficients, so a whole chunk costs one
forward and one closed-form backward of the memory MLP (batched matmuls, no autograd inside forward).
The weights at each chunk start are never built (the "dual form", ``memory_fused.py``): they are M0 plus a
weighted sum of the earlier tokens' rank-one updates; only the final weights are built, once.
With ``chunk_size=1`` this is exactly the token-by-token rule above; ``chunk_size=None`` writes the whole image in
one step (the full-batch inner step that vision TTT work found best). A shorter last chunk is still written.

Choices where the paper is silent:

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

Every type implements one interface, ``TitansMemory`` (write / read / stats), which is all ``vit.py`` and the
evaluator use: ``initial_state``, ``write``, ``read``, ``forward`` (write then read), ``register_stats_hook`` (the
per-token surprise of each write) and ``writes`` (False for ``mlp``: it has no surprise).

Where the code lives (the speed notes, what the write costs and what was tried, are in ``memory_fused.py``):

* ``memory.py`` (this file): the interface, the three nn.Modules (views, gates, which write path runs),
  ``create_memory`` and its option checks;
* ``memory_functional.py``: the update rule as pure tensor functions (memory MLP, closed-form gradient, chunk
  coefficients, the readable chunked write) and its float64 token-by-token reference;
* ``memory_fused.py``: the fused CPU write (dual form, one autograd node, scratch pool) with the speed notes
  (measured costs, what was tried) that justify it.
"""
import abc
import contextlib
import math
from collections import OrderedDict
from typing import Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, register_notrace_function, register_notrace_module, trunc_normal_
from torch.utils.hooks import RemovableHandle

from .memory_functional import MemoryState, chunked_write, memory_mlp_read, upcast
from .memory_fused import dual_form_write, empty_scratch_pool

__all__ = ['MEMORY_TYPES', 'READ_MODES', 'create_memory', 'MemoryState', 'MemoryStats', 'StatsHook',
           'NotScriptableError', 'TitansMemory', 'PersistentMemory', 'SimpleNeuralMemory', 'AdvancedNeuralMemory',
           'empty_scratch_pool']

MEMORY_TYPES = ('mlp', 'simple', 'advanced')
READ_MODES = ('after_write', 'causal')

# what a write measured: {'surprise': [B, N]} (each token's loss (12) at the weights it was written with, mean over
# heads, float32); empty for a memory that is never written (``mlp``)
MemoryStats = Dict[str, torch.Tensor]
StatsHook = Callable[['TitansMemory', MemoryStats], None]

# Upper bounds of the size options (``_check_options``). Without them a typo (``depth=100000``, ``heads=100000``)
# builds for minutes and then cannot run. They sit far above anything useful: the defaults are depth 1-2, an
# inner width of dim (heads x 64) and a hidden width of 4 x 64, and vision test-time-training work (ViT^3) found deeper
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


# FX: every memory call is one leaf node of a traced graph. The write loops over a number of chunks that depends
# on the token count, builds its coefficients with Python arithmetic on sizes and switches autocast off around the
# float32 inner loop, none of which symbolic tracing can follow; as a leaf, the graph runs this module's eager code
# (the fused write and the stats hooks included). ``torch.fx.wrap`` makes every tracer (``torch.fx.symbolic_trace``
# too) record these calls as single nodes; ``register_notrace_function`` / ``register_notrace_module`` (on the
# classes below) are timm's own registry, which its FX feature extraction (``features_only=True, feature_cls='fx'``,
# ``create_feature_extractor``, ``get_graph_node_names``) reads, as for timm's own untraceable layers.

@register_notrace_function
@torch.fx.wrap
def memory_forward(memory: nn.Module, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                   return_stats: bool = False):
    """``memory(x, context, return_stats)``, one FX leaf (see above)."""
    out, stats = memory._forward(x, context)
    memory._report_stats(stats)
    return (out, stats) if return_stats else out


@register_notrace_function
@torch.fx.wrap
def memory_write(memory: nn.Module, x: torch.Tensor, state: Optional[MemoryState] = None,
                 context: Optional[torch.Tensor] = None, return_stats: bool = False):
    """``memory.write(x, state, context, return_stats)``, one FX leaf (see above)."""
    state, stats = memory._write_tokens(x, state, context)
    memory._report_stats(stats)
    return (state, stats) if return_stats else state


@register_notrace_function
@torch.fx.wrap
def memory_read(memory: nn.Module, x: torch.Tensor, state: Optional[MemoryState] = None) -> torch.Tensor:
    """``memory.read(x, state)``, one FX leaf (see above)."""
    return memory._read_tokens(x, state)


class TitansMemory(nn.Module, abc.ABC):
    """The interface every memory type implements, and the parts they share (input norm, head layout, the per-head
    memory MLP M0, the output projection).

    A memory's *state* is the weights (and momentum) of its inner MLP, ``MemoryState``; ``None`` stands for M0.
    Tokens are ``[B, N, D]``; every image of the batch has its own state.

    * ``initial_state(batch_size)``: the state every image starts from (M0, no momentum).
    * ``write(x, state=None, context=None, return_stats=False)``: write the tokens into ``state`` and return the new
      state (and the write's ``MemoryStats`` with ``return_stats``). The state passed in is not modified.
    * ``read(x, state=None)``: retrieve ``[B, M, D]`` with queries from ``x`` ``[B, M, D]``, without updating (15).
    * ``forward(x, context=None, return_stats=False)``: write the image's tokens from M0, then read them
      (``read_mode``); what MAL and MAG call.
    * ``register_stats_hook(hook)``: ``hook(memory, stats)`` runs after every write (``forward``'s and
      ``write``'s), also inside ``torch.no_grad`` / ``inference_mode`` and traced FX graphs; returns a handle
      whose ``remove()`` unregisters it. This is how an evaluator reads the surprise of a model's ordinary forward.
    * ``writes``: False for a memory that is never written (``mlp``): its ``write`` returns the state unchanged,
      its stats are ``{}`` (no surprise) and its stats hooks never run.
    * ``uses_context``: whether keys and values come from ``context``, a second view of the same tokens
      (``advanced`` with ``qkv_diff_views``); the other memories ignore ``context``.
    * timm manners: ``options`` (every option at its resolved value), ``reset_parameters()`` (what timm's
      ``init_weights()`` needs after ``to_empty()``, e.g. for a model built with ``device='meta'``),
      ``no_weight_decay()``, ``set_grad_checkpointing()``; under FX tracing every call is one leaf node
      (``memory_forward``, ``memory_write``, ``memory_read``); ``torch.jit.script`` raises ``NotScriptableError``.

    A type implements ``_forward(x, context) -> (y, stats)``, ``_write_tokens(x, state, context) -> (state, stats)``,
    ``_read_tokens(x, state) -> y`` and ``_init_views()``. Built through :func:`create_memory`, which checks every
    option (``_check_options``).
    """

    kind: str = ''
    writes: bool = True
    uses_context: bool = False
    # the create_memory options this type takes, as stored on the instance (see ``options``)
    option_names = ('heads', 'head_dim', 'depth', 'expansion')
    # set by set_grad_checkpointing: write with autograd ops, whose saved tensors checkpointing can drop
    grad_checkpointing = False

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
        self._stats_hooks: Dict[int, StatsHook] = OrderedDict()

    @property
    def options(self) -> Dict[str, Union[int, float, str, bool, None]]:
        """Every ``create_memory`` option at the value this module resolved it to (``heads=None`` -> the count).

        Checkpoints and Hub configs record these, so a later change of a default cannot change a saved model."""
        return {name: getattr(self, name) for name in self.option_names}

    def initial_state(self, batch_size: int) -> MemoryState:
        """The state every image starts from: M0 (expanded over the batch, no copy) and no momentum."""
        return {'weights': [w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_weights], 'momentum': None}

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, return_stats: bool = False):
        """Write the tokens ``x`` [B, N, D] from M0, then read them: [B, N, D] retrieved values; with
        ``return_stats`` also the write's ``MemoryStats``.

        ``context``: a second view of the same tokens [B, N, D]; memories with ``uses_context`` take keys and values
        from it, the others ignore it."""
        return memory_forward(self, x, context, return_stats)

    def write(self, x: torch.Tensor, state: Optional[MemoryState] = None, context: Optional[torch.Tensor] = None,
              return_stats: bool = False):
        """Write the tokens ``x`` [B, N, D] into ``state`` (M0 when None); returns the new state, or
        ``(state, stats)`` with ``return_stats``. ``context`` as in ``forward``."""
        return memory_write(self, x, state, context, return_stats)

    def read(self, x: torch.Tensor, state: Optional[MemoryState] = None) -> torch.Tensor:
        """Read the memory ``state`` (M0 when None) with queries from ``x`` [B, M, D] without updating it (15)."""
        return memory_read(self, x, state)

    def register_stats_hook(self, hook: StatsHook) -> RemovableHandle:
        """Call ``hook(memory, stats)`` after every write of this memory; ``handle.remove()`` stops it.

        ``stats`` is ``{'surprise': [B, N]}``: each token's associative loss (12) at the weights it was written with,
        mean over heads (float32). A memory that is never written (``writes`` False: ``mlp``) never calls it."""
        handle = RemovableHandle(self._stats_hooks)
        self._stats_hooks[handle.id] = hook
        return handle

    def _report_stats(self, stats: MemoryStats) -> None:
        if self.writes:
            for hook in self._stats_hooks.values():
                hook(self, stats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Follow the model's gradient checkpointing: under it the memory writes with plain autograd ops (the fused
        write keeps buffers that checkpointing cannot drop), whose saved tensors are recomputed like the block's."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> Set[str]:
        """Names of this module's parameters to keep out of weight decay (timm's convention): none."""
        return set()

    def reset_parameters(self) -> None:
        """Initialise every parameter in place as construction does (new random values). timm's
        ``init_weights()`` calls it after ``to_empty()``; a model built on the meta device has no values until then."""
        self.norm.reset_parameters()
        with torch.no_grad():
            for w in self.initial_weights:
                w.normal_(0., 1. / math.sqrt(w.shape[1]))   # as construction: randn / sqrt(d_in)
        self.proj.reset_parameters()
        self._init_views()

    # What each memory type implements; the public forward / write / read wrap these as FX leaves.
    @abc.abstractmethod
    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, MemoryStats]:
        """Write ``x`` (keys/values from ``context`` where the type uses it), read every token: (output, stats)."""

    @abc.abstractmethod
    def _write_tokens(self, x: torch.Tensor, state: Optional[MemoryState],
                      context: Optional[torch.Tensor]) -> Tuple[Optional[MemoryState], MemoryStats]:
        """Write ``x`` into ``state`` (``None``: start from M0): (new state, stats)."""

    @abc.abstractmethod
    def _read_tokens(self, x: torch.Tensor, state: Optional[MemoryState]) -> torch.Tensor:
        """Read the memory ``state`` (``None``: M0) with queries from ``x``."""

    @abc.abstractmethod
    def _init_views(self) -> None:
        """Initialise the subclass's projections and gates in place (construction and ``reset_parameters``)."""

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
class PersistentMemory(TitansMemory):
    """``mlp`` memory: the per-head memory MLP M0 read with queries, never updated (y = M0(q)).

    Never written (``writes`` False): ``write`` hands the state back unchanged and reports no surprise."""

    kind = 'mlp'
    writes = False

    def __init__(self, dim: int, heads: Optional[int] = None, head_dim: int = 64, depth: int = 2,
                 expansion: float = 4.0, device=None, dtype=None, **unused):
        super().__init__(dim, heads=heads, head_dim=head_dim, depth=depth, expansion=expansion, device=device, dtype=dtype)
        self.q = nn.Linear(dim, self.inner, **{'device': device, 'dtype': dtype})
        self._init_views()

    def _init_views(self) -> None:
        trunc_normal_(self.q.weight, std=.02)
        nn.init.zeros_(self.q.bias)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, MemoryStats]:
        return self._read_tokens(x, None), {}

    def _write_tokens(self, x: torch.Tensor, state: Optional[MemoryState],
                      context: Optional[torch.Tensor]) -> Tuple[Optional[MemoryState], MemoryStats]:
        return state, {}

    def _read_tokens(self, x: torch.Tensor, state: Optional[MemoryState]) -> torch.Tensor:
        q = F.normalize(self._split_heads(self.q(self.norm(x))), dim=-1)  # [B, H, N, dh]
        y = memory_mlp_read(list(self.initial_weights) if state is None else state['weights'], q)
        return self._merge_heads(y)


class _NeuralMemory(TitansMemory):
    """Test-time-updated memory: the views, the choice of write path and the reads, shared by ``simple`` and
    ``advanced``. The update itself is ``memory_functional.chunked_write`` (readable autograd ops) or
    ``memory_fused.dual_form_write`` (the same update, fused; forward's default path)."""

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

    option_names = TitansMemory.option_names + ('chunk_size', 'read_mode', 'momentum', 'max_lr')

    # Subclasses define their views and gates:
    #   _qkv(x, context) -> q, k, v [B, H, N, dh];  _queries(x) -> q [B, H, M, dh]
    #   _gates(x, chunk) -> theta, eta, keep (= 1 - alpha), each [B, H, N]  (or override _views(x, context) -> all six)

    def _views(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        q, k, v = self._qkv(x, context)
        return (q, k, v) + self._gates(x if context is None else context, self.chunk_size or k.shape[2])

    def _prepare(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        xn = self.norm(x)
        cn = self.norm(context) if context is not None and self.uses_context else None
        q, k, v, theta, eta, keep = self._views(xn, cn)
        if not self.momentum:
            eta = None
        with _autocast_off(x):
            q, k = F.normalize(upcast(q), dim=-1), F.normalize(upcast(k), dim=-1)
            v, theta, keep = upcast(v), upcast(theta), upcast(keep)
            eta = upcast(eta) if eta is not None else None
        return q, k, v, theta, eta, keep

    def _write_tokens(self, x: torch.Tensor, state: Optional[MemoryState],
                      context: Optional[torch.Tensor]) -> Tuple[MemoryState, MemoryStats]:
        # continues from the state given (momentum included): the chunked write of autograd ops
        _, k, v, theta, eta, keep = self._prepare(x, context)
        with _autocast_off(x):
            state, stats, _ = chunked_write(k, v, theta, eta, keep, state or self.initial_state(x.shape[0]),
                                            self.chunk_size)
        return state, stats

    def _read_tokens(self, x: torch.Tensor, state: Optional[MemoryState]) -> torch.Tensor:
        q = self._queries(self.norm(x))
        with _autocast_off(x):
            q = F.normalize(upcast(q), dim=-1)
            weights = (state or self.initial_state(x.shape[0]))['weights']
            y = memory_mlp_read([upcast(w) for w in weights], q)
        return self._merge_heads(y.to(x.dtype) if not torch.is_autocast_enabled() else y)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> Tuple[torch.Tensor, MemoryStats]:
        # write the image's tokens, then read them (``read_mode``)
        q, k, v, theta, eta, keep = self._prepare(x, context)
        with _autocast_off(x):
            if self.read_mode == 'causal':
                _, stats, reads = chunked_write(k, v, theta, eta, keep, self.initial_state(x.shape[0]),
                                                self.chunk_size, q=q)
                y = torch.cat(reads, dim=2)
            elif torch.compiler.is_compiling() or (self.grad_checkpointing and torch.is_grad_enabled()):
                # the same update as plain autograd ops: the dual form's node (scratch buffers, out= writes, a
                # finalizer) is not traceable, while this loop is and inductor fuses it well (see the speed
                # notes in memory_fused.py); and its saved tensors go through checkpointing's hooks, the node's
                # buffers do not
                state, stats, _ = chunked_write(k, v, theta, eta, keep, self.initial_state(x.shape[0]),
                                                self.chunk_size)
                y = memory_mlp_read(state['weights'], q)
            else:
                # the fused write, then (15): every token reads the final memory
                weights, surprise = dual_form_write(k, v, theta, eta, keep, self.initial_weights, self.chunk_size)
                y, stats = memory_mlp_read(weights, q), {'surprise': surprise}
        return self._merge_heads(y.to(x.dtype) if not torch.is_autocast_enabled() else y), stats


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

    @property
    def uses_context(self) -> bool:
        """Keys, values and gates come from ``context`` when it is given (``qkv_diff_views``)."""
        return self.qkv_diff_views

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


def create_memory(kind: str, dim: int, **options) -> TitansMemory:
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

    The module implements ``TitansMemory`` (write / read / stats): ``module(x, return_stats=True)`` also returns
    ``{'surprise': [B, N]}``, each token's associative loss (12) at the weights it was written with, and
    ``register_stats_hook`` reports it for every write; ``mlp`` is never written, so it has no surprise (``{}``).
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
