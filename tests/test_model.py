"""Tests for model.py: each one compares against an independent statement of the paper's maths.

Equivalence tests run in float64 so that "same maths, different order" differences are ~1e-12 and a
tolerance of 1e-9 (relative norm error) can only be broken by a real bug, not by rounding.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import conftest
from model import (V3_ARGS, Gate, ModelArgs, MoE, Permute, Transformer, apply_rotary_emb, apply_rotary_emb_ref,
                   attention, attention_cpu, latent_attention, precompute_freqs_cis, rank_desc)


def tiny_args(**kw):
    # conftest's tiny model, widened where these tests look: 3 heads, 8 experts in 4 groups (2 of them allowed)
    # with V3's route_scale, 2 MoE blocks, 2 MTP depths, and init_std 0.05 (larger than 0.006 so that tiny
    # models have non-trivial routing/attention)
    base = dict(vocab_size=97, dim=48, inter_dim=96, moe_inter_dim=24, n_layers=3, n_heads=3, n_routed_experts=8,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5, q_lora_rank=32, qk_rope_head_dim=4,
                n_mtp_depth=2, init_std=0.05)
    return conftest.tiny_args(**{**base, **kw})


def tiny_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_args(**kw)).to(dtype)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tokens(B, T, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


# --- config ------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(n_routed_experts=10, n_expert_groups=4), "divisible by n_expert_groups"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(n_activated_experts=5, n_limited_groups=1), "n_activated_experts"),
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(gate_impl="sort"), "gate_impl"),
    (dict(qk_rope_head_dim=5), "even"),
    (dict(dim=32.0), "dim must be an int"),
    # values of the right type that used to fail later (a traceback in nn.init, or a NaN loss)
    (dict(rope_theta=0.0), "rope_theta must be > 1"),
    (dict(init_std=-1.0), "init_std must be > 0"),
    (dict(init_std=0.0), "init_std must be > 0"),
    (dict(route_scale=float("nan")), "route_scale must be finite"),
    (dict(mtp_lambda=float("inf")), "mtp_lambda must be finite"),
    (dict(rope_factor=0.5), "rope_factor >= 1"),
    (dict(beta_slow=40), "beta_slow < beta_fast"),
    (dict(aux_alpha=-1e-4), "aux_alpha must be >= 0"),
])
def test_invalid_args_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_args(**kw)


def test_all_dense_model_reports_no_expert_load():
    # n_dense_layers = n_layers and no MTP: no MoE layer at all; train.py's progress line used to crash here
    model = Transformer(tiny_args(n_dense_layers=3, n_mtp_depth=0))
    _, losses = model(tokens(2, 8), tokens(2, 8, seed=2))
    counts, maxvio = model.expert_load()
    assert not model.moe_layers() and counts.shape[0] == 0 and maxvio.numel() == 0
    assert torch.isfinite(losses["loss"])


def test_v3_accounting_on_meta():
    # the real V3: 671.03B main, 37.55B activated, one MTP module adds 11.61B of its own
    with torch.device("meta"):
        model = Transformer(ModelArgs(**V3_ARGS))
    n = model.num_params()
    assert round(n["total"] / 1e9, 2) == 671.03
    assert round(n["activated"] / 1e9, 2) == 37.55
    assert round(n["mtp"] / 1e9, 2) == 11.61
    emb_head = 2 * 129280 * 7168   # counted again when the MTP module is seen as a standalone model
    assert round((n["mtp"] + emb_head) / 1e9, 2) == 13.46
    assert model.flops_per_token(4096) > 6 * 37e9   # at least the activated matmuls


# --- attention -------------------------------------------------------------------

def test_causality_main_and_mtp():
    model = tiny_model().eval()
    T, t = 24, 13
    x = tokens(2, T)
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % 97

    def outputs(inp):
        h = model.trunk(inp)
        logits = model.logits(h)
        per_depth, h_k = [], h
        for k in range(1, 3):
            lk, h_k = model.mtp_forward(k, h_k[:, :T - k], inp[:, k:])
            per_depth.append(lk)
        return logits, per_depth

    with torch.no_grad():
        (l1, m1), (l2, m2) = outputs(x), outputs(x2)
    # not bit-equal: an expert's matmul over a different number of rows may round differently (~1e-16),
    # so "unchanged" is rel. error < 1e-12, while a real leak moves logits by ~1e-2
    assert rel_err(l1[:, :t], l2[:, :t]) < 1e-12, "main logits before t changed"
    assert rel_err(l1[:, t], l2[:, t]) > 1e-6, "changing token t changed nothing at all"
    for k, (a, b) in enumerate(zip(m1, m2), start=1):
        # depth k at position i has seen tokens up to i+k
        assert rel_err(a[:, :t - k], b[:, :t - k]) < 1e-12, f"MTP depth {k} saw the future"
        assert rel_err(a[:, t - k], b[:, t - k]) > 1e-6


def test_naive_equals_absorb():
    model = tiny_model().eval()
    x = tokens(2, 20)
    with torch.no_grad():
        naive = model(x).logits
        model.set_impl(attn="absorb")
        absorb = model(x).logits
    assert rel_err(absorb, naive) < 1e-9


@pytest.mark.parametrize("impl, decode", [("naive", "latent"), ("absorb", "latent"), ("absorb", "sdpa")])
def test_cached_decoding_equals_full_forward(impl, decode):
    model = tiny_model(attn_impl=impl).eval()
    model.set_impl(decode=decode)
    x = tokens(2, 20)
    with torch.no_grad():
        full = model(x).logits
        model.setup_cache(batch_size=2)
        pieces = [model(x[:, :8], start_pos=0).logits]          # prompt
        pieces.append(model(x[:, 8:12], start_pos=8).logits)    # a chunk against a cached prefix (mask path)
        for t in range(12, 20):                                  # then one token at a time
            pieces.append(model(x[:, t:t + 1], start_pos=t).logits)
        model.clear_cache()
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-9
    # the cache holds only c_kv and k_R
    model.setup_cache(batch_size=1)
    attn = model.layers[0].attn
    assert attn.kv_cache.shape[-1] == 16 and attn.pe_cache.shape[-1] == 4


def test_rope_complex_cpu_path_equals_real_reference():
    # the CPU path multiplies complex numbers, the reference rotates real pairs: the same function. float64
    # rounding only (tolerance 1e-12); fp32 within 1e-6 (one rounding per product). The input is a split view
    # (q_pe is one), so the complex path must cope with a non-contiguous tensor; gradients must agree too.
    a = tiny_args(qk_rope_head_dim=8)
    freqs = precompute_freqs_cis(a)[:20]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        q = torch.randn(2, 20, 3, 13, dtype=dtype).split([5, 8], dim=-1)[1].detach().requires_grad_()
        fast, ref = apply_rotary_emb(q, freqs.to(dtype)), apply_rotary_emb_ref(q, freqs.to(dtype))
        assert fast.dtype == dtype and rel_err(fast, ref) < tol
        w = torch.randn_like(ref)
        g_fast, = torch.autograd.grad((fast * w).sum(), q)
        g_ref, = torch.autograd.grad((ref * w).sum(), q)
        assert rel_err(g_fast, g_ref) < tol


@pytest.mark.parametrize("T, S, causal", [(9, 9, True), (4, 11, False), (1, 11, False)])
def test_cpu_attention_equals_softmax_reference(T, S, causal):
    # float64 against softmax(q·kᵀ·scale + mask)·v written out; MLA shapes (value dim != query dim); values and
    # gradients to 1e-12. (4, 11): a chunk against a cached prefix (explicit mask); (1, 11): one decoding step.
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, n, 6, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, S))
    v = torch.randn(2, 3, S, 4, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)     # query i sees keys 0..S-T+i
    mask = None if causal or T == 1 else allowed
    out = attention_cpu(q, k, v, mask, causal, scale=0.4)
    ref = ((q @ k.transpose(-1, -2) * 0.4).masked_fill(~allowed, float("-inf")).softmax(-1)) @ v
    assert rel_err(out, ref) < 1e-12
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("T, S", [(1, 300), (2, 300), (5, 64)])
def test_latent_attention_equals_reference(T, S):
    # decoding's attention over the latent cache (two matmuls and a softmax) against softmax(q·kᵀ·scale + mask)·v
    # written out in float64 on the same (rounded) inputs, and against the SDPA path it replaces (keys and values
    # expanded per head). MLA's decoding widths (Ckv 256 + Dr 64, 8 heads); fresh random inputs; the mask hides the
    # last positions as a static cache does. Tolerances: float64 rounding only (1e-12); fp32 sums of 320 products
    # (measured <= 4e-7 over 20 seeds, so 2e-6); bf16 rounds the scores and probabilities to 8 bits, as the official
    # inference code does (measured <= 2.7e-3, so 1e-2: "bf16 operands between 1e-3 and 1e-2")
    C, Dr, H, scale = 256, 64, 8, 0.03
    g = torch.Generator().manual_seed(T * S)
    q = torch.randn(2, T, H, C + Dr, generator=g, dtype=torch.float64)      # (B, T, H, Ckv+Dr)
    kv = torch.randn(2, S, C + Dr, generator=g, dtype=torch.float64)        # (B, S, Ckv+Dr) rows [c_kv ; k_R]
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T - 3)      # (T, S)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 1e-2)):
        qd, kvd = q.to(dtype), kv.to(dtype)
        scores = torch.einsum("bthc,bsc->bths", qd.double(), kvd.double()) * scale             # (B, T, H, S)
        ref = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ kvd.double()[:, None, :, :C]
        out = latent_attention(qd, kvd, C, mask, scale)                                       # (B, T, H, Ckv)
        assert out.dtype == dtype and rel_err(out.double(), ref) < tol, (dtype, rel_err(out.double(), ref))
    sdpa = attention(q.transpose(1, 2), kv[:, None].expand(2, H, S, C + Dr), kv[:, None, :, :C].expand(2, H, S, C),
                     mask, False, scale).transpose(1, 2)                                      # (B, T, H, Ckv)
    assert rel_err(latent_attention(q, kv, C, mask, scale), sdpa) < 1e-12


@pytest.mark.parametrize("impl, decode", [("naive", "latent"), ("absorb", "latent"), ("absorb", "sdpa")])
def test_static_cache_step_equals_dynamic(impl, decode):
    # the static-shape step (position as a device tensor, whole-cache attention with a mask: what a CUDA graph
    # replays) against the full forward, for the main model (1- and 2-token steps) and for MTP depth 1
    model = tiny_model(attn_impl=impl).eval()
    model.set_impl(decode=decode)   # absorb: decoding by latent_attention, or by SDPA as the full forward
    x = tokens(1, 20)
    with torch.no_grad():
        full = model(x).logits
        h_full = model.trunk(x)
        mtp_full, _ = model.mtp_forward(1, h_full[:, :19], x[:, 1:])
        model.setup_cache(batch_size=1)
        pieces = [model(x[:, :8]).logits]                                        # prefill: the int path
        for t, n in ((8, 1), (9, 2), (11, 1), (12, 2), (14, 1), (15, 1), (16, 2), (18, 2)):
            pieces.append(model(x[:, t:t + n], start_pos=torch.tensor([t])).logits)   # (1, n, V)
        mtp = [model.mtp_forward(1, h_full[:, :8], x[:, 1:9])[0]]
        for t in range(8, 19):
            mtp.append(model.mtp_forward(1, h_full[:, t:t + 1], x[:, t + 1:t + 2], torch.tensor([t]))[0])
        model.clear_cache()
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-12     # float64: the same sums up to rounding
    assert rel_err(torch.cat(mtp, dim=1), mtp_full) < 1e-12


def test_yarn_factor_one_changes_nothing_within_original_context():
    short = tiny_model(max_seq_len=32, original_seq_len=32)
    long = tiny_model(max_seq_len=64, original_seq_len=32, rope_factor=1.0)
    long.load_state_dict(short.state_dict())
    x = tokens(1, 32)
    with torch.no_grad():
        assert rel_err(long.eval()(x).logits, short.eval()(x).logits) < 1e-12


def test_yarn_ramp_interpolates_low_frequencies_only():
    # V3's long-context numbers: 4K pre-training context extended by s=40; Dr=64 -> 32 rotating pairs
    a = tiny_args(qk_rope_head_dim=64, max_seq_len=16384, original_seq_len=4096, rope_factor=40.0)
    base = tiny_args(qk_rope_head_dim=64, max_seq_len=16384, original_seq_len=16384)
    ang = torch.atan2(precompute_freqs_cis(a)[1, :, 1], precompute_freqs_cis(a)[1, :, 0])   # radians/position
    ang0 = torch.atan2(precompute_freqs_cis(base)[1, :, 1], precompute_freqs_cis(base)[1, :, 0])
    ratio = ang0 / ang
    # pair j turns 4096·θ^(-2j/64)/2π times over the original context: > beta_fast=32 turns for j <= 10
    # (kept), < beta_slow=1 turn for j >= 23 (divided by s), a linear ramp in between
    assert torch.allclose(ratio[:10], torch.ones(10), rtol=1e-4)
    assert torch.allclose(ratio[23:], torch.full((9,), 40.0), rtol=1e-4)
    assert (ratio[1:] >= ratio[:-1] - 1e-4).all()
    # and attention gets the mscale² temperature correction
    m = Transformer(tiny_args(max_seq_len=128, original_seq_len=64, rope_factor=40.0))
    mscale = 0.1 * math.log(40.0) + 1
    assert math.isclose(m.layers[0].attn.softmax_scale, (8 + 4) ** -0.5 * mscale ** 2)


# --- routing and balancing ----------------------------------------------------------

def test_group_limited_routing_and_gates():
    torch.manual_seed(0)
    args = tiny_args(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    gate = Gate(args).double()
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(200, args.dim, dtype=torch.float64)
    g, idx, s = gate(x)
    # gates are the unbiased affinities, normalized over the selected, times route_scale
    assert torch.allclose(g.sum(-1), torch.full((200,), 2.5, dtype=torch.float64))
    assert torch.allclose(g, s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5)
    # every selected expert lies in one of the M groups with the highest top-2 sum
    group_score = s.view(200, 4, 4).topk(2, dim=-1).values.sum(-1)      # bias is 0 here
    kept = group_score.topk(2, dim=-1).indices                            # (200, 2)
    assert ((idx // 4)[:, :, None] == kept[:, None, :]).any(-1).all()
    # a bias changes which experts are picked, never the gate values of the picked ones
    gate.bias[:] = torch.linspace(-1, 1, 16, dtype=torch.float32)
    g2, idx2, s2 = gate(x)
    assert not torch.equal(idx2, idx)
    assert torch.equal(s2, s)
    assert torch.allclose(g2, s.gather(1, idx2) / s.gather(1, idx2).sum(-1, keepdim=True) * 2.5)


@pytest.mark.parametrize("E, G, M, K", [(32, 8, 4, 4), (16, 4, 2, 3), (8, 1, 1, 2), (64, 8, 3, 8)])
def test_rank_selection_equals_topk(E, G, M, K):
    # the same experts, in the same (best-first) order, on fresh random scores; exact: both only compare
    args = tiny_args(n_routed_experts=E, n_expert_groups=G, n_limited_groups=M, n_activated_experts=K)
    gate = Gate(args)
    for dtype in (torch.float32, torch.float64):
        biased = torch.rand(500, E, dtype=dtype) + 0.3 * torch.randn(E, dtype=dtype)   # sigmoid-like + bias
        ref, fast = gate.select_topk(biased), gate.select_rank(biased)
        assert torch.equal(ref, fast)
    # ties go to the lower index, and every rank 0..n-1 occurs once per row
    r = rank_desc(torch.tensor([[0.5, 0.9, 0.5, 0.1]]))
    assert r.tolist() == [[1, 0, 2, 3]]
    # through the module: same gates and ids as the topk reference
    gate.double().weight.data.normal_(std=0.5)
    x = torch.randn(300, args.dim, dtype=torch.float64)
    g_ref, idx_ref, _ = gate(x)
    gate.impl = "rank"
    g_fast, idx_fast, _ = gate(x)
    assert torch.equal(idx_ref, idx_fast) and torch.equal(g_ref, g_fast)


def test_permute_backward_is_the_inverse_permutation():
    # against autograd's own derivative of x[perm] (a scatter-add), in float64 on fresh random inputs
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(40)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(40))
    w = torch.randn(40, 6, dtype=torch.float64)
    (Permute.apply(x, perm, inv) * w).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (x[perm] * w).sum().backward()
    assert torch.equal(Permute.apply(x, perm, inv), x[perm])
    assert rel_err(fast, x.grad) < 1e-15   # the same numbers moved, no arithmetic


def test_cpu_cross_entropy_equals_the_reference():
    # model.cross_entropy's CPU path (softmax, -log p[target], (p - onehot)/n backward) against F.cross_entropy in
    # float64 on fresh random logits, with ignored (-1) targets; tolerance 1e-12: the same maths in another order
    import torch.nn.functional as F
    from model import cross_entropy
    for scale in (1.0, 60.0):   # 60: some p[target] underflow to 0 (losses of hundreds of nats): the exact form
        logits = (scale * torch.randn(3, 50, 300, dtype=torch.float64)).requires_grad_()
        targets = torch.randint(0, 300, (3, 50))
        targets[:, -7:] = -1
        fast = cross_entropy(logits, targets)
        g_fast, = torch.autograd.grad(fast, logits)
        ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        g_ref, = torch.autograd.grad(ref, logits)
        assert abs(fast.item() - ref.item()) < 1e-12 * ref.item() and rel_err(g_fast, g_ref) < 1e-12
        assert (g_fast[:, -7:] == 0).all()   # ignored positions get no gradient
    nan = torch.full((1, 2, 5), float("nan"))
    assert cross_entropy(nan, torch.tensor([[1, 2]])).isnan()   # divergence stays visible (train.py stops on it)


def test_head_bf16_matmuls_round_only_inside_the_head():
    # --cpu_matmul=head-bf16 (config.setup_cpu): HeadCrossEntropy's GEMMs take bf16-rounded inputs and accumulate in
    # fp32; the process-wide setting is put back afterwards, so every other matmul of the step stays exact. fp32
    # inputs against a float64 reference: bf16 rounds each input by <= 2^-9 relative, so the loss stays within 2e-3
    # and the gradients within 2e-2 (measured ~1e-3 and ~4e-3 here); exact fp32 is ~1e-6.
    import model as M
    from config import setup_cpu
    if not hasattr(torch.backends.mkldnn, "matmul"):
        pytest.skip("needs torch >= 2.9 (torch.backends.mkldnn.matmul)")
    model = tiny_model().float().train()
    h = torch.randn(2, 40, model.args.dim, requires_grad=True)
    targets = torch.randint(0, model.args.vocab_size, (2, 40))
    h64, w64 = h.detach().double().requires_grad_(), model.head.weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).flatten(0, 1), targets.flatten())
    ref_g = torch.autograd.grad(ref, (h64, w64))
    try:
        setup_cpu("head-bf16")
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        ce = model.head_loss(h, targets, keep_logits=False)[1]
        g = torch.autograd.grad(ce, (h, model.head.weight))
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee", "the head must put the setting back"
        assert abs(ce.item() - ref.item()) < 2e-3 * ref.item()
        assert all(rel_err(a.double(), b) < 2e-2 for a, b in zip(g, ref_g))
        a, b = torch.randn(64, 64), torch.randn(64, 64)
        with M.mkldnn_fp32_precision("bf16"):
            rounded = a @ b
        rounds = rel_err(rounded, a @ b) > 1e-4   # this CPU rounds to bf16 at all (exact fp32 differs by ~1e-7)
        if rounds:   # then the head did too: its loss is not the exact fp32 one
            setup_cpu("ieee")
            exact = model.head_loss(h, targets, keep_logits=False)[1]
            assert abs(exact.item() - ref.item()) < 1e-5 * ref.item() and exact.item() != ce.item()
    finally:
        setup_cpu("ieee")
    assert M.HeadCrossEntropy.matmul_precision == "ieee"


def test_fused_head_loss_equals_the_reference(monkeypatch):
    # HeadCrossEntropy (head GEMM, softmax, CE and their gradients chunk by chunk) against the head's nn.Linear then
    # F.cross_entropy, float64, fresh random inputs, ignored (-1) targets, chunks of 64 rows over 150 rows (a short
    # last chunk); loss, logits and both gradients within 1e-12 (same maths, other order). Also a caller's own loss
    # on the returned logits (their gradient adds to the loss's), and no gradient work under no_grad.
    import model as M
    monkeypatch.setattr(M.HeadCrossEntropy, "CHUNK", 64)
    model = tiny_model().train()
    V, D = model.args.vocab_size, model.args.dim
    for scale in (1.0, 60.0):   # 60: some p[target] underflow to 0 (losses of hundreds of nats): the exact form
        h = (scale * torch.randn(3, 50, D, dtype=torch.float64)).requires_grad_()
        targets = torch.randint(0, V, (3, 50))
        targets[:, -7:] = -1
        extra = torch.randn(3, 50, V, dtype=torch.float64)   # weights of a caller's own loss on the logits
        logits, ce = model.head_loss(h, targets)
        fast = torch.autograd.grad(ce + (logits * extra).sum(), (h, model.head.weight))
        ref_logits = model.head(h)
        ref_ce = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        ref = torch.autograd.grad(ref_ce + (ref_logits * extra).sum(), (h, model.head.weight), retain_graph=True)
        assert abs(ce.item() - ref_ce.item()) < 1e-12 * ref_ce.item() and rel_err(logits, ref_logits) < 1e-12
        assert all(rel_err(a, b) < 1e-12 for a, b in zip(fast, ref))
        only_ce = torch.autograd.grad(model.head_loss(h, targets, keep_logits=False)[1], h)[0]
        assert rel_err(only_ce, torch.autograd.grad(ref_ce, h)[0]) < 1e-12 and (only_ce[:, -7:] == 0).all()
    with torch.no_grad():   # eval: the loss only
        assert model.head_loss(h, targets, keep_logits=False)[0] is None
    calls = []   # a head with hooks (dualpipe.py defers its dW through them) runs as the module, the reference
    handle = model.head.register_forward_hook(lambda *_: calls.append(1))
    assert abs(model.head_loss(h, targets)[1].item() - ref_ce.item()) < 1e-12 * ref_ce.item() and calls == [1]
    handle.remove()
    # the whole model: Transformer.forward's losses (fused head) against the reference head and loss on its trunk
    x = tokens(2, 30)
    y = torch.roll(x, -1, 1)
    _, losses = model(x, y)
    assert abs(losses["ce"].item() - M.cross_entropy(model.logits(model.trunk(x)), y).item()) < 1e-12


def test_cpu_rms_norm_equals_the_reference():
    # model.RMSNormCPU (hand-written backward) against F.rms_norm and autograd, float64, fresh random (B, T, D) input
    # and weight, a random upstream gradient; 1e-12: the same maths in another order
    from model import RMSNormCPU
    x = torch.randn(3, 7, 48, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(48, dtype=torch.float64)).requires_grad_()
    g = torch.randn(3, 7, 48, dtype=torch.float64)
    fast = RMSNormCPU.apply(x, w, 1e-6)
    ref = F.rms_norm(x, (48,), w, 1e-6)
    assert rel_err(fast, ref) < 1e-12
    for a, b in zip(torch.autograd.grad((fast * g).sum(), (x, w)), torch.autograd.grad((ref * g).sum(), (x, w))):
        assert rel_err(a, b) < 1e-12


def test_bias_update_direction_and_only_in_training():
    model = tiny_model(dtype=torch.float32)
    moe = model.moe_layers()[0]
    moe.load[:] = torch.tensor([10, 0, 5, 5, 5, 5, 5, 1])       # mean 4.5
    model.update_router_biases()
    expected = 1e-3 * torch.tensor([-1, 1, -1, -1, -1, -1, -1, 1.0])
    assert torch.allclose(moe.gate.bias, expected)
    assert moe.load.sum() == 0
    # eval-mode and no_grad forwards never accumulate load (so never move the bias)
    x = tokens(2, 16)
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    assert moe.load.sum() == 0
    model(x, torch.roll(x, -1, 1))
    assert moe.load.sum() == 2 * 16 * 2   # N tokens × K experts


def test_router_bias_update_uses_the_loads_summed_over_ranks():
    # data parallel: each rank counts its own tokens; update_router_biases(all_reduce) must move every rank's bias
    # by the rule applied to the GLOBAL load, in one collective over all layers (here: the other rank's loads
    # are added by hand, as torch.distributed.all_reduce would on two ranks)
    model = tiny_model(dtype=torch.float32)
    mine = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 1], [1, 2, 3, 4, 5, 6, 7, 8]])        # (layers, E), mean 4.5
    other = torch.tensor([[0, 10, 5, 5, 5, 5, 1, 5], [8, 7, 6, 5, 4, 3, 2, 1]])
    for moe, load in zip(model.moe_layers(), mine):
        moe.load[:] = load
    calls = []

    def all_reduce(t):   # an in-place sum over "ranks", like dist.all_reduce
        calls.append(tuple(t.shape))
        t[:2] += other
    model.update_router_biases(all_reduce=all_reduce)
    total = mine + other
    for moe, load in zip(model.moe_layers()[:2], total):
        assert torch.allclose(moe.gate.bias, 1e-3 * torch.sign(load.float().mean() - load.float()))
    assert model.moe_layers()[1].gate.bias.abs().sum() == 0   # 9 everywhere: balanced, no move
    assert calls == [(len(model.moe_layers()), 8)]              # one collective for every layer
    assert all(m.load.sum() == 0 for m in model.moe_layers())


def test_balance_loss_hand_computed_and_has_gradient():
    args = tiny_args(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                     aux_alpha=0.5)
    moe = MoE(args)
    # one sequence of 2 tokens, 4 experts, K=2
    s = torch.tensor([[[0.9, 0.5, 0.2, 0.4], [0.1, 0.8, 0.7, 0.4]]], requires_grad=True)
    idx = torch.tensor([[[0, 1], [1, 2]]])
    # f_i = N_r/(K T) * count = 4/4 * [1, 2, 1, 0]; P_i = mean_t s_i/Σ_j s_j
    P = [(0.9 / 2.0 + 0.1 / 2.0) / 2, (0.5 / 2.0 + 0.8 / 2.0) / 2, (0.2 / 2.0 + 0.7 / 2.0) / 2, (0.4 / 2 + 0.4 / 2) / 2]
    expected = 0.5 * (1 * P[0] + 2 * P[1] + 1 * P[2] + 0 * P[3])
    loss = moe.sequence_balance_loss(s, idx)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("impl, gate_impl, dtype, tol", [
    ("sorted", "topk", torch.float64, 1e-12),   # same products, another summation order: float64 rounding only
    ("grouped", "topk", torch.float32, 1e-5),   # torch._grouped_mm has no float64 kernel: float32 rounding (~1e-7)
    ("grouped", "rank", torch.float32, 1e-5),   # the fast router picks the same experts
])
def test_fast_dispatch_equals_loop(impl, gate_impl, dtype, tol):
    model = tiny_model(dtype=dtype, gate_impl=gate_impl).train()
    x = tokens(3, 16)
    model.set_impl(moe=impl)
    _, fast = model(x, torch.roll(x, -1, 1))
    fast["loss"].backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_impl(moe="loop")
    for m in model.moe_layers():
        m.gate.impl = "topk"
    _, ref = model(x, torch.roll(x, -1, 1))
    ref["loss"].backward()
    assert abs(fast["loss"].item() - ref["loss"].item()) < tol * ref["loss"].item()
    for n, p in model.named_parameters():   # same gradients for every expert weight, gate and the rest
        if p.grad is not None:
            assert rel_err(fast_grads[n], p.grad) < tol * 10, n


def test_grouped_experts_stay_fp32_under_cpu_bf16_autocast():
    # CPU bf16 autocast (--dtype=bfloat16 on a CPU): the routed experts' grouped GEMMs run in fp32 (the CPU's bf16
    # _grouped_mm is a slow loop), so their output equals the plain fp32 one; the rest of the model casts
    moe = tiny_model(dtype=torch.float32).train().moe_layers()[0]
    u = torch.randn(48, moe.gate.weight.size(1))
    g, idx, _ = moe.gate(u)
    counts = torch.bincount(idx.flatten(), minlength=moe.n_routed)
    ref = moe.routed_grouped(u, g, idx, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = moe.routed_grouped(u, g, idx, counts)
        assert moe.shared_experts(u).dtype == torch.bfloat16   # autocast is on: nn.Linear runs in bf16
    assert fast.dtype == torch.float32 and rel_err(fast, ref) < 1e-6   # fp32 rounding only (same kernel)


# --- MTP and training losses ------------------------------------------------------------

def test_mtp_target_alignment():
    # hand-made sequence 0,1,2,...: the main head at position i must predict i+1, MTP depth k predicts i+k+1
    model = tiny_model().train()
    x = torch.arange(20)[None]                   # (1, 20)
    y = torch.arange(1, 21)[None]
    y[0, -1] = -1                                # targets, last one unknown (ignored)
    _, losses = model(x, y)
    h_k = model.trunk(x)
    for k in (1, 2):
        logits_k, h_k = model.mtp_forward(k, h_k[:, :20 - k], x[:, k:])
        want = torch.arange(k + 1, 21)[None].clone()   # position i predicts token i+k+1
        want[want >= 20] = -1
        ce = F.cross_entropy(logits_k.flatten(0, 1), want.flatten(), ignore_index=-1)
        assert math.isclose(losses["mtp_k"][k - 1].item(), ce.item(), rel_tol=1e-9)
    assert math.isclose(losses["mtp"].item(), 0.3 / 2 * sum(l.item() for l in losses["mtp_k"]), rel_tol=1e-9)
    total = losses["ce"] + losses["mtp"] + losses["balance"]
    assert math.isclose(losses["loss"].item(), total.item(), rel_tol=1e-12)
    assert losses["balance"].item() > 0


def test_every_parameter_gets_a_gradient():
    model = tiny_model(dtype=torch.float32).train()
    x = tokens(4, 32)
    _, losses = model(x, torch.roll(x, -1, 1))
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    counts, maxvio = model.expert_load()
    assert counts.shape == (4, 8) and (maxvio >= 0).all()   # 2 main MoE layers + 2 MTP blocks


def test_mtp_chain_matches_equations_21_to_23():
    """A reference written from eqs. (21)-(23) alone (no MTP code): depth k reads h^{k-1} (depth 1: the main
    model's final-normed state, the checkpoint convention), h'^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1})],
    h^k = TRM_k(h'^k) is chained UN-normed, and P^k = Head(RMSNorm(h^k)). float64, so 1e-9 catches any
    difference in the function (chaining the normed state instead differs by O(1) at depth >= 2)."""
    model = tiny_model(n_mtp_depth=3).train()
    with torch.no_grad():   # norm weights away from 1: RMSNorm(RMSNorm(h)) == RMSNorm(h) when every weight is 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    T = 24
    x = tokens(2, T)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -1
    losses = model(x, y).losses
    h = model.trunk(x)                                   # main model's final-normed state, (B, T, D)

    def rms(v, w, eps=1e-6):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    h_ref, h_ours = h, h
    for k in (1, 2, 3):
        m = model.mtp[k - 1]
        emb = model.embed.weight[x[:, k:]]                                        # Emb(t_{i+k}), (B, T-k, D)
        h_in = torch.cat([rms(emb, m.enorm.weight), rms(h_ref[:, :T - k], m.hnorm.weight)], -1) @ m.eh_proj.weight.T
        h_ref = m.block(h_in, model.freqs_cis[:T - k])                            # eq. (22), (B, T-k, D)
        logits_ref = rms(h_ref, m.norm.weight) @ model.head.weight.T              # eq. (23), (B, T-k, V)
        logits, h_ours = model.mtp_forward(k, h_ours[:, :T - k], x[:, k:])
        assert rel_err(logits, logits_ref) < 1e-9, f"depth {k}: MTP logits differ from eqs. (21)-(23)"
        ce = F.cross_entropy(logits_ref.flatten(0, 1), y[:, k:].flatten(), ignore_index=-1)
        assert math.isclose(losses["mtp_k"][k - 1].item(), ce.item(), rel_tol=1e-9), f"depth {k}: training loss"


def test_warm_up_blocks_leaves_no_trace():
    # train.py runs it (to compile the Blocks) before the first step: that step must then be exactly the step of a
    # model that never ran it -- same dropout draws, router loads, balance losses and gradients
    torch.manual_seed(0)
    model = Transformer(tiny_args(dropout=0.2, n_mtp_depth=1))
    twin = copy.deepcopy(model)
    x = torch.randint(0, model.args.vocab_size, (2, 12))
    loss = {}
    for m in (model, twin):
        torch.manual_seed(7)
        if m is model:
            model.warm_up_blocks(2, 12)
            model.warm_up_blocks(3, 5)
        loss[m] = m(x, x.roll(-1, 1)).losses["loss"]
        loss[m].backward()
    assert loss[model].item() == loss[twin].item()
    for a, b in zip(model.moe_layers(), twin.moe_layers()):
        assert a.load.sum() > 0 and torch.equal(a.load, b.load)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
