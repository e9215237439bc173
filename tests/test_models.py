"""The 27 registered memory-augmented ViTs: registration, pretrained loading, function preservation, timm model API.

Models run small (img_size 32, patch 8, depth 2) so the whole file stays fast on 2 CPU cores; the backbone
checkpoints are random timm ViTs of the matching width saved with safetensors in the test.
"""
import json

import pytest
import torch
import timm
from safetensors.torch import load_file, save_file
from timm.layers import AttentionRope
from timm.models import group_parameters
from timm.optim import create_optimizer_v2

import titans_timm
from titans_timm.vit import (
    APPROACHES, PretrainedCheckpointError, TitansVisionTransformer, memory_modules, resolve_memory_blocks,
    split_parameters)

SIZES = ('tiny', 'small', 'base')
MEMORY = ('mlp', 'simple', 'advanced')
ALL_NAMES = [f'vit_{s}_{a}_{m}' for s in SIZES for a in APPROACHES for m in MEMORY]
TINY_NAMES = [n for n in ALL_NAMES if n.startswith('vit_tiny_')]
SMALL_KW = dict(img_size=32, patch_size=8, depth=2)


def _size(name):
    return name.split('_')[1]


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope='module')
def backbone_ckpts(tmp_path_factory):
    """A random plain timm ViT per size (img 32, patch 8, depth 2, 1000 classes) and its safetensors file."""
    root = tmp_path_factory.mktemp('backbones')
    out = {}
    torch.manual_seed(0)
    for size in SIZES:
        bb = timm.create_model(f'vit_{size}_patch16_224', **SMALL_KW).eval()
        out[size] = (bb, _save(bb, root / f'{size}.safetensors'))
    return out


def _from_backbone(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **{**SMALL_KW, **kwargs})


def _open_gates(model, seed=0):
    """Make every zero-initialised gate non-zero, as after training, so the memory changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'memory_ls' in name or 'memory_gate' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _images(n=3, size=32, seed=1, chans=3):
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_27_models_with_backbone_pretrained_cfgs():
    assert sorted(timm.list_models('vit_*_ma[lcg]_*')) == sorted(ALL_NAMES)
    assert len(timm.list_models('vit_*_mag_*')) == 9
    hub = {'tiny': 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k',
           'small': 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k',
           'base': 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'}
    for name in ALL_NAMES:
        tags = timm.list_pretrained(f'{name}.*')
        # the Hub backbone is the default tag; tiny models also carry the shipped backbone (test_pretrained_tag.py)
        assert len(tags) == (2 if _size(name) == 'tiny' else 1), tags
        assert timm.get_pretrained_cfg(name).tag == tags[0].split('.', 1)[1]
        assert tags[1:] == ([f'{name}.fmnist5'] if _size(name) == 'tiny' else [])
        cfg = timm.get_pretrained_cfg(tags[0]).to_dict()
        assert cfg['hf_hub_id'] == hub[_size(name)]
        assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
        assert cfg['input_size'] == (3, 224, 224) and cfg['num_classes'] == 1000
        assert not cfg.get('custom_load')


def test_default_build_is_224_patch16_with_memory_in_last_block():
    model = timm.create_model('vit_tiny_mag_mlp')
    assert isinstance(model, TitansVisionTransformer)
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.img_size == (224, 224)
    assert model.memory_blocks[-1] == len(model.blocks) - 1
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_step0_equals_backbone_then_per_image(name, backbone_ckpts):
    """Loaded from its backbone checkpoint, a model gives the backbone's logits at step 0 (only memory keys are
    absent from that checkpoint). With the gates opened, memory state is per image: a batch equals each image
    alone, repeated calls agree, in train (dropout 0) and eval mode and under inference_mode."""
    backbone, path = backbone_ckpts[_size(name)]
    model = _from_backbone(name, path).eval()
    x = _images(2)
    gates = [(n, p) for n, p in model.named_parameters() if 'memory_ls' in n or n.endswith('memory_gate')]
    assert gates and all(torch.count_nonzero(p) == 0 for _, p in gates), 'memory gates must start at exactly 0'
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))   # exactly the backbone, not merely close
    missing = set(model.state_dict()) - set(load_file(path))
    assert missing and all('memory' in k for k in missing)
    assert set(load_file(path)) <= set(model.state_dict())
    # every parameter in exactly one of backbone / memory / head
    groups = split_parameters(model)
    assert sorted(n for g in groups.values() for n, _ in g) == sorted(n for n, _ in model.named_parameters())
    assert {n for n, _ in groups['memory']} == {n for n, _ in model.named_parameters() if 'memory' in n}
    assert {n for n, _ in groups['head']} == {'head.weight', 'head.bias'}
    assert memory_modules(model)

    _open_gates(model)
    with torch.no_grad():
        assert (model(x) - backbone(x)).abs().max() > 1e-3  # the memory now matters
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            batch = model(x)
            assert torch.equal(batch, model(x))
            alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', TINY_NAMES)
def test_every_parameter_trains_within_two_steps(name):
    """Zero gates first, then memory: after two SGD steps every parameter has received gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SMALL_KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    touched = set()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        touched |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    assert touched == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize('approach', APPROACHES)
def test_overrides_with_pretrained_backbone(approach, backbone_ckpts):
    """img_size / patch_size / in_chans / num_classes overrides: timm's filter resamples, only memory + head fresh."""
    _, path = backbone_ckpts['tiny']
    model = _from_backbone(f'vit_tiny_{approach}_simple', path, img_size=64, patch_size=16, in_chans=1,
                           num_classes=5)
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    assert model.pos_embed.shape == (1, 17, 192)
    out = model(_images(2, 64, chans=1))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


class SeparateQKVAttention(AttentionRope):
    """timm's attention with separate q/k/v projections and no fused ``qkv`` (``AttentionRope(qkv_fused=False)``,
    the layout of timm's EVA-family models). A class: timm's ``attn_layer`` takes a class or a registered name."""

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads=num_heads, qkv_fused=False, **kwargs)


class GroupedKVAttention(AttentionRope):
    """Separate projections with one key/value head shared by all query heads (grouped-query attention)."""

    def __init__(self, dim, num_heads=8, **kwargs):
        super().__init__(dim, num_heads=num_heads, qkv_fused=False, num_kv_heads=1, **kwargs)


@pytest.mark.parametrize('memory', MEMORY)
@pytest.mark.parametrize('attn_layer', [SeparateQKVAttention, GroupedKVAttention])
def test_mac_with_separate_qkv_attention_starts_as_its_backbone(attn_layer, memory, tmp_path):
    """MAC takes keys/values for the memory tokens from the block attention's own projections, fused or not: on a
    backbone whose attention has no ``qkv`` (timm's separate q/k/v, also with grouped k/v heads) the model loads
    the backbone's checkpoint, gives its logits bit for bit at step 0, and with the gates opened the memory tokens
    change the output and every parameter gets gradient."""
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_224', attn_layer=attn_layer, **SMALL_KW).eval()
    assert backbone.blocks[0].attn.qkv is None
    path = _save(backbone, tmp_path / 'separate_qkv.safetensors')
    model = _from_backbone(f'vit_tiny_mac_{memory}', path, attn_layer=attn_layer).eval()
    assert isinstance(model.blocks[model.memory_blocks[0]].attn, attn_layer)
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))

    _open_gates(model)
    with torch.no_grad():
        assert (model(x) - backbone(x)).abs().max() > 1e-3
    model.train()
    model(x).square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or (('memory' in n) and p.grad.abs().sum() == 0)]
    assert not dead, dead


def test_mac_separate_qkv_computes_what_fused_qkv_computes():
    """The same weights as one fused ``qkv`` or as separate q/k/v projections give the same MAC model (gates open,
    so the memory tokens' keys and values matter)."""
    torch.manual_seed(0)
    fused = _open_gates(timm.create_model('vit_tiny_mac_advanced', memory_blocks=[0, 1], **SMALL_KW)).eval()
    separate = timm.create_model('vit_tiny_mac_advanced', memory_blocks=[0, 1], attn_layer=SeparateQKVAttention,
                                 **SMALL_KW).eval()
    state = {}
    for name, tensor in fused.state_dict().items():
        if '.attn.qkv.' in name:
            for part, t in zip(('q_proj', 'k_proj', 'v_proj'), tensor.chunk(3)):
                state[name.replace('qkv', part)] = t
        else:
            state[name] = tensor
    separate.load_state_dict(state)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(separate(x), fused(x), rtol=1e-5, atol=1e-5)


def test_mac_refuses_an_attention_it_cannot_project_while_mal_and_mag_take_it():
    """timm's differential attention has no plain q/k/v heads to attend over memory tokens with: MAC says so at
    construction; MAL and MAG call the attention as a whole and start as that backbone."""
    with pytest.raises(ValueError, match='attn_layer DiffAttention is not supported'):
        timm.create_model('vit_tiny_mac_simple', attn_layer='diff', **SMALL_KW)
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_224', attn_layer='diff', **SMALL_KW).eval()
    x = _images(2)
    for approach in ('mal', 'mag'):
        model = timm.create_model(f'vit_tiny_{approach}_simple', attn_layer='diff', **SMALL_KW).eval()
        model.load_state_dict(backbone.state_dict(), strict=False)
        with torch.no_grad():
            assert torch.equal(model(x), backbone(x))


@pytest.mark.parametrize('img_size', [24, 40, 64])
def test_mac_any_token_count(img_size):
    """MAC pools N_l queries from any number of tokens, also fewer tokens than N_l."""
    model = timm.create_model('vit_tiny_mac_simple', img_size=img_size, patch_size=8, depth=2, num_classes=3,
                              num_memory_tokens=16, num_persistent_tokens=2)
    out = _open_gates(model)(_images(2, img_size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize('img_size', [32, 384])
def test_pretrained_224_backbone_at_other_img_size(img_size, tmp_path):
    """A 224 px / patch 16 backbone checkpoint loads into a 32 or 384 px model (pos-embed resampled)."""
    bb = timm.create_model('vit_tiny_patch16_224', depth=2, num_classes=10).eval()
    path = _save(bb, tmp_path / 'bb224.safetensors')
    model = timm.create_model('vit_tiny_mac_advanced', pretrained=True, depth=2, img_size=img_size, num_classes=10,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10))
    assert torch.equal(model.head.weight, bb.head.weight)
    grid = img_size // 16
    assert model.pos_embed.shape == (1, grid * grid + 1, 192)
    out = _open_gates(model)(_images(1, img_size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_incompatible_checkpoint_names_keys(backbone_ckpts, tmp_path):
    _, small_path = backbone_ckpts['small']
    with pytest.raises(PretrainedCheckpointError) as err:
        _from_backbone('vit_tiny_mag_simple', small_path)
    msg = str(err.value)
    assert '\n' not in msg and 'mismatched shapes' in msg and 'blocks.0.attn.qkv.weight' in msg

    sd = load_file(backbone_ckpts['tiny'][1])
    sd['blocks.0.attn.extra'] = torch.zeros(3)
    del sd['blocks.1.mlp.fc1.weight']
    path = tmp_path / 'odd.safetensors'
    save_file(sd, str(path))
    with pytest.raises(PretrainedCheckpointError, match=r'unexpected keys: blocks\.0\.attn\.extra.*'
                                                        r'missing backbone keys: blocks\.1\.mlp\.fc1\.weight'):
        _from_backbone('vit_tiny_mal_mlp', str(path))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match='approach must be one of'):
        TitansVisionTransformer(approach='mad', **SMALL_KW)
    with pytest.raises(ValueError, match='memory_type must be one of'):
        TitansVisionTransformer(memory_type='huge', **SMALL_KW)
    with pytest.raises(ValueError, match='memory_blocks'):
        timm.create_model('vit_tiny_mal_mlp', memory_blocks=[5], **SMALL_KW)
    with pytest.raises(ValueError, match='num_memory_tokens'):
        timm.create_model('vit_tiny_mac_mlp', num_memory_tokens=0, **SMALL_KW)
    with pytest.raises(ValueError, match='JSON'):
        timm.create_model('vit_tiny_mal_mlp', memory_options={'chunk_size': object()}, **SMALL_KW)
    with pytest.raises(ValueError, match='memory_blocks must be a list'):
        timm.create_model('vit_tiny_mal_mlp', memory_blocks=[True], **SMALL_KW)
    with pytest.raises(ValueError, match='memory_interval'):
        timm.create_model('vit_tiny_mal_mlp', memory_interval=True, **SMALL_KW)
    with pytest.raises(ValueError, match='memory option max_lr'):
        timm.create_model('vit_tiny_mag_simple', memory_options={'max_lr': -1.0}, **SMALL_KW)
    for options in ({'read_mode': 'causal', 'chunk_size': 16}, {'qkv_diff_views': True}):
        with pytest.raises(ValueError, match='MAL and MAG only'):
            timm.create_model('vit_tiny_mac_advanced', memory_options=options, **SMALL_KW)
    with pytest.raises(ValueError, match='block_fn cannot be overridden'):
        timm.create_model('vit_tiny_mal_mlp', block_fn=torch.nn.Identity, **SMALL_KW)
    from timm.models.vision_transformer import Block
    timm.create_model('vit_tiny_mal_mlp', block_fn=Block, **SMALL_KW)   # timm's own default: accepted


def test_memory_placement():
    assert resolve_memory_blocks(12, None, 4) == [3, 7, 11]
    assert resolve_memory_blocks(12, None, 6) == [5, 11]
    assert resolve_memory_blocks(2, None, 4) == [1]
    assert resolve_memory_blocks(12, [-1, 0, 0], None) == [0, 11]
    model = timm.create_model('vit_tiny_mag_mlp', memory_blocks=[0, 2], img_size=32, patch_size=8, depth=4)
    assert [i for i, _ in memory_modules(model)] == [0, 2]
    assert [i for i, b in enumerate(model.blocks) if hasattr(b, 'memory')] == [0, 2]


@pytest.mark.parametrize('name', ['vit_tiny_mal_advanced', 'vit_tiny_mac_simple', 'vit_tiny_mag_advanced'])
def test_model_args_json_and_state_dict_round_trip(name, tmp_path):
    kwargs = dict(SMALL_KW, num_classes=7, memory_blocks=[0, 1],
                  memory_options={'chunk_size': 4, 'heads': 2, 'depth': 2})
    model = _open_gates(timm.create_model(name, **kwargs)).eval()
    args = json.loads(json.dumps(model._model_args))
    assert args['memory_options'] == kwargs['memory_options']
    path = _save(model, tmp_path / 'm.safetensors')
    clone = timm.create_model(name, **args).eval()
    clone.load_state_dict(load_file(path), strict=True)
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
    json.dumps(model.pretrained_cfg)


def _graph_has(out, node_name):
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == node_name:
            return True
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return False


@pytest.mark.parametrize('name', ['vit_tiny_mal_advanced', 'vit_tiny_mac_advanced', 'vit_tiny_mac_mlp',
                                  'vit_tiny_mag_simple'])
def test_grad_checkpointing_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = _open_gates(timm.create_model(name, num_classes=4, **SMALL_KW))
    x = _images(2)

    def run(enable):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        fused.append(_graph_has(out, '_DualWriteBackward'))
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = []
    out0, grads0 = run(False)
    out1, grads1 = run(True)
    assert model.grad_checkpointing
    # the fused write's buffers live outside checkpointing's reach: under it no such node may hold them
    assert fused == [name.split('_')[2] != 'mac', False]
    torch.testing.assert_close(out1, out0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('approach', APPROACHES)
def test_timm_model_api(approach):
    model = _open_gates(timm.create_model(f'vit_tiny_{approach}_simple', num_classes=6, **SMALL_KW)).eval()
    x = _images(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 192)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape for t in inter] == [(2, 192, 4, 4)] * 2
        only = model.forward_intermediates(x, indices=[0], output_fmt='NLC', intermediates_only=True)
        assert only[0].shape == (2, 16, 192)
        feature_model = timm.create_model(f'vit_tiny_{approach}_mlp', features_only=True, out_indices=(1,),
                                          **SMALL_KW)
        assert feature_model(x)[0].shape == (2, 192, 4, 4)
    assert model.get_classifier() is model.head
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)


@pytest.mark.parametrize('approach', APPROACHES)
def test_intermediates_are_the_blocks_outputs_and_prune_keeps_them(approach):
    """timm's forward_intermediates returns what each block hands the next (the MAC memory recurring through depth
    as in forward), and timm's prune_intermediate_layers leaves a model whose intermediates are unchanged."""
    model = _open_gates(timm.create_model(f'vit_tiny_{approach}_simple', img_size=32, patch_size=8, depth=4,
                                          memory_blocks=[1, 3], num_classes=3)).eval()
    x = _images(2)
    outputs = []
    handles = [blk.register_forward_hook(lambda m, args, out: outputs.append(out)) for blk in model.blocks]
    with torch.no_grad():
        feats = model.forward_features(x)
        for h in handles:
            h.remove()
        final, inter = model.forward_intermediates(x, output_fmt='NLC', return_prefix_tokens=True)
        assert torch.equal(final, feats)
        for (spatial, prefix), out in zip(inter, outputs, strict=True):
            assert torch.equal(torch.cat([prefix, spatial], dim=1), out)
        assert model.prune_intermediate_layers(indices=[1, 2]) == [1, 2]
        assert len(model.blocks) == 3
        pruned = model.forward_intermediates(x, indices=[1, 2], output_fmt='NLC', intermediates_only=True)
    assert all(torch.equal(a, b[:, model.num_prefix_tokens:]) for a, b in zip(pruned, outputs[1:3], strict=True))


def test_mac_memory_state_never_outlives_a_call():
    """The MAC state lives in a pass the model opens per call: closed even when the call fails half-way (the next
    call starts from M0 again), one per thread, and a MAC block cannot run outside its model's forward."""
    from titans_timm import vit
    model = _open_gates(timm.create_model('vit_tiny_mac_simple', img_size=32, patch_size=8, depth=3,
                                          memory_blocks=[0, 2], num_classes=3)).eval()
    x = _images(2)
    with torch.no_grad():
        ref = model(x)
        with pytest.raises(ValueError, match='attn_mask'):   # refused by block 2, after block 0 wrote the state
            model.forward_features(x, is_causal=True)
        assert vit._open_pass() is None
        assert torch.equal(model(x), ref)
        with pytest.raises(RuntimeError, match='call the model'):
            model.blocks[0](model.patch_embed(x))

    import threading
    results = []

    def work():
        with torch.no_grad():
            results.extend(model(x) for _ in range(3))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(torch.equal(r, ref) for r in results)


def test_mac_grad_checkpointing_intermediates_recompute_the_same_state():
    """Under timm's checkpointing the backward pass recomputes each MAC block after the call has returned: it sees
    the state the forward saw (same gradients as without checkpointing), and what it kept is gone with the graph."""
    import gc
    from titans_timm import vit
    torch.manual_seed(0)
    model = _open_gates(timm.create_model('vit_tiny_mac_advanced', img_size=32, patch_size=8, depth=3,
                                          memory_blocks=[0, 2], num_classes=3))
    x = _images(2)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        final, inter = model.forward_intermediates(x, indices=[0, 2])
        (final.square().sum() + sum(t.square().sum() for t in inter)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        del final, inter
    assert grads[1].keys() == grads[0].keys() and any('memory' in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    gc.collect()
    assert len(vit._RECOMPUTE_STATES) == 0


@pytest.mark.parametrize('approach', APPROACHES)
def test_group_matcher_puts_memory_with_its_block(approach):
    model = timm.create_model(f'vit_tiny_{approach}_simple', img_size=32, patch_size=8, depth=4,
                              memory_blocks=[1, 3])
    layer_of = group_parameters(model, model.group_matcher(), reverse=True)
    assert set(layer_of) == {n for n, _ in model.named_parameters()}
    for name in layer_of:
        if 'memory' not in name:
            continue
        block = int(name.split('.')[1]) if name.startswith('blocks.') else model.memory_blocks[0]
        assert layer_of[name] == layer_of[f'blocks.{block}.norm1.weight'], name
    # layer-wise lr decay builds groups without complaint
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def test_no_weight_decay_covers_persistent_tokens():
    model = timm.create_model('vit_tiny_mac_simple', **SMALL_KW)
    nwd = model.no_weight_decay()
    assert {'pos_embed', 'cls_token', 'blocks.*.memory_persistent'} <= nwd
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(model.blocks[1].memory_persistent) not in decayed


def test_split_parameters_of_a_timm_distillation_wrapper():
    """timm's train.py --kd-distill-type feature hands the optimizer a wrapper (student.*, projection.*): its
    student's head and memory keep their roles, and the new projection trains from phase 1 like the head."""
    from timm.task.distillation import FeatureDistillationTrainableModule
    student = timm.create_model('vit_tiny_mag_mlp', **SMALL_KW)
    wrapper = FeatureDistillationTrainableModule(student, torch.nn.Linear(192, 384))
    groups = split_parameters(wrapper)
    names = {role: {n for n, _ in params} for role, params in groups.items()}
    assert names['head'] == {'student.head.weight', 'student.head.bias', 'projection.weight', 'projection.bias'}
    assert names['memory'] == {'student.' + n for n, _ in split_parameters(student)['memory']} != set()
    assert sum(map(len, groups.values())) == len(list(wrapper.parameters()))


def test_split_parameters_plain_timm_vit():
    vit = timm.create_model('vit_tiny_patch16_224', **SMALL_KW)
    groups = split_parameters(vit)
    assert groups['memory'] == []
    assert len(groups['backbone']) + len(groups['head']) == len(list(vit.parameters()))
    assert memory_modules(vit) == []
    assert titans_timm.split_parameters is split_parameters


@pytest.mark.parametrize('name', ['vit_tiny_mac_advanced', 'vit_tiny_mal_simple', 'vit_tiny_mag_advanced'])
def test_torch_compile_same_outputs_and_grads(name):
    """Dynamo (full graph, no graph break) + AOT autograd gives eager's outputs and gradients: the MAC state
    recurrence, and MAL/MAG's write, which compiles as plain autograd ops (the fused node is eager-only)."""
    model = _open_gates(timm.create_model(name, num_classes=4, **SMALL_KW))
    x = _images(2)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x))


def test_pretrained_true_resolves_backbone_from_offline_hub_cache(tmp_path, monkeypatch):
    """``pretrained=True`` goes through timm's real Hub path: the backbone repo from a pre-populated HF cache."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_224', depth=1).eval()
    sha = '0123456789abcdef0123456789abcdef01234567'
    repo = tmp_path / 'models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(sha)
    (repo / 'snapshots' / sha).mkdir(parents=True)
    _save(backbone, repo / 'snapshots' / sha / 'model.safetensors')
    model = timm.create_model('vit_tiny_mag_mlp', pretrained=True, depth=1, cache_dir=str(tmp_path)).eval()
    x = _images(1, 224)
    with torch.no_grad():
        assert (model(x) - backbone(x)).abs().max() <= 1e-4
