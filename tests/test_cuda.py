"""The same guarantees on a CUDA GPU: skipped where there is none (CI has none; run this file on a GPU machine).

The memory computes on the GPU what it computes on the CPU, stays per image and repeatable, and stays finite under
bf16 autocast; every tiny model starts as its backbone and trains a step there; torch.compile agrees with eager;
the trainer runs a short float16 job with loss scaling.
"""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import titans_timm  # noqa: F401  (registers the models)
from titans_timm import MEMORY_TYPES, create_memory
from titans_timm.train import main as train_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')
SMALL_KW = dict(img_size=32, patch_size=8, depth=2)
TINY_NAMES = [f'vit_tiny_{a}_{m}' for a in ('mal', 'mac', 'mag') for m in MEMORY_TYPES]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 would make float32 GPU matmuls differ from the CPU's in the 4th digit; the comparisons want float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _memory(kind, dtype=torch.float32, **opts):
    torch.manual_seed(0)
    opts.setdefault('head_dim', 16)
    mem = create_memory(kind, 64, **opts).to(dtype)
    with torch.no_grad():
        for name, p in mem.named_parameters():
            if 'logit' in name or 'gates' in name:  # gates away from their init: every term of the update counts
                p.add_(torch.randn_like(p) * 0.5)
    return mem


def _fwd_bwd(mem, x):
    x = x.detach().requires_grad_(True)
    out = mem(x)
    out.pow(2).sum().backward()
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in mem.parameters()]
    mem.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('chunk, read_mode, momentum', [(4, 'after_write', True), (None, 'after_write', True),
                                                        (5, 'after_write', False), (4, 'causal', True)])
def test_memory_on_gpu_equals_cpu(kind, chunk, read_mode, momentum):
    """Outputs, input gradients and every parameter gradient, in float64 so only the algorithm is compared."""
    opts = {} if kind == 'mlp' else dict(chunk_size=chunk, read_mode=read_mode, momentum=momentum)
    mem = _memory(kind, torch.float64, **opts)
    x = torch.randn(3, 23, 64, dtype=torch.float64)
    cpu = _fwd_bwd(mem, x)
    gpu = _fwd_bwd(mem.to(CUDA), x.to(CUDA))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-9, atol=1e-11)
    for g, c in zip(gpu[2], cpu[2]):
        assert (g is None) == (c is None)
        if g is not None:
            torch.testing.assert_close(g.cpu(), c, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
def test_memory_on_gpu_per_image_repeatable_and_servable(kind):
    mem = _memory(kind).to(CUDA)
    x = torch.randn(4, 50, 64, device=CUDA)
    for train in (True, False):
        mem.train(train)
        out = mem(x)
        torch.testing.assert_close(mem(x), out, rtol=0, atol=0)
        for i in range(x.shape[0]):
            torch.testing.assert_close(mem(x[i:i + 1])[0], out[i], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(mem(x), out, rtol=0, atol=0)
        with torch.inference_mode():
            torch.testing.assert_close(mem(x), out, rtol=0, atol=0)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('n_tokens, scale', [(197, 1.0), (1024, 1.0), (197, 100.0)])
def test_memory_bf16_autocast_on_gpu_is_finite_and_close(kind, n_tokens, scale):
    mem = _memory(kind, chunk_size=16) if kind != 'mlp' else _memory(kind)
    mem = mem.to(CUDA)
    x = (torch.randn(2, n_tokens, 64, device=CUDA) * scale).requires_grad_(True)
    ref = mem(x).detach()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = mem(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters() if p.grad is not None)
    assert (out.float() - ref).norm() <= 0.05 * ref.norm()


@pytest.mark.parametrize('name', TINY_NAMES)
def test_model_starts_as_backbone_and_trains_a_step_on_gpu(name, tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model('vit_tiny_patch16_224', **SMALL_KW).eval()
    path = tmp_path / 'backbone.safetensors'
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL_KW).to(CUDA).eval()
    backbone = backbone.to(CUDA)
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), rtol=1e-4, atol=1e-4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4, device=CUDA))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


@pytest.mark.parametrize('name', ['vit_tiny_mac_advanced', 'vit_tiny_mag_advanced'])
def test_torch_compile_on_gpu_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SMALL_KW).to(CUDA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'memory_ls' in name or 'memory_gate' in name:
                p.normal_(0, 0.5)                   # open the zero-initialised gates: the memory counts
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


def test_trainer_runs_float16_amp_on_gpu(backbone, tmp_path):
    out = train_main(['--model', 'vit_tiny_mag_advanced', '--pretrained-path', str(backbone), '--device', 'cuda',
                      '--img-size', '32', '--train-num-samples', '64', '--val-num-samples', '32', '-b', '16',
                      '--epochs', '2', '--freeze-epochs', '1', '--amp', '--amp-dtype', 'float16', '--seed', '0',
                      '--no-progress', '--output', str(tmp_path), '--experiment', 'gpu'])
    assert not out['interrupted'] and math.isfinite(out['final_top1'])
    state = torch.load(tmp_path / 'gpu' / 'train_state.pth', weights_only=True)
    assert state['scaler']['scale'] > 1


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('chunk', [4, None])
def test_memory_captures_as_cuda_graph(kind, chunk):
    """No host-device copy or sync inside forward or backward: the module can be replayed as a CUDA graph (what
    removes the per-op launch cost of the chunk loop), with the eager outputs and gradients."""
    mem = (_memory(kind, chunk_size=chunk) if kind != 'mlp' else _memory(kind)).to(CUDA)
    x = torch.randn(2, 23, 64, device=CUDA)        # 23 tokens: a shorter last chunk
    eager = _fwd_bwd(mem, x)
    graphed = torch.cuda.make_graphed_callables(mem, (x.detach().requires_grad_(True),))
    xg = x.detach().requires_grad_(True)
    out = graphed(xg)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out.detach(), eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xg.grad, eager[1], rtol=1e-5, atol=1e-6)
    for p, g in zip(mem.parameters(), eager[2]):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
