""" Titans memory-augmented Vision Transformers (MAL, MAC, MAG) on timm's VisionTransformer

Papers:
    - `Titans: Learning to Memorize at Test Time` - https://arxiv.org/abs/2501.00663 (Behrouz, Zhong, Mirrokni)
    - `An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale` - https://arxiv.org/abs/2010.11929
    - `How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers`
      - https://arxiv.org/abs/2106.10270 (the augreg backbone weights)

The backbone is timm's own ``VisionTransformer``; selected blocks are replaced by subclasses of timm's ``Block``
that add a Titans neural memory (``titans_timm.memory.create_memory``). Every parameter a subclass adds has
``memory`` in its name, so a plain timm ViT checkpoint loads with only memory parameters missing. The blocks use a
memory only through its interface (``titans_timm.memory.TitansMemory``: ``forward``, ``write``, ``read``), so every
memory type plugs into every integration.

Integrations:
    * MAL, memory as layer (``MemoryLayerBlock``): after the block, ``x = x + g * Mem(LN(x))`` (the LN is the
      memory module's own input norm).
      Placing the layer after the block (not before) means the memory sees tokens already mixed by that block's
      attention, and it costs the same either way.
    * MAG, memory as gate (``MemoryGateBlock``): a memory branch beside attention,
      ``y = attn(LN(x)); x = x + ls1(y + g * sigmoid(W y) * Mem(LN(x)))``.
    * MAC, memory as context (``MemoryContextBlock``): ``N_p`` persistent tokens and ``N_l`` tokens read from the
      memory join the block's attention as extra keys/values; they are stripped again, so the class token,
      position embedding and head see the standard layout. Keys and values come from the block's own attention
      projections (timm's ``Attention`` / ``AttentionRope``, fused ``qkv`` or separate ``q_proj``/``k_proj``/
      ``v_proj``).

Function preservation: every gate ``g`` starts at zero (LayerScale-style for MAL/MAG, a per-head gate on the
attention over the extra tokens for MAC), so with a backbone checkpoint loaded the model's logits equal the
backbone's exactly at step 0. The zero gate receives gradient at the first step; the memory behind it from the
second step on (as LoRA's B = 0).

Where the memory state lives:
    * MAL / MAG: one memory module per memory-carrying block, fresh from its M0 for each image (write the
      block's tokens, every token reads the final memory).
    * MAC: one memory module shared by all MAC blocks (``model.memory``), whose state recurs through depth for
      each image, as the Recurrent Memory Transformer recurs over segments: MAC block ``l`` first writes its
      input tokens (= the output of the blocks before it) into the state left by earlier MAC blocks,
      then reads ``N_l`` tokens with queries pooled from its tokens in raster order. Writing before reading means
      even a single MAC block uses (and trains) every memory parameter, and no block writes a state nobody reads.
      One shared module (rather than one per block) is what makes the recurrence meaningful: the state written
      by block ``l`` is the weights of the same inner model that block ``l + 1`` reads, and no block's M0 is dead.
      The state of one call lives in a memory pass that the model opens around timm's own ``forward_features`` /
      ``forward_intermediates`` (``_MemoryPass``), so timm's block loops, checkpointing and pruning run unchanged.

Memory state is per image: each image starts from M0 and never sees another image of the batch or an earlier
call, so ``model(x)[i] == model(x[i:i+1])[0]``.

Defaults, chosen by measurement with ``benchmarks/model_speed.py`` against the project's speed targets (tiny, 224 px,
CPU: train step <= 1.3x the backbone for ``mlp`` and <= 2.0x for ``simple``/``advanced``, inference <= 1.2x / 1.8x,
peak training memory <= 2x; numbers in the README):

* placement ``memory_interval=6``: memory in every 6th block ending at the last, i.e. blocks 5 and 11 of 12 (one
  in the middle, one next to the head). Measured (CPU time, 1 thread): train 1.01-1.07x for ``mlp``, 1.26-1.69x for
  ``simple``/``advanced``; inference 1.02-1.12x / 1.35-1.44x; peak train memory 1.03-1.59x. Every 4th block
  (3, 7, 11) put ``advanced`` over the memory target (2.1x) and at the train limit (1.9x).
* ``memory_options={'chunk_size': None}`` (merged under the user's ``memory_options``): each image is written in
  one full-batch inner step, the setting vision test-time-training work (ViT^3) found best, and 2-4x cheaper
  than 16-token chunks at 197 tokens. Titans' multi-chunk momentum path stays one option away
  (``memory_options={'chunk_size': 16}``).
"""
import contextlib
import json
import logging
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Attention, AttentionRope, DropPath, LayerNorm, LayerScale, trunc_normal_
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from .memory import MEMORY_TYPES, MemoryState, TitansMemory, create_memory

__all__ = [
    'APPROACHES', 'TitansVisionTransformer', 'MemoryLayerBlock', 'MemoryGateBlock', 'MemoryContextBlock',
    'PretrainedCheckpointError', 'checkpoint_filter_fn', 'split_parameters', 'memory_modules',
    'resolve_memory_blocks', 'PretrainedWeightsUnavailable', 'FMNIST5_WEIGHTS', 'FMNIST5_MODEL_ARGS', 'TAG_MODEL_ARGS',
]

_logger = logging.getLogger(__name__)

APPROACHES = ('mal', 'mac', 'mag')
# default placement and memory options, chosen with benchmarks/model_speed.py (see the module docstring)
DEFAULT_MEMORY_INTERVAL = 6
DEFAULT_MEMORY_OPTIONS = {'chunk_size': None}


class PretrainedCheckpointError(ValueError):
    """A pretrained checkpoint does not fit the model (unexpected, mismatched or missing non-memory keys)."""


def is_memory_param(name: str) -> bool:
    """True for parameters/buffers added by the memory integration (every one has ``memory`` in its name)."""
    return 'memory' in name


def resolve_memory_blocks(
        depth: int,
        memory_blocks: Optional[Sequence[int]] = None,
        memory_interval: Optional[int] = None,
) -> List[int]:
    """Indices of the blocks that carry memory.

    Args:
        depth: Number of transformer blocks.
        memory_blocks: Explicit block indices (negative counts from the end); wins over ``memory_interval``.
        memory_interval: Memory in every ``memory_interval``-th block, ending at the last block
            (interval 4, depth 12 -> blocks 3, 7, 11). A depth shorter than the interval still gets the last block.

    Returns:
        Sorted, unique, non-negative block indices (at least one).
    """
    if memory_blocks is not None:
        if isinstance(memory_blocks, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in memory_blocks):
            raise ValueError(f'memory_blocks must be a list of block indices, got {memory_blocks!r}')
        bad = [i for i in memory_blocks if not -depth <= i < depth]
        if bad or not memory_blocks:
            raise ValueError(
                f'memory_blocks {list(memory_blocks)} must be a non-empty list of indices in [-{depth}, {depth - 1}] '
                f'for a model of depth {depth}')
        return sorted({i % depth for i in memory_blocks})
    interval = DEFAULT_MEMORY_INTERVAL if memory_interval is None else memory_interval
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f'memory_interval must be a positive int, got {memory_interval!r}')
    # count back from the last block so the memory nearest the head is always present
    return list(range(depth - 1, -1, -interval))[::-1]


def _zero_layer_scale(dim: int, **dd) -> LayerScale:
    # init_values=0 makes the memory branch an exact no-op at step 0 (function-preserving insertion)
    return LayerScale(dim, init_values=0., **dd)


@torch.fx.wrap
def _check_no_attn_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """MAC blocks take no attention mask. An FX leaf: under symbolic tracing ``attn_mask`` and ``is_causal`` are
    graph inputs, so the check is recorded and runs when the traced graph runs."""
    if attn_mask is not None or is_causal:
        raise ValueError(
            'MAC models do not support attn_mask / is_causal: the retrieved memory tokens see every token')


class MemoryLayerBlock(Block):
    """MAL: a timm ``Block`` followed by a gated memory layer, ``x = x + g * Mem(LN(x))`` with ``g`` zero-init."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            memory_type: str = 'mlp',
            memory_options: Optional[Dict[str, Any]] = None,
            norm_layer: Type[nn.Module] = LayerNorm,
            drop_path: float = 0.,
            device=None,
            dtype=None,
            **block_kwargs,
    ) -> None:
        """
        Args:
            dim: Embedding dimension.
            num_heads: Attention heads of the block.
            memory_type: One of ``titans_timm.memory.MEMORY_TYPES``.
            memory_options: Keyword options for ``create_memory``.
            norm_layer: Normalisation layer (the backbone's).
            drop_path: Stochastic depth rate, also applied to the memory branch.
            **block_kwargs: Passed to timm's ``Block``.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, norm_layer=norm_layer, drop_path=drop_path, **block_kwargs, **dd)
        self.memory = create_memory(memory_type, dim, **(memory_options or {}), **dd)
        self.memory_ls = _zero_layer_scale(dim, **dd)
        self.memory_drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def reset_memory_params(self) -> None:
        """Re-initialise the memory (new random values) and zero its LayerScale (exact backbone block again)."""
        self.memory.reset_parameters()
        self.memory_ls.reset_parameters()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x_in = x
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        # the memory layer-norms its input itself (the LN of ``Mem(LN(x))``); a memory that takes a second view
        # (``uses_context``: advanced with qkv_diff_views) has keys/values from one depth earlier, the block input
        m = self.memory(x, context=x_in)
        return x + self.memory_drop_path(self.memory_ls(m))


class MemoryGateBlock(Block):
    """MAG: a memory branch beside attention, combined with the attention output through a learned gate.

    ``y = attn(LN1(x)); m = Mem(LN1(x)); x = x + ls1(y + g * sigmoid(W y + b) * m)``, then the block's MLP.
    ``g`` (LayerScale) starts at zero so the block equals timm's ``Block`` at step 0; ``W, b`` start at zero
    (gate 0.5 everywhere) so the attention output decides per channel how much memory to let in.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            memory_type: str = 'mlp',
            memory_options: Optional[Dict[str, Any]] = None,
            norm_layer: Type[nn.Module] = LayerNorm,
            device=None,
            dtype=None,
            **block_kwargs,
    ) -> None:
        """
        Args:
            dim: Embedding dimension.
            num_heads: Attention heads of the block.
            memory_type: One of ``titans_timm.memory.MEMORY_TYPES``.
            memory_options: Keyword options for ``create_memory``.
            norm_layer: Normalisation layer (the backbone's).
            **block_kwargs: Passed to timm's ``Block``.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, norm_layer=norm_layer, **block_kwargs, **dd)
        self.memory = create_memory(memory_type, dim, **(memory_options or {}), **dd)
        self.memory_gate = nn.Linear(dim, dim, **dd)
        self.memory_ls = _zero_layer_scale(dim, **dd)
        self.reset_memory_gate()

    def reset_memory_gate(self) -> None:
        """Zero the gate projection (sigmoid 0.5) and the LayerScale (exact backbone at step 0)."""
        nn.init.zeros_(self.memory_gate.weight)
        nn.init.zeros_(self.memory_gate.bias)
        self.memory_ls.reset_parameters()

    def reset_memory_params(self) -> None:
        """Re-initialise the memory (new random values) and zero the gate (exact backbone block again)."""
        self.memory.reset_parameters()
        self.reset_memory_gate()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        # the memory layer-norms the block input itself; [B, N, D]. A memory that takes a second view
        # (``uses_context``) has keys/values from the attention output
        m = self.memory(x, context=y)
        y = y + self.memory_ls(torch.sigmoid(self.memory_gate(y)) * m)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# the attention layers whose projections MAC knows (``_project_qkv``)
_MAC_ATTENTION = (Attention, AttentionRope)


def _project_qkv(attn: nn.Module, h: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Queries, keys and values of the tokens ``h`` [B, N, D] and keys and values of the context tokens ``ctx``
    [B, M, D] through ``attn``'s own projections and q/k norms, as its forward computes them: [B, H, N, hd] x 3 and
    [B, H, M, hd] x 2.

    ``attn`` is timm's ``Attention`` or ``AttentionRope``: a fused ``qkv`` projection, or separate ``q_proj`` /
    ``k_proj`` / ``v_proj`` (``qkv_fused=False``), whose keys and values may have fewer heads (grouped-query
    attention: repeated per query head as timm does).
    """
    B, N, _ = h.shape
    M = ctx.shape[1]
    H, hd = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        q, k, v = attn.qkv(h).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
        # context tokens need keys/values only: the k, v rows of the qkv projection
        w_kv = attn.qkv.weight[attn.attn_dim:]
        b_kv = attn.qkv.bias[attn.attn_dim:] if attn.qkv.bias is not None else None
        kc, vc = F.linear(ctx, w_kv, b_kv).reshape(B, M, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, M, hd]
        kv_groups = 1
    else:   # AttentionRope(qkv_fused=False)
        H_kv = attn.num_kv_heads
        q = attn.q_proj(h).reshape(B, N, H, hd).transpose(1, 2)            # [B, H, N, hd]
        k = attn.k_proj(h).reshape(B, N, H_kv, hd).transpose(1, 2)         # [B, H_kv, N, hd]
        v = attn.v_proj(h).reshape(B, N, H_kv, hd).transpose(1, 2)
        kc = attn.k_proj(ctx).reshape(B, M, H_kv, hd).transpose(1, 2)      # [B, H_kv, M, hd]
        vc = attn.v_proj(ctx).reshape(B, M, H_kv, hd).transpose(1, 2)
        kv_groups = attn.num_kv_groups
    q, k, kc = attn.q_norm(q), attn.k_norm(k), attn.k_norm(kc)
    if kv_groups > 1:
        k, v, kc, vc = (t.repeat_interleave(kv_groups, dim=1) for t in (k, v, kc, vc))   # [B, H, *, hd]
    return q, k, v, kc, vc


class _MemoryPass:
    """The MAC memory state of one call of the model's ``forward_features`` / ``forward_intermediates``.

    timm's ``VisionTransformer`` runs its blocks as ``x = blk(x)`` (``self.blocks(x)``, ``checkpoint_seq``, the
    ``forward_intermediates`` loop), so the state that recurs through depth cannot travel as an argument. The model
    opens a pass around timm's own forward (``TitansVisionTransformer._memory_pass``); each MAC block reads the state
    the earlier MAC blocks left and advances it. A pass starts from M0 and is closed when the call ends, however it
    ends, so no state outlives the call or reaches another image or call. Passes are per thread.
    """

    def __init__(self, memory: TitansMemory, record: bool = False) -> None:
        """
        Args:
            memory: The model's shared memory module.
            record: Keep the state each MAC block reads for gradient checkpointing's recompute (see
                ``MemoryContextBlock.forward``): True while the model checkpoints with gradients enabled.
        """
        self.memory = memory
        self.state: Optional[MemoryState] = None   # None: M0
        self.record = record


# the open pass of each thread (an object attribute, not a ContextVar: torch.compile traces threading.local)
_OPEN_PASS = threading.local()

# Gradient checkpointing recomputes a block in the backward pass, after the call's pass has closed, calling it again
# with the same input tensor (timm's default, non-reentrant checkpoint, hands the saved tensor back). The recompute
# must see the state the first run saw, so under checkpointing each MAC block's (memory, state) is kept here against
# its input tensor. An entry lives exactly as long as that tensor (held by the autograd graph until backward): a
# later call's blocks get new tensors and never find one.
_RECOMPUTE_STATES = WeakTensorKeyDictionary()


def _open_pass() -> Optional[_MemoryPass]:
    return getattr(_OPEN_PASS, 'current', None)


@contextlib.contextmanager
def _memory_pass_scope(memory_pass: _MemoryPass):
    # the previous pass is restored, not cleared: a pass opened inside another (one model calling another's forward)
    # leaves the outer one as it was
    outer = _open_pass()
    _OPEN_PASS.current = memory_pass
    try:
        yield memory_pass
    finally:
        _OPEN_PASS.current = outer


class MemoryContextBlock(Block):
    """MAC: persistent tokens and tokens read from a (shared, recurrent) memory join the block's attention.

    Every token attends as in timm's ``Block``; separately it attends over the ``N_p + N_l`` extra tokens only,
    and that second attention output is added per head through a zero-initialised gate:
    ``o_h = softmax(q k^T) v + g_h * softmax(q k_ctx^T) v_ctx``. With ``g = 0`` the block is exactly timm's
    ``Block`` and ``g`` gets gradient at the first step; a very negative logit offset on a joint softmax would
    instead leave the extra tokens without gradient.

    Queries, keys and values come from the block's own attention module through its own projections: timm's
    ``Attention`` and ``AttentionRope`` with a fused ``qkv`` or separate ``q_proj`` / ``k_proj`` / ``v_proj``
    (``AttentionRope(qkv_fused=False)``, grouped k/v heads included), with their q/k norms, output norm and gate.
    Other attention layers (e.g. ``DiffAttention``) are refused at construction; MAL and MAG, which call the
    attention as a whole, take any.

    The memory module is owned by the model (``TitansVisionTransformer.memory``); ``forward(x)`` takes it and the
    state left by earlier MAC blocks from the model's open ``_MemoryPass``, so timm's block loops call it like any
    ``Block``. It takes no attention mask (the retrieved tokens see every token).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_persistent_tokens: int = 4,
            num_memory_tokens: int = 4,
            norm_layer: Type[nn.Module] = LayerNorm,
            device=None,
            dtype=None,
            **block_kwargs,
    ) -> None:
        """
        Args:
            dim: Embedding dimension.
            num_heads: Attention heads of the block.
            num_persistent_tokens: ``N_p`` learned, input-independent tokens (Titans' persistent memory).
            num_memory_tokens: ``N_l`` tokens read from the long-term memory per block (at least 1).
            norm_layer: Normalisation layer (the backbone's).
            **block_kwargs: Passed to timm's ``Block``.
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, num_heads, norm_layer=norm_layer, **block_kwargs, **dd)
        if not isinstance(self.attn, _MAC_ATTENTION):
            raise ValueError(
                f'MAC attends over the memory tokens through timm Attention or AttentionRope projections; '
                f'attn_layer {type(self.attn).__name__} is not supported: use one of those, or MAL / MAG')
        self.num_persistent_tokens = num_persistent_tokens
        self.num_memory_tokens = num_memory_tokens
        self.memory_persistent = nn.Parameter(torch.empty(1, num_persistent_tokens, dim, **dd)) \
            if num_persistent_tokens else None
        # retrieved tokens enter the attention's k/v projections, which expect LayerNorm-ed inputs like the
        # block's own tokens
        self.memory_norm = norm_layer(dim, **dd)
        self.memory_gate = nn.Parameter(torch.zeros(self.attn.num_heads, **dd))
        self.reset_memory_params()

    def reset_memory_params(self) -> None:
        """Initialise persistent tokens (small normal, as timm's position embedding), the retrieved tokens' norm and
        zero the gate. (The memory itself is the model's: ``TitansVisionTransformer.memory``.)"""
        if self.memory_persistent is not None:
            trunc_normal_(self.memory_persistent, std=.02)
        if hasattr(self.memory_norm, 'reset_parameters'):
            self.memory_norm.reset_parameters()
        nn.init.zeros_(self.memory_gate)

    def _read_context(self, x: torch.Tensor, memory: TitansMemory, state: Optional[MemoryState]) -> torch.Tensor:
        B, N, D = x.shape
        # N_l queries: the tokens pooled into N_l groups in raster order (works for any token count)
        queries = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_memory_tokens).transpose(1, 2)  # [B, N_l, D]
        read = memory.read(queries, state)  # [B, N_l, D]
        ctx = self.memory_norm(read)
        if self.memory_persistent is not None:
            ctx = torch.cat([self.memory_persistent.expand(B, -1, -1), ctx], dim=1)  # [B, N_p + N_l, D]
        return ctx

    def _attention(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The block's attention over its tokens ``h`` [B, N, D] plus the gated attention over the context tokens
        ``ctx`` [B, M, D]: timm's ``Attention.forward`` (no mask) with the second term added before its output
        norm, gate and projection."""
        attn = self.attn
        B, N, _ = h.shape
        H = attn.num_heads
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        q, k, v, kc, vc = _project_qkv(attn, h, ctx)   # [B, H, N, hd] x 3, [B, H, M, hd] x 2
        drop = attn.attn_drop.p if self.training else 0.
        if attn.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B, H, N, hd]
            oc = F.scaled_dot_product_attention(q, kc, vc, dropout_p=drop)  # [B, H, N, hd]
        else:
            qs = q * attn.scale
            o = attn.attn_drop((qs @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
            oc = attn.attn_drop((qs @ kc.transpose(-2, -1)).softmax(dim=-1)) @ vc
        o = o + self.memory_gate.view(1, H, 1, 1).to(o.dtype) * oc
        o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
        o = attn.norm(o)
        if gate is not None:
            o = o * gate
        return attn.proj_drop(attn.proj(o))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            x: Tokens ``[B, N, D]``.
            attn_mask, is_causal: timm's block arguments; MAC refuses both (``ValueError``).

        Returns:
            The block output ``[B, N, D]``. The open pass's state advances to the state after writing this block's
            tokens (``mlp``, never written, leaves it unchanged).
        """
        _check_no_attn_mask(attn_mask, is_causal)
        memory_pass = _open_pass()
        if memory_pass is not None:
            memory, state = memory_pass.memory, memory_pass.state
            if memory_pass.record:
                _RECOMPUTE_STATES[x] = (memory, state)
        elif x in _RECOMPUTE_STATES:   # checkpointing's recompute in the backward pass
            memory, state = _RECOMPUTE_STATES[x]
        else:
            raise RuntimeError(
                'a MAC block reads the memory state of its model\'s forward: call the model (forward, '
                'forward_features, forward_intermediates), not the block alone; under gradient checkpointing use '
                'timm\'s default non-reentrant checkpoint (TIMM_REENTRANT_CKPT unset)')
        state = memory.write(x, state)  # the memory layer-norms its input itself
        ctx = self._read_context(x, memory, state)
        x = x + self.drop_path1(self.ls1(self._attention(self.norm1(x), ctx)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if memory_pass is not None:
            memory_pass.state = state
        return x


class TitansVisionTransformer(VisionTransformer):
    """ Vision Transformer with Titans neural memory (MAL, MAC or MAG) in selected blocks.

    All of timm's ``VisionTransformer`` arguments are accepted; memory-carrying blocks keep the backbone's
    parameter names (``blocks.{i}.norm1/attn/ls1/mlp...``) and add ``*memory*`` ones.

    ``forward_features``, ``forward_intermediates``, ``init_weights``, ``prune_intermediate_layers`` and gradient
    checkpointing are timm's own; the overrides only add the memory (its state scope, its init).

    Like any timm model it traces with ``torch.fx`` (each memory call is one leaf node, so timm's FX feature
    extraction works), builds on ``device='meta'`` (``to_empty()`` then ``init_weights()`` materialises it), keeps
    its dtype (the memory's inner loop runs in float32, its output is cast back) and runs under ``torch.compile``
    and ``torch.export``; ``torch.jit.script`` raises ``NotScriptableError`` naming those two routes.
    """

    def __init__(
            self,
            approach: str = 'mal',
            memory_type: str = 'mlp',
            memory_blocks: Optional[Sequence[int]] = None,
            memory_interval: Optional[int] = None,
            memory_options: Optional[Dict[str, Any]] = None,
            num_persistent_tokens: int = 4,
            num_memory_tokens: int = 4,
            **kwargs,
    ) -> None:
        """
        Args:
            approach: Integration: ``'mal'`` (memory as layer), ``'mac'`` (as context), ``'mag'`` (as gate).
            memory_type: One of ``titans_timm.memory.MEMORY_TYPES`` (``'mlp'``, ``'simple'``, ``'advanced'``).
            memory_blocks: Indices of memory-carrying blocks; overrides ``memory_interval``.
            memory_interval: Memory in every n-th block ending at the last (default 6: blocks 5, 11 of 12).
            memory_options: Keyword options for ``titans_timm.memory.create_memory`` (JSON-serialisable), merged
                over ``DEFAULT_MEMORY_OPTIONS`` (``chunk_size=None``: the whole image in one inner step).
            num_persistent_tokens: MAC only: ``N_p`` persistent tokens per MAC block.
            num_memory_tokens: MAC only: ``N_l`` tokens read from the memory per MAC block (>= 1).
            **kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, depth, num_classes, ...).
        """
        if approach not in APPROACHES:
            raise ValueError(f'approach must be one of {APPROACHES}, got {approach!r}')
        if memory_type not in MEMORY_TYPES:
            raise ValueError(f'memory_type must be one of {MEMORY_TYPES}, got {memory_type!r}')
        if memory_options is not None and not (
                isinstance(memory_options, dict) and all(isinstance(k, str) for k in memory_options)):
            raise ValueError(f'memory_options must be a dict of create_memory options (e.g. {{"chunk_size": 16}}), '
                             f'got {memory_options!r}')
        memory_options = {**DEFAULT_MEMORY_OPTIONS, **(memory_options or {})}
        try:
            json.dumps(memory_options)
        except TypeError as e:
            raise ValueError(f'memory_options must be JSON-serialisable (plain numbers/strings/lists): {e}') from None
        if {'device', 'dtype'} & set(memory_options):
            raise ValueError('pass device/dtype to create_model itself, not in memory_options')
        if approach == 'mac':
            # MAC writes each block's tokens, then reads the state with its own queries: no read mode, one view
            if memory_options.get('read_mode', 'after_write') != 'after_write' or memory_options.get('qkv_diff_views'):
                raise ValueError("MAC writes every MAC block's tokens and reads the state with its own queries: "
                                 "memory_options read_mode and qkv_diff_views apply to MAL and MAG only")
            if not isinstance(num_memory_tokens, int) or num_memory_tokens < 1:
                raise ValueError(f'num_memory_tokens must be an int >= 1 for MAC, got {num_memory_tokens!r}')
            if not isinstance(num_persistent_tokens, int) or num_persistent_tokens < 0:
                raise ValueError(f'num_persistent_tokens must be an int >= 0, got {num_persistent_tokens!r}')
        if kwargs.pop('block_fn', Block) is not Block:
            raise ValueError('TitansVisionTransformer builds its own blocks; block_fn cannot be overridden')
        depth = kwargs.get('depth', 12)
        blocks = resolve_memory_blocks(depth, memory_blocks, memory_interval)

        block_cls = {'mal': MemoryLayerBlock, 'mag': MemoryGateBlock, 'mac': MemoryContextBlock}[approach]
        if approach == 'mac':
            extra = dict(num_persistent_tokens=num_persistent_tokens, num_memory_tokens=num_memory_tokens)
        else:
            extra = dict(memory_type=memory_type, memory_options=memory_options)

        def block_fn(depth: int, **block_kwargs) -> nn.Module:
            # timm's VisionTransformer passes each block its index as `depth`
            if depth in blocks:
                return block_cls(depth=depth, **extra, **block_kwargs)
            return Block(depth=depth, **block_kwargs)

        super().__init__(block_fn=block_fn, **kwargs)
        self.approach = approach
        self.memory_type = memory_type
        self.memory_blocks = blocks
        self.memory_options = memory_options
        if approach == 'mac':
            # one memory for all MAC blocks: its state recurs through depth (see module docstring)
            self.memory = create_memory(
                memory_type, self.embed_dim, **memory_options, device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        else:
            self.memory = None

    @torch.jit.ignore
    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """timm's ViT init for the backbone, then the memory's own init (gates zero).

        Args:
            mode: Weight initialization mode ('jax', 'jax_nlhb', 'moco', 'reset' or '').
            needs_reset: If True (timm's default, e.g. after ``to_empty()``), call reset_parameters() on backbone
                modules that have it and re-initialise every memory parameter; construction passes False.
        """
        mode = mode or self.weight_init_mode
        if mode not in ('jax', 'jax_nlhb', 'moco', 'reset', ''):
            raise ValueError(f'unknown weight init mode {mode!r}')
        if mode == 'jax_nlhb' and self.num_classes == 0:
            mode = 'jax'    # timm biases the head by -log(num_classes); without a head there is nothing to bias
        # timm's init would draw its own weights for the memory's linear layers, and every backbone weight after
        # them would then come from a shifted random stream (a seed would no longer give the same backbone):
        # detach the memory modules while it runs (assigning None keeps each one's place in the module order)
        hidden = [(parent, name, child) for parent in self.modules() for name, child in parent.named_children()
                  if is_memory_param(name)]
        for parent, name, _ in hidden:
            setattr(parent, name, None)
        try:
            super().init_weights(mode, needs_reset)
        finally:
            for parent, name, child in reversed(hidden):
                setattr(parent, name, child)
        if needs_reset:
            # every memory parameter too (new random values from its own init, zero gates): after to_empty()
            # (e.g. a model built with device='meta') they hold no values either. At construction timm passes
            # needs_reset=False and the memory keeps the init it built with.
            for blk in self.blocks:
                if isinstance(blk, (MemoryLayerBlock, MemoryGateBlock, MemoryContextBlock)):
                    blk.reset_memory_params()
            if self.memory is not None:
                self.memory.reset_parameters()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch; the memories follow it (their fused write keeps buffers that checkpointing cannot drop,
        so under it they write with plain autograd ops, whose saved tensors are recomputed like the block's)."""
        super().set_grad_checkpointing(enable)
        for _, memory in memory_modules(self):
            memory.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Backbone's no-decay set plus MAC persistent tokens and any the memory modules declare."""
        skip = set(super().no_weight_decay())
        if self.approach == 'mac':
            skip.add('blocks.*.memory_persistent')
        for prefix, module in self._named_memory_modules():
            skip.update(f'{prefix}.{n}' for n in module.no_weight_decay())
        return skip

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's ViT groups; memory params sit in their block's group (MAC's shared memory: first MAC block)."""
        matcher = super().group_matcher(coarse)
        if self.approach == 'mac':
            matcher['blocks'] = [(r'^memory\.', (self.memory_blocks[0],))] + list(matcher['blocks'])
        return matcher

    def resolved_model_args(self) -> Dict[str, Any]:
        """The memory arguments at the values this model was built with (placement as block indices, every
        memory option resolved). Checkpoints and Hub configs store these, so a later change of a default
        (placement interval, chunk size, heads, ...) cannot change what a saved model rebuilds into."""
        args = dict(approach=self.approach, memory_type=self.memory_type, memory_blocks=list(self.memory_blocks))
        # the architecture a pretrained tag (``.fmnist5``) set: a tag-less rebuild must get it too
        args.update(getattr(self, 'tag_model_args', None) or {})
        modules = self._named_memory_modules()
        args['memory_options'] = dict(modules[0][1].options) if modules else dict(self.memory_options)
        if self.approach == 'mac':
            first = self.blocks[self.memory_blocks[0]]
            args.update(num_persistent_tokens=first.num_persistent_tokens, num_memory_tokens=first.num_memory_tokens)
        return args

    def _named_memory_modules(self) -> List[Tuple[str, TitansMemory]]:
        if self.memory is not None:
            return [('memory', self.memory)]
        return [(f'blocks.{i}.memory', self.blocks[i].memory) for i in self.memory_blocks if i < len(self.blocks)]

    def _memory_pass(self) -> contextlib.AbstractContextManager:
        """The MAC state scope of one forward call (see ``_MemoryPass``); MAL and MAG keep their state inside
        each block and need none."""
        if self.memory is None:
            return contextlib.nullcontext()
        record = self.grad_checkpointing and torch.is_grad_enabled()
        return _memory_pass_scope(_MemoryPass(self.memory, record=record))

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """timm's ``VisionTransformer.forward_features`` (same arguments), in one memory pass: ``[B, N, D]``."""
        with self._memory_pass():
            return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            *args,
            **kwargs,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``VisionTransformer.forward_intermediates`` (same arguments and outputs), in one memory pass."""
        with self._memory_pass():
            return super().forward_intermediates(x, *args, **kwargs)


def split_parameters(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """Split a model's parameters into ``backbone``, ``memory`` and ``head`` groups (for training phases).

    Every parameter lands in exactly one group: ``memory`` holds those added by the memory integration (name
    contains ``memory``), ``head`` the classifier (``pretrained_cfg['classifier']``, default ``head``), and
    ``backbone`` everything else. For a plain timm ViT the memory group is empty. A timm distillation wrapper
    (a module with a ``student``, e.g. timm's ``FeatureDistillationTrainableModule``) is split as its student,
    and its own new layers (the feature projection) count as head: they train from the first phase.

    Args:
        model: A ``TitansVisionTransformer`` or any timm model.

    Returns:
        ``dict(backbone=[(name, param), ...], memory=[...], head=[...])``.
    """
    student = getattr(model, 'student', None)
    if isinstance(student, nn.Module) and not hasattr(model, 'pretrained_cfg'):
        role_of = {id(p): role for role, params in split_parameters(student).items() for _, p in params}
        groups = {'backbone': [], 'memory': [], 'head': []}
        for name, param in model.named_parameters():
            groups[role_of.get(id(param), 'head')].append((name, param))
        return groups
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier', 'head') or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    head_prefixes = tuple(f'{c}.' for c in classifier)
    groups = {'backbone': [], 'memory': [], 'head': []}
    for name, param in model.named_parameters():
        if name.startswith(head_prefixes):
            groups['head'].append((name, param))
        elif is_memory_param(name):
            groups['memory'].append((name, param))
        else:
            groups['backbone'].append((name, param))
    return groups


def memory_modules(model: nn.Module) -> List[Tuple[int, TitansMemory]]:
    """The memory modules of a model in depth order, as ``[(block_index, module), ...]``.

    MAL/MAG: one entry per memory-carrying block. MAC: the single shared memory, under the index of the first
    MAC block (it is written and read again by every later MAC block). Plain timm models: ``[]``.
    """
    if not isinstance(model, TitansVisionTransformer):
        return []
    if model.memory is not None:
        return [(model.memory_blocks[0], model.memory)]
    return [(i, model.blocks[i].memory) for i in model.memory_blocks if i < len(model.blocks)]


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f' (+{len(keys) - limit} more)' if len(keys) > limit else '')


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: TitansVisionTransformer,
        **kwargs,
) -> Dict[str, torch.Tensor]:
    """Map a timm ViT (backbone) or titans_timm checkpoint onto a ``TitansVisionTransformer``.

    timm's ViT filter first converts foreign layouts and resamples the position embedding and patch kernel for
    other ``img_size`` / ``patch_size``. Memory parameters the checkpoint lacks are filled from the model's own
    init, so strict loading passes and only memory parameters start fresh.

    Raises:
        PretrainedCheckpointError: unexpected keys, shape mismatches or missing non-memory keys, all named.
    """
    state_dict = vit_checkpoint_filter_fn(state_dict, model, **kwargs)
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier', 'head') or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head_keys = {f'{c}.{p}' for c in classifier for p in ('weight', 'bias')}
    # timm drops the classifier after this filter when num_classes differs from the pretrained cfg's
    head_replaced = model.num_classes != cfg.get('num_classes', model.num_classes)
    first_conv = cfg.get('first_conv') or 'patch_embed.proj'
    first_conv_weight = f'{first_conv}.weight'

    unexpected, mismatched = [], []
    for k, v in state_dict.items():
        if k in head_keys and head_replaced:
            continue
        if k not in own:
            unexpected.append(k)
        elif v.shape != own[k].shape:
            ok_in_chans = (  # timm adapts the first conv's input channels after this filter
                k == first_conv_weight and v.ndim == 4 and v.shape[0] == own[k].shape[0]
                and v.shape[2:] == own[k].shape[2:])
            if not ok_in_chans:
                mismatched.append(f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}')
    missing = [k for k in own if k not in state_dict and not is_memory_param(k)
               and not (k in head_keys and head_replaced)]
    if unexpected or mismatched or missing:
        parts = []
        if unexpected:
            parts.append(f'unexpected keys: {_format_keys(unexpected)}')
        if mismatched:
            parts.append(f'mismatched shapes: {_format_keys(mismatched)}')
        if missing:
            parts.append(f'missing backbone keys: {_format_keys(missing)}')
        arch = cfg.get('architecture', type(model).__name__)
        raise PretrainedCheckpointError(
            f'checkpoint does not fit {arch} ({"; ".join(parts)}); use a checkpoint of the same backbone size '
            f'(embed_dim={model.embed_dim}, depth={len(model.blocks)}) or of this exact model')

    filled = [k for k in own if k not in state_dict and is_memory_param(k)]
    for k in filled:
        state_dict[k] = own[k]
    if filled:
        _logger.info(f'Initialised {len(filled)} memory tensors from scratch (not in the backbone checkpoint).')
    return state_dict


# Pretrained tags whose weights ship inside the package, with the architecture they were trained at. A tag's
# architecture arguments apply whether or not pretrained=True (so a checkpoint saved under the tag rebuilds
# the same model); arguments the caller passes still win.
FMNIST5_WEIGHTS = Path(__file__).resolve().parent / 'data_files' / 'vit_tiny_p4_28_fmnist5.safetensors'
FMNIST5_CLASSES = ('Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FMNIST5_MODEL_ARGS = {'img_size': 28, 'patch_size': 4, 'depth': 4}
TAG_MODEL_ARGS = {'fmnist5': FMNIST5_MODEL_ARGS}


class PretrainedWeightsUnavailable(RuntimeError):
    """``pretrained=True`` needs weights from the Hugging Face Hub, which is unreachable and holds no cached copy."""


def _requested_tag(variant: str, pretrained_cfg: Any) -> str:
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get('tag') or ''
    if pretrained_cfg is not None:
        return getattr(pretrained_cfg, 'tag', '') or ''
    default = get_pretrained_cfg(variant)  # the architecture's default tag
    return getattr(default, 'tag', '') or ''


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """Why the Hub cannot be reached (offline mode, or no connection within ``timeout`` s), or ``None``."""
    if hf_constants.HF_HUB_OFFLINE:
        return 'HF_HUB_OFFLINE is set'
    url = urlparse(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout).close()
    except OSError as e:
        return f'{url.hostname} is unreachable ({e.strerror or type(e).__name__})'
    return None


def _check_hub_weights(variant: str, cfg: PretrainedCfg, cache_dir: Optional[str] = None) -> None:
    """Fail in seconds, with the offline routes, when the weights of the resolved ``cfg`` must come from an
    unreachable Hub.

    Without this, huggingface_hub retries for about a minute and ends in an error that does not say how to
    load the weights offline."""
    load_from, hub_id = _resolve_pretrained_source(cfg.to_dict())
    if load_from != 'hf-hub':
        return
    repo_id = hub_id.split('@')[0]
    for filename in ('model.safetensors', 'open_clip_pytorch_model.bin', 'pytorch_model.bin'):
        if isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str):
            return  # cached: timm loads it without the network
    why = _hub_unreachable()
    if why is None:
        return
    raise PretrainedWeightsUnavailable(
        f"{variant}{'.' + cfg.tag if cfg.tag else ''}: pretrained=True needs {repo_id}/model.safetensors from the "
        f"Hugging Face Hub, but {why} and it is not in the cache ({cache_dir or hf_constants.HF_HUB_CACHE}). Offline, use "
        f"pretrained_cfg_overlay=dict(file='PATH/model.safetensors') with a local copy of those weights, "
        f"'local-dir:DIR' for a folder with config.json + model.safetensors, a cache filled elsewhere with "
        f"HF_HUB_OFFLINE=1, or the weights that ship with titans-timm: "
        f"timm.create_model('vit_tiny_{variant.split('_', 2)[-1]}.fmnist5', pretrained=True)")


def _create_titans_vit(
        variant: str,
        pretrained: bool = False,
        model_args: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> TitansVisionTransformer:
    """Build ``variant`` from its ``model_args``, the pretrained tag's architecture and the caller's ``kwargs``."""
    out_indices = kwargs.pop('out_indices', 3)
    tag_args = TAG_MODEL_ARGS.get(_requested_tag(variant, kwargs.get('pretrained_cfg')), {})
    kwargs = {**(model_args or {}), **tag_args, **kwargs}
    if pretrained:
        # resolved once: timm takes a resolved cfg as it is instead of resolving the tag and overlay again
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
                                     pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None))
        _check_hub_weights(variant, cfg, kwargs.get('cache_dir'))
        kwargs['pretrained_cfg'] = cfg.to_dict()
    model = build_model_with_cfg(
        TitansVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
    # recorded by resolved_model_args, so checkpoints saved under the tag rebuild the same architecture
    model.tag_model_args = {k: kwargs[k] for k in tag_args}
    return model


def _cfg(hf_hub_id: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'hf_hub_id': hf_hub_id,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# the pretrained tags load the backbone's timm hub checkpoint; memory parameters start from their own init
_BACKBONE_WEIGHTS = {
    'tiny': ('augreg_in21k_ft_in1k', 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'small': ('augreg_in21k_ft_in1k', 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'base': ('augreg2_in21k_ft_in1k', 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'),
}

# ``fmnist5``: the ViT-Tiny backbone that ships in the package (28 px, 4 px patches, 4 blocks), pretrained by
# tools/pretrain_backbone.py on five Fashion-MNIST classes; the built-in ``fashion-mnist-transfer`` set holds the
# other five. Offline, no download. Its head classifies the five pretraining classes.
_FMNIST5_CFG = dict(
    file=str(FMNIST5_WEIGHTS),
    num_classes=len(FMNIST5_CLASSES),
    label_names=FMNIST5_CLASSES,
    input_size=(3, 28, 28),
    crop_pct=1.0,
    interpolation='bilinear',
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    license='mit',
    description=('ViT-Tiny (28 px, 4x4 patches, 4 blocks) trained from scratch by tools/pretrain_backbone.py on the '
                 'Fashion-MNIST classes Sandal, Shirt, Sneaker, Bag, Ankle boot (30,000 training images, Debian '
                 'package dataset-fashion-mnist); memory parameters start from their own init'),
    origin_url='https://github.com/zalandoresearch/fashion-mnist',
)

default_cfgs = generate_default_cfgs({
    **{f'vit_{size}_{approach}_{memory}.{tag}': _cfg(hf_hub_id=hub_id)
       for size, (tag, hub_id) in _BACKBONE_WEIGHTS.items()
       for approach in APPROACHES
       for memory in MEMORY_TYPES},
    **{f'vit_tiny_{approach}_{memory}.fmnist5': _cfg(**_FMNIST5_CFG)
       for approach in APPROACHES
       for memory in MEMORY_TYPES},
})


@register_model
def vit_tiny_mal_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAL: gated memory layer after the block, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mal', memory_type='mlp')
    return _create_titans_vit('vit_tiny_mal_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mal_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAL: gated memory layer after the block, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mal', memory_type='simple')
    return _create_titans_vit('vit_tiny_mal_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mal_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAL: gated memory layer after the block, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mal', memory_type='advanced')
    return _create_titans_vit('vit_tiny_mal_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mac_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAC: persistent + memory tokens as attention context, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mac', memory_type='mlp')
    return _create_titans_vit('vit_tiny_mac_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mac_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAC: persistent + memory tokens as attention context, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mac', memory_type='simple')
    return _create_titans_vit('vit_tiny_mac_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mac_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAC: persistent + memory tokens as attention context, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mac', memory_type='advanced')
    return _create_titans_vit('vit_tiny_mac_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mag_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAG: gated memory branch beside attention, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mag', memory_type='mlp')
    return _create_titans_vit('vit_tiny_mag_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mag_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAG: gated memory branch beside attention, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mag', memory_type='simple')
    return _create_titans_vit('vit_tiny_mag_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_tiny_mag_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-Ti/16, MAG: gated memory branch beside attention, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, approach='mag', memory_type='advanced')
    return _create_titans_vit('vit_tiny_mag_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mal_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAL: gated memory layer after the block, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mal', memory_type='mlp')
    return _create_titans_vit('vit_small_mal_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mal_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAL: gated memory layer after the block, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mal', memory_type='simple')
    return _create_titans_vit('vit_small_mal_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mal_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAL: gated memory layer after the block, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mal', memory_type='advanced')
    return _create_titans_vit('vit_small_mal_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mac_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAC: persistent + memory tokens as attention context, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mac', memory_type='mlp')
    return _create_titans_vit('vit_small_mac_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mac_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAC: persistent + memory tokens as attention context, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mac', memory_type='simple')
    return _create_titans_vit('vit_small_mac_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mac_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAC: persistent + memory tokens as attention context, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mac', memory_type='advanced')
    return _create_titans_vit('vit_small_mac_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mag_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAG: gated memory branch beside attention, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mag', memory_type='mlp')
    return _create_titans_vit('vit_small_mag_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mag_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAG: gated memory branch beside attention, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mag', memory_type='simple')
    return _create_titans_vit('vit_small_mag_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_small_mag_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-S/16, MAG: gated memory branch beside attention, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, approach='mag', memory_type='advanced')
    return _create_titans_vit('vit_small_mag_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mal_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAL: gated memory layer after the block, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mal', memory_type='mlp')
    return _create_titans_vit('vit_base_mal_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mal_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAL: gated memory layer after the block, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mal', memory_type='simple')
    return _create_titans_vit('vit_base_mal_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mal_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAL: gated memory layer after the block, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mal', memory_type='advanced')
    return _create_titans_vit('vit_base_mal_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mac_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAC: persistent + memory tokens as attention context, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mac', memory_type='mlp')
    return _create_titans_vit('vit_base_mac_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mac_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAC: persistent + memory tokens as attention context, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mac', memory_type='simple')
    return _create_titans_vit('vit_base_mac_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mac_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAC: persistent + memory tokens as attention context, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mac', memory_type='advanced')
    return _create_titans_vit('vit_base_mac_advanced', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mag_mlp(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAG: gated memory branch beside attention, persistent MLP memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mag', memory_type='mlp')
    return _create_titans_vit('vit_base_mag_mlp', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mag_simple(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAG: gated memory branch beside attention, simple Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mag', memory_type='simple')
    return _create_titans_vit('vit_base_mag_simple', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def vit_base_mag_advanced(pretrained: bool = False, **kwargs) -> TitansVisionTransformer:
    """ ViT-B/16, MAG: gated memory branch beside attention, advanced Titans memory.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, approach='mag', memory_type='advanced')
    return _create_titans_vit('vit_base_mag_advanced', pretrained=pretrained, model_args=model_args, **kwargs)
