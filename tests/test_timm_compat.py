"""The 27 models where timm's tooling reaches into a model: torch.fx tracing and timm's FX feature extraction, the
meta device and materialisation, dtype, TorchScript (refused with one clear error) and memory options that fail
clearly instead of building for minutes.

Models run small (img_size 32, patch 8, depth 2) so the file stays fast on 2 CPU cores.
"""
import math

import pytest
import timm
import torch
from timm.models import create_feature_extractor

import titans_timm
from titans_timm import memory as titans_memory
from titans_timm.vit import APPROACHES, memory_modules

# 'vit_*_ma*_*' also matches timm's own vit_so150m_patch16_reg4_map_256: keep the titans approaches
NAMES = [n for n in timm.list_models('vit_*_ma*_*') if n.split('_')[2] in APPROACHES]
SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
DIMS = {'tiny': 192, 'small': 384, 'base': 768}


def _model(name, **kwargs):
    """A small model whose zero-initialised gates are opened (as after training), so the memory shapes the output;
    chunks of 4 tokens, so the write loops over several chunks."""
    torch.manual_seed(0)
    model = timm.create_model(name, **{**SMALL, 'memory_options': {'chunk_size': 4}, **kwargs})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'memory_ls' in n or 'memory_gate' in n:
                p.normal_(0., 0.5)
    return model.eval()


def _images(n=2, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_names_are_the_27_models():
    assert len(NAMES) == 27


@pytest.mark.parametrize('name', NAMES)
def test_fx_trace_equals_eager_and_fx_features(name, one_thread):
    model, x = _model(name), _images()
    graph = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph(x), model(x))
    # every memory call is one leaf node (the eager code, fused write included, runs inside it)
    leaves = {titans_memory.memory_forward, titans_memory.memory_write, titans_memory.memory_read}
    assert any(n.op == 'call_function' and n.target in leaves for n in graph.graph.nodes)

    # timm's FX feature extraction: return nodes by module name, and features_only with feature_cls='fx'
    extractor = create_feature_extractor(model, return_nodes={'blocks.0': 'b0', 'blocks.1': 'b1'})
    feats = extractor(x)
    ref = model.forward_intermediates(x, indices=[0, 1], output_fmt='NLC', intermediates_only=True)
    for key, want in zip(('b0', 'b1'), ref):
        torch.testing.assert_close(feats[key][:, model.num_prefix_tokens:], want)
    net = timm.create_model(name, features_only=True, feature_cls='fx', out_indices=(0, 1), **SMALL)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 17, DIMS[name.split('_')[1]])] * 2
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('name', ['vit_tiny_mal_advanced', 'vit_tiny_mac_simple', 'vit_tiny_mag_simple'])
def test_stats_hooks_run_inside_a_traced_graph(name, one_thread):
    """The memory calls are FX leaves that run the eager code: a traced graph reports every write's surprise to
    the memory's stats hooks as the eager model does."""
    model, x = _model(name, memory_blocks=[0, 1]), _images()
    graph = torch.fx.symbolic_trace(model)
    seen = {'eager': [], 'fx': []}
    for key, run in (('eager', model), ('fx', graph)):
        handles = [m.register_stats_hook(lambda m, stats, key=key: seen[key].append(stats['surprise']))
                   for _, m in memory_modules(model)]
        with torch.no_grad():
            run(x)
        for h in handles:
            h.remove()
    assert len(seen['fx']) == len(seen['eager']) == 2   # two memory blocks (MAL/MAG) or two MAC writes
    for a, b in zip(seen['fx'], seen['eager']):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', NAMES)
def test_meta_device_build_forward_and_materialise(name, one_thread):
    model = timm.create_model(name, device='meta', **SMALL)
    assert all(p.is_meta for p in model.parameters())
    out = model(torch.empty(2, 3, 32, 32, device='meta'))
    assert out.is_meta and tuple(out.shape) == (2, 5)

    model.to_empty(device='cpu')
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)   # whatever to_empty left behind: init_weights must set every value
    model.init_weights()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, bad
    gates = [p for n, p in model.named_parameters() if 'memory_ls' in n or 'memory_gate' in n]
    assert gates and all((g == 0).all() for g in gates)
    # zero gates: the materialised model is its backbone again (function-preserving, as at construction)
    model.eval()
    backbone = timm.create_model(f'vit_{name.split("_")[1]}_patch16_224', **SMALL).eval()
    backbone.load_state_dict({k: v for k, v in model.state_dict().items() if 'memory' not in k})
    x = _images()
    torch.testing.assert_close(model(x), backbone(x))


@pytest.mark.parametrize('approach', APPROACHES)
def test_init_weights_is_timms_init_for_the_backbone(approach, one_thread):
    """init_weights runs timm's ViT init for every weight init mode with the memory out of its reach: from the same
    seed the backbone gets exactly the weights timm gives a plain ViT, and every memory gate is zero again."""
    kwargs = dict(SMALL, depth=3)
    model = timm.create_model(f'vit_tiny_{approach}_advanced', memory_blocks=[0, 2], **kwargs)
    vit = timm.create_model('vit_tiny_patch16_224', **kwargs)
    for mode in ('', 'jax', 'jax_nlhb', 'moco', 'reset'):
        for m in (model, vit):
            torch.manual_seed(0)
            m.init_weights(mode)
        ours = {k: v for k, v in model.state_dict().items() if 'memory' not in k}
        assert ours.keys() == vit.state_dict().keys()
        assert all(torch.equal(v, vit.state_dict()[k]) for k, v in ours.items()), mode
        assert all((p == 0).all() for n, p in model.named_parameters() if 'memory_ls' in n or 'memory_gate' in n)
    with pytest.raises(ValueError, match='unknown weight init mode'):
        model.init_weights('xavier')
    headless = timm.create_model(f'vit_tiny_{approach}_mlp', **{**kwargs, 'num_classes': 0})
    headless.init_weights('jax_nlhb')   # timm's -log(num_classes) head bias has no head to go to


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_model_returns_bfloat16(name, one_thread):
    """The memory's inner loop runs in float32; what it hands back is in the model's dtype."""
    model, x = _model(name).to(torch.bfloat16), _images(dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert model.forward_features(x).dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in model.forward_intermediates(x, indices=[1], intermediates_only=True))
    for _, mem in memory_modules(model):
        assert mem(torch.randn(2, 5, mem.dim, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('name', NAMES)
def test_torchscript_refuses_with_one_clear_error(name):
    """Raised by the ``__prepare_scriptable__`` hook before TorchScript parses anything, naming the routes that
    work; the bare memory module too."""
    model = timm.create_model(name, **SMALL)
    for module in (model, memory_modules(model)[0][1]):
        with pytest.raises(RuntimeError, match=r'torch\.compile.*torch\.export') as info:
            torch.jit.script(module)
        assert type(info.value).__name__ == 'NotScriptableError'


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('options', [[1, 2], {1: 2}, 'chunk_size=4'])
def test_memory_options_must_be_a_dict(name, options):
    with pytest.raises(ValueError, match='memory_options must be a dict'):
        timm.create_model(name, memory_options=options, **SMALL)


def _just_too_big(name):
    """Options one step over each documented size bound at this model's width (depth <= 16; inner and hidden
    width <= 8 x dim), small enough that a build without the bounds still finishes quickly."""
    dim = DIMS[name.split('_')[1]]
    return [{'depth': 17},
            {'heads': 8 * dim // 64 + 1},           # head_dim 64
            {'expansion': 8 * dim / 64 + 1}]        # hidden width head_dim x expansion


@pytest.mark.parametrize('name', NAMES)
def test_oversized_memory_options_fail_clearly(name):
    for options in _just_too_big(name):
        with pytest.raises(ValueError, match='memory option'):
            timm.create_model(name, memory_options=options, **SMALL)


@pytest.mark.parametrize('kind', titans_memory.MEMORY_TYPES)
@pytest.mark.parametrize('options', [
    dict(depth=100000), dict(heads=100000), dict(head_dim=100000), dict(expansion=1e6),
    dict(depth=16, expansion=32.0)])   # each width allowed, M0 (16 layers of 2048 x 2048 per head) too big
def test_absurd_memory_sizes_fail_before_building(kind, options):
    """Checked before anything is allocated (a build would take minutes and gigabytes)."""
    with pytest.raises(ValueError, match='memory option'):
        titans_memory.create_memory(kind, 256, **options)
