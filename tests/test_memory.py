"""The Titans memory core: the chunked closed-form update equals the token-by-token rule, and the memory is
per image, descends its own loss, is differentiable end to end and stays finite."""
import pytest
import torch

from titans_timm import MEMORY_TYPES, create_memory
from titans_timm.memory import TitansMemory
from titans_timm.memory_functional import chunk_coefficients, memory_mlp_forward, memory_mlp_grads
from titans_timm.memory_functional import chunked_write, token_by_token_write

UPDATED = ('simple', 'advanced')


def _memory(kind, dim=64, dtype=torch.float32, **opts):
    torch.manual_seed(0)
    opts.setdefault('head_dim', 16)
    mem = create_memory(kind, dim, **opts).to(dtype)
    if kind != 'mlp':
        # move the gates away from their init so every term of the update is exercised
        with torch.no_grad():
            for n, p in mem.named_parameters():
                if 'logit' in n or 'gates' in n:
                    p.add_(torch.randn_like(p) * 0.5)
    return mem


def _reference(mem, x, chunk, causal=False):
    """The memory's views of ``x`` through the token-by-token Titans update (``token_by_token_write``: autograd
    gradients, one token at a time; in a chunk every gradient at the chunk-start weights), then its output
    projection."""
    q, k, v, theta, eta, keep = mem._prepare(x, None)
    return mem._merge_heads(token_by_token_write(list(mem.initial_weights), q, k, v, theta, eta, keep, chunk, causal))


@pytest.mark.parametrize('kind', UPDATED)
@pytest.mark.parametrize('chunk', [1, 4, 5, None])
@pytest.mark.parametrize('momentum', [True, False])
@pytest.mark.parametrize('depth', [1, 2])
def test_chunked_equals_token_by_token_reference(kind, chunk, momentum, depth):
    mem = _memory(kind, dtype=torch.float64, chunk_size=chunk, momentum=momentum, depth=depth)
    x = torch.randn(2, 23, 64, dtype=torch.float64)  # 23 tokens: 4 and 5 do not divide it
    with torch.no_grad():
        out = mem(x)
    ref = _reference(mem, x, chunk or 23)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('kind', UPDATED)
def test_causal_read_equals_reference(kind):
    mem = _memory(kind, dtype=torch.float64, chunk_size=4, read_mode='causal')
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    with torch.no_grad():
        out = mem(x)
    torch.testing.assert_close(out, _reference(mem, x, 4, causal=True), rtol=1e-9, atol=1e-10)
    # the first chunk reads M0, so it cannot depend on later tokens
    x2 = x.clone()
    x2[:, 4:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(mem(x2)[:, :4], out[:, :4])


@pytest.mark.parametrize('depth', [1, 2, 3])
def test_closed_form_gradient_equals_autograd(depth):
    torch.manual_seed(0)
    sizes = [8] + [12] * (depth - 1) + [8]
    weights = [torch.randn(2, 3, sizes[i], sizes[i + 1], dtype=torch.float64, requires_grad=True) for i in range(depth)]
    k = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    coef = torch.rand(2, 3, 7, dtype=torch.float64)
    pred, inputs, act_grads = memory_mlp_forward(weights, k)
    closed = memory_mlp_grads(weights, inputs, act_grads, 2 * (pred - v), coef)
    auto = torch.autograd.grad(((pred - v).pow(2).sum(-1) * coef).sum(), weights)
    for c, a in zip(closed, auto):
        torch.testing.assert_close(c, a)


@pytest.mark.parametrize('b, dtype', [(6, torch.float64), (197, torch.float32)])
def test_chunk_coefficients_match_recurrence(b, dtype):
    """Also a whole-image chunk in float32 with momenta from 0.01 to 1: the log-sum-exp scan stays accurate."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    theta, eta, keep = torch.rand(b, **f64), torch.rand(b, **f64).clamp_min(0.01), torch.rand(b, **f64)
    if b > 10:
        keep = 0.9 + 0.1 * keep  # a long chunk forgets slowly, or nothing but its last tokens is left
    u = torch.randn(b, 3, **f64)
    w0, s0 = torch.randn(3, **f64), torch.randn(3, **f64)
    w, s = w0.clone(), s0.clone()
    for i in range(b):
        s = eta[i] * s - theta[i] * u[i]
        w = keep[i] * w + s
    c = {name: t.double() for name, t in chunk_coefficients(theta.to(dtype), eta.to(dtype), keep.to(dtype)).items()}
    # float32 in, float32 out (computed in float64 inside): only the final rounding of 197 terms of size ~1
    tol = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c['w_decay'] * w0 + c['w_from_s'] * s0 - (c['w_tok'][:, None] * u).sum(0), w, **tol)
    torch.testing.assert_close(c['s_decay'] * s0 - (c['s_tok'][:, None] * u).sum(0), s, **tol)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('train', [True, False])
def test_per_image_and_repeatable(kind, train):
    mem = _memory(kind, chunk_size=8)
    mem.train(train)
    before = {n: t.clone() for n, t in list(mem.state_dict().items())}
    x = torch.randn(4, 37, 64)
    with torch.no_grad():
        batch = mem(x)
        again = mem(x)
        single = torch.cat([mem(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch, again)
    for n, t in mem.state_dict().items():
        assert torch.equal(t, before[n]), f'forward changed {n}'


@pytest.mark.parametrize('kind', MEMORY_TYPES)
def test_servable_under_no_grad_and_inference_mode(kind):
    mem = _memory(kind).eval()
    x = torch.randn(2, 30, 64)
    plain = mem(x)
    with torch.no_grad():
        ng = mem(x)
    with torch.inference_mode():
        im = mem(x)
    torch.testing.assert_close(plain.detach(), ng)
    torch.testing.assert_close(plain.detach(), im)
    if kind != 'mlp':  # the memory is really written at test time: reading M0 gives something else
        with torch.no_grad():
            assert not torch.allclose(mem.read(x), ng, atol=1e-4)


@pytest.mark.parametrize('kind', UPDATED)
@pytest.mark.parametrize('chunk', [16, None])
@pytest.mark.parametrize('momentum, depth', [(True, None), (False, None), (True, 3)])
def test_inner_update_descends_on_memorisation_toy(kind, chunk, momentum, depth):
    """Write random key/value pairs; the associative loss after the write is below the loss of M0."""
    mem = create_memory(kind, 128, chunk_size=chunk, momentum=momentum, **({'depth': depth} if depth else {}))
    x = torch.randn(3, 64, 128)
    with torch.no_grad():
        _, k, v, theta, eta, keep = mem._prepare(x, None)
        state, _, _ = chunked_write(k, v, theta, eta, keep, mem.initial_state(3), mem.chunk_size)
        before = (memory_mlp_forward(mem.initial_state(3)['weights'], k)[0] - v).pow(2).sum(-1).mean()
        after = (memory_mlp_forward(state['weights'], k)[0] - v).pow(2).sum(-1).mean()
    # a deeper memory's normalised step is smaller (every layer's input counts): it descends, by less
    assert after < (0.95 if depth is None else 0.99) * before, (before.item(), after.item())


@pytest.mark.parametrize('kind, momentum', [('simple', True), ('simple', False), ('advanced', True),
                                             ('advanced', False)])
def test_outer_gradient_equals_finite_differences(kind, momentum):
    """Per block of rows of every parameter (q/k/v of simple's fused qkv, theta/eta/alpha of advanced's gates),
    the analytic directional derivative equals a central difference: a .detach() on part of a projection, which
    every gradient-vs-gradient test would share, is caught here."""
    mem = _memory(kind, dtype=torch.float64, chunk_size=4, momentum=momentum)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    target = torch.randn(2, 10, 64, dtype=torch.float64)
    loss = lambda: (mem(x) - target).pow(2).sum()
    params = dict(mem.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values()))))
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, p in params.items():
        blocks = torch.arange(p.shape[0]).chunk(3) if p.dim() == 2 else [torch.arange(p.shape[0])]
        for i, rows in enumerate(blocks):
            d = torch.zeros_like(p)
            d[rows] = torch.randn(d[rows].shape, generator=g, dtype=p.dtype)
            with torch.no_grad():
                p.add_(d, alpha=eps)
                up = loss()
                p.sub_(d, alpha=2 * eps)
                down = loss()
                p.add_(d, alpha=eps)
            torch.testing.assert_close((grads[name] * d).sum(), (up - down) / (2 * eps), rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f'{name} rows block {i}: {m}')


@pytest.mark.parametrize('kind, momentum', [('mlp', True), ('simple', True), ('simple', False),
                                             ('advanced', True), ('advanced', False)])
def test_every_parameter_learns(kind, momentum):
    mem = _memory(kind, chunk_size=8, momentum=momentum)
    x = torch.randn(2, 30, 64)
    target = torch.randn(2, 30, 64)
    (mem(x) - target).pow(2).mean().backward()
    for n, p in mem.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f'dead parameter {n}'


def test_momentum_free_simple_has_no_eta_and_loads_older_state():
    mem = create_memory('simple', 64, momentum=False)
    assert 'eta_logit' not in dict(mem.named_parameters())
    older = dict(mem.state_dict(), eta_logit=torch.zeros(mem.heads))   # saved when the unused logit existed
    mem.load_state_dict(older)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('case', ['long', 'scaled', 'bf16'])
def test_finite_outputs_and_gradients(kind, case):
    torch.manual_seed(0)
    mem = create_memory(kind, 128)
    n = 1024 if case == 'long' else 64
    x = torch.randn(2, n, 128) * (100 if case == 'scaled' else 1)
    x.requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=case == 'bf16'):
        y, stats = mem(x, return_stats=True)
    assert torch.isfinite(y).all()
    assert torch.isfinite(stats['surprise']).all() if mem.writes else stats == {}
    y.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mem.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_write_then_read_equals_forward_and_state_is_per_call():
    mem = _memory('advanced', chunk_size=8)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        state = mem.write(x)
        torch.testing.assert_close(mem.read(x, state), mem(x))
        # a second write continues from the given state, never from a hidden one
        torch.testing.assert_close(mem.read(x, mem.write(x)), mem.read(x, state))


@pytest.mark.parametrize('kind', MEMORY_TYPES)
def test_every_type_implements_the_memory_interface(kind):
    """write / read / forward mean the same for every type: forward is a write from M0 then a read of the same
    tokens, the state passed in is never modified, and mlp (never written) hands its state back unchanged."""
    mem = _memory(kind, chunk_size=8)
    assert isinstance(mem, TitansMemory) and mem.kind == kind and mem.writes == (kind != 'mlp')
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        start = mem.initial_state(2)
        m0 = [w.clone() for w in start['weights']]
        state, stats = mem.write(x, start, return_stats=True)
        torch.testing.assert_close(mem.read(x, state), mem(x))
        assert all(torch.equal(a, b) for a, b in zip(start['weights'], m0))
        if kind == 'mlp':
            assert state is start and stats == {} and mem.write(x) is None
            assert torch.equal(mem.read(x, start), mem.read(x))   # the state is M0: reading it is reading M0
        else:
            assert stats['surprise'].shape == (2, 20) and (stats['surprise'] > 0).all()


@pytest.mark.parametrize('kind', MEMORY_TYPES)
def test_stats_hook_reports_every_write_until_removed(kind):
    """register_stats_hook sees the stats of every write (forward's and write()'s), also under inference_mode,
    without changing the output; mlp writes nothing, so its hook never runs (its surprise is not available)."""
    mem = _memory(kind, chunk_size=8)
    x = torch.randn(2, 20, 64)
    seen = []
    handle = mem.register_stats_hook(lambda m, stats: seen.append((m, stats)))
    with torch.inference_mode():
        plain = mem(x)
        out, stats = mem(x, return_stats=True)
        _, write_stats = mem.write(x, return_stats=True)
    assert torch.equal(plain, out)
    if kind == 'mlp':
        assert seen == []
    else:
        assert [m for m, _ in seen] == [mem] * 3
        assert all(torch.equal(got['surprise'], stats['surprise']) for _, got in seen[:2])   # the two forwards
        assert torch.equal(seen[2][1]['surprise'], write_stats['surprise'])
        # write() takes the autograd-op path, forward the fused one: the same surprise up to rounding
        torch.testing.assert_close(write_stats['surprise'], stats['surprise'])
    handle.remove()
    with torch.no_grad():
        mem(x)
    assert len(seen) == (0 if kind == 'mlp' else 3)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
def test_context_is_used_only_by_memories_that_take_a_second_view(kind):
    """Integrations always pass ``context``: a memory without ``uses_context`` ignores it, bit for bit."""
    mem = _memory(kind, chunk_size=8)
    x, ctx = torch.randn(2, 12, 64), torch.randn(2, 12, 64)
    assert not mem.uses_context
    with torch.no_grad():
        assert torch.equal(mem(x, context=ctx), mem(x))
        if mem.writes:
            assert torch.equal(mem.read(x, mem.write(x, context=ctx)), mem.read(x, mem.write(x)))
    assert _memory('advanced', qkv_diff_views=True).uses_context


def test_qkv_diff_views_takes_keys_from_context():
    mem = _memory('advanced', qkv_diff_views=True)
    x, ctx = torch.randn(1, 12, 64), torch.randn(1, 12, 64)
    with torch.no_grad():
        assert not torch.allclose(mem(x, context=ctx), mem(x, context=ctx * 2 + 1))


def test_default_depths_linear_simple_deep_advanced():
    """The deep memory is one of advanced's features: simple is linear unless asked."""
    simple = create_memory('simple', 64)
    assert simple.depth == 1 and [tuple(w.shape) for w in simple.initial_weights] == [(1, 64, 64)]
    assert create_memory('advanced', 64).depth == 2 and create_memory('mlp', 64).depth == 2
    assert create_memory('simple', 64, depth=2).options['depth'] == 2


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match='unknown memory type'):
        create_memory('lstm', 64)
    with pytest.raises(ValueError, match='unknown memory option'):
        create_memory('simple', 64, chunksize=4)
    with pytest.raises(ValueError, match='read_mode'):
        create_memory('simple', 64, read_mode='random')
    with pytest.raises(ValueError, match='qkv_diff_views'):
        create_memory('simple', 64, qkv_diff_views=True)


@pytest.mark.parametrize('kind', MEMORY_TYPES)
@pytest.mark.parametrize('option, value', [
    ('heads', 0), ('head_dim', 0), ('depth', 2.0), ('depth', 0), ('expansion', 0), ('expansion', -1.0),
    ('chunk_size', 0), ('chunk_size', 2.5), ('chunk_size', '16'), ('read_mode', 'bogus'), ('momentum', 'no'),
    ('max_lr', -1.0), ('max_lr', 0), ('max_lr', float('nan')), ('qkv_diff_views', 1)])
def test_bad_option_values_fail_clearly(kind, option, value):
    """Every type checks every option (mlp too, which ignores the write options): one ValueError naming it."""
    with pytest.raises(ValueError, match=f'memory option {option} must be'):
        create_memory(kind, 64, **{option: value})


@pytest.mark.parametrize('kind', UPDATED)
def test_causal_read_needs_chunks(kind):
    with pytest.raises(ValueError, match="read_mode='causal' needs a chunk_size"):
        create_memory(kind, 64, read_mode='causal', chunk_size=None)
    create_memory('mlp', 64, read_mode='causal', chunk_size=None)   # never written: nothing to lose


@pytest.mark.parametrize('depth', [1, 2, 3])
@pytest.mark.parametrize('n_tokens, chunk', [(7, 3), (5, 5), (4, 1)])
def test_dual_write_backward_equals_numerical_gradient(depth, n_tokens, chunk):
    """The hand-written backward of the fused write (every input: keys, values, gate coefficients, M0)."""
    import math
    from titans_timm.memory_fused import _DualWrite
    torch.manual_seed(0)
    heads, batch, dh, hidden = 2, 2, 4, 6
    sizes = [dh] + [hidden] * (depth - 1) + [dh]
    f64 = dict(dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(heads * batch, n_tokens, dh, **f64), dim=-1).requires_grad_()
    v = torch.randn(heads * batch, n_tokens, dh, **f64, requires_grad=True)
    n_chunks = math.ceil(n_tokens / chunk)
    # gamma[c, i] is zero for tokens of chunk c and later (as _write_coefficients builds it)
    mask = ((torch.arange(n_tokens) // chunk)[None, :] < torch.arange(n_chunks + 1)[:, None]).double()
    gamma = torch.rand(heads * batch, n_chunks + 1, n_tokens, **f64, requires_grad=True)
    r0 = torch.rand(heads * batch, n_chunks + 1, **f64, requires_grad=True)
    w0 = [(torch.randn(heads, sizes[i], sizes[i + 1], **f64) / math.sqrt(sizes[i])).requires_grad_() for i in range(depth)]
    fn = lambda k, v, gamma, r0, *w: _DualWrite.apply(k, v, gamma * mask, r0, chunk, *w)
    assert torch.autograd.gradcheck(fn, (k, v, gamma, r0, *w0), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize('kind', UPDATED)
@pytest.mark.parametrize('chunk', [4, None])
@pytest.mark.parametrize('momentum', [True, False])
def test_fused_write_gradients_equal_autograd_write(kind, chunk, momentum):
    """forward() takes the fused write; the same write built from autograd ops (write()'s path) gives the same
    outer gradients."""
    mem = _memory(kind, dtype=torch.float64, chunk_size=chunk, momentum=momentum)
    x = torch.randn(2, 23, 64, dtype=torch.float64)
    target = torch.randn(2, 23, 64, dtype=torch.float64)
    params = list(mem.parameters())
    fused = torch.autograd.grad((mem(x) - target).pow(2).sum(), params)
    unfused = torch.autograd.grad((mem.read(x, mem.write(x)) - target).pow(2).sum(), params)
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('kind', UPDATED)
@pytest.mark.parametrize('chunk', [4, None])
def test_constant_token_keeps_the_image_finite(kind, chunk):
    """A constant token (zero padding, say) is layer-normed to zero and gives a zero key: its step normaliser is
    clamped, so the image's memory stays finite, both writes agree on the gradients, and other images are as alone."""
    mem = _memory(kind, dtype=torch.float64, chunk_size=chunk, depth=2)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    x[0, 3] = 1.0
    params = list(mem.parameters())
    y = mem(x)
    assert torch.isfinite(y).all()
    fused = torch.autograd.grad(y.pow(2).sum(), params, allow_unused=True)
    unfused = torch.autograd.grad(mem.read(x, mem.write(x)).pow(2).sum(), params, allow_unused=True)
    for a, b in zip(fused, unfused):
        assert a is not None and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(y[1:], mem(x[1:]))


def test_fused_write_repeats_across_grad_modes():
    """The fused write reuses scratch buffers between calls: results and gradients do not depend on what ran
    before (inference mode, no_grad, a graph still alive)."""
    mem = _memory('advanced', chunk_size=4)
    x = torch.randn(2, 13, 64)

    def grads():
        mem.zero_grad()
        out = mem(x)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in mem.parameters()]

    ref_out, ref_grads = grads()
    with torch.inference_mode():
        inf = mem(x)
    with torch.no_grad():
        ng = mem(x)
    alive = mem(x * 2)  # a graph that still holds its buffers while the next call runs
    out, g = grads()
    alive.sum().backward()
    torch.testing.assert_close(inf, ref_out)
    torch.testing.assert_close(ng, ref_out)
    assert torch.equal(out, ref_out)
    for a, b in zip(g, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize('diff_views', [False, True])
def test_advanced_views_come_from_their_own_projections(diff_views):
    """advanced computes q/k/v/gates in one matmul: each view still comes from its own module (q from the input;
    k, v and the gates from the context with qkv_diff_views), as separate Linear calls would give."""
    import torch.nn.functional as F
    mem = _memory('advanced', chunk_size=4, qkv_diff_views=diff_views)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    with torch.no_grad():
        q, k, v, theta, eta, keep = mem._prepare(x, ctx)
        xn, cn = mem.norm(x), mem.norm(ctx if diff_views else x)
        heads = lambda t: t.view(2, 10, mem.heads, mem.head_dim).transpose(1, 2)
        torch.testing.assert_close(q, F.normalize(heads(mem.q(xn)), dim=-1))
        torch.testing.assert_close(k, F.normalize(heads(mem.k(cn)), dim=-1))
        torch.testing.assert_close(v, heads(mem.v(cn)))
        g = mem.gates(cn)
        torch.testing.assert_close(theta, mem.max_lr / 4 * torch.sigmoid(g[..., :mem.heads]).transpose(1, 2))
        # eta and alpha: the mean gate logit of each chunk of 4 tokens (the last chunk has 2)
        first_chunk = g[:, :4, mem.heads:].mean(1)
        torch.testing.assert_close(eta[:, :, 0], torch.sigmoid(first_chunk[:, :mem.heads]))
        torch.testing.assert_close(keep[:, :, -1], 1 - torch.sigmoid(g[:, 8:, 2 * mem.heads:].mean(1)))


def test_fused_write_backward_twice_on_a_retained_graph():
    """A second backward over a retained graph gives the same gradients (the node's buffers survive the first)."""
    mem = _memory('advanced', chunk_size=4)
    x = torch.randn(2, 13, 64, requires_grad=True)
    inputs = [x, *mem.parameters()]
    loss = mem(x).pow(2).sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_scratch_pool_gives_back_while_locked_by_the_same_thread():
    """A scratch owner's finalizer can run in a garbage collection that starts inside the pool's own take():
    giving buffers back from there must not deadlock (it did with a non-reentrant lock)."""
    import threading
    from titans_timm.memory_fused import _ScratchPool
    pool = _ScratchPool()
    done = threading.Event()

    def give_inside_lock():
        with pool._lock:
            pool.give([torch.empty(4)])
        done.set()

    threading.Thread(target=give_inside_lock, daemon=True).start()
    assert done.wait(10), 'give() inside the pool lock deadlocked'
