"""Tests for sample.py: cached decoding against recomputation, speculative decoding against plain decoding,
the speculative-sampling rule against the distribution it must preserve, and cache rollback against a cache
that never saw the rejected tokens.

Generation tests run in float64: "same maths, different chunking" then differs by ~1e-15, far below any gap
between the two best logits, so greedy token sequences must match exactly.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

import conftest
import sample
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a text made of 4 "words" in random order: inside a word the next tokens are certain (drafts should be accepted),
# at a word boundary the next word is a uniform 4-way choice
WORDS = [[1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18]]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the maths


def tiny_args(**kw):
    return conftest.tiny_args(**{**dict(vocab_size=32, moe_inter_dim=32, max_seq_len=128, original_seq_len=128,
                                        n_mtp_depth=2), **kw})


def to_f64(model):
    for p in model.parameters():   # parameters only: the RoPE table and router bias stay fp32, as in sample.py
        p.data = p.data.double()
    return model.eval()


def word_batch(B, T, g):
    rows = []
    for _ in range(B):
        s = []
        while len(s) < T + 1:
            s += WORDS[torch.randint(len(WORDS), (1,), generator=g).item()]
        rows.append(s[:T + 1])
    x = torch.tensor(rows)                              # (B, T+1)
    return x[:, :-1], x[:, 1:]


@pytest.fixture(scope="module")
def trained():
    """A tiny model (2 MTP depths) trained for 60 AdamW steps on the word text: its CE drops from ln(32) ~ 3.5 to
    ~0.3 (= the boundary entropy ln 4 spread over ~4.5 tokens per word), so MTP drafts are mostly right. ~3 s."""
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = word_batch(16, 48, g)
        _, losses = model(x, y)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        model.update_router_biases()
    assert losses["ce"].item() < 0.6 and max(l.item() for l in losses["mtp_k"]) < 0.8, "tiny model did not train"
    return to_f64(model)


def untrained(seed=0, **kw):
    torch.manual_seed(seed)
    return to_f64(Transformer(tiny_args(init_std=0.1, **kw)))  # larger init: confident, mostly wrong drafts


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


# --- plain decoding -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_generation_equals_uncached(impl):
    model = untrained(attn_impl=impl)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    slow, _ = sample.generate(model, prompt, 30, gen(), temperature=0, use_cache=False)
    fast, _ = sample.generate(model, prompt, 30, gen(), temperature=0, use_cache=True)
    assert fast == slow
    assert len(set(fast)) > 3, "degenerate output would make the comparison weak"


def test_probs_from_logits_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    ref = logits.softmax(-1)
    assert torch.equal(sample.probs_from_logits(logits, 0), torch.tensor([[1.0, 0, 0, 0, 0]]))
    k2 = sample.probs_from_logits(logits, 1.0, top_k=2)
    assert torch.allclose(k2, torch.cat([ref[:, :2] / ref[:, :2].sum(), torch.zeros(1, 3)], 1))
    # top_p: keep the smallest prefix of the sorted probabilities whose mass reaches top_p
    p = sample.probs_from_logits(logits, 1.0, top_p=float(ref[0, :2].sum()) + 1e-3)
    assert (p[0, :3] > 0).all() and (p[0, 3:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))


# --- the speculative-sampling rule ------------------------------------------------------

@pytest.mark.parametrize("p, q", [
    ([0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]),     # draft far from target
    ([0.0, 0.6, 0.4, 0.0, 0.0], [0.3, 0.3, 0.1, 0.2, 0.1]),       # target filtered by top-k: zeros where q > 0
    ([0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]),       # identical: always accept
])
def test_acceptance_rule_preserves_target_distribution(p, q):
    p, q, N = torch.tensor([p]), torch.tensor([q]), 400_000
    g = gen(0)
    draft = sample.draw(q.expand(N, -1), g)                       # (N,) d ~ q
    accepted, tok = sample.accept_or_resample(p.expand(N, -1), q.expand(N, -1), draft, g)
    freq = torch.bincount(tok, minlength=5).double() / N
    # each frequency has std <= sqrt(0.25/N) = 7.9e-4; 4e-3 is > 5 sigma, so a correct rule fails with prob
    # < 1e-6 per entry, while the wrong rules below miss by > 0.05
    assert (freq - p[0]).abs().max() < 4e-3, f"output {freq.tolist()} != target {p[0].tolist()}"
    # acceptance rate = sum_x min(p, q)(x)
    assert abs(accepted.double().mean() - torch.minimum(p, q).sum()) < 4e-3
    if not torch.equal(p, q):   # the tolerance can tell wrong rules: the raw drafts, and resampling from p
        raw = torch.bincount(draft, minlength=5).double() / N    # instead of the residual max(0, p - q)
        assert (raw - p[0]).abs().max() > 0.05
        from_p = torch.where(accepted, draft, sample.draw(p.expand(N, -1), g))
        assert (torch.bincount(from_p, minlength=5).double() / N - p[0]).abs().max() > 0.05


def test_rejected_drafts_resample_from_the_normalized_residual():
    # accept_given races the residual weights max(0, p - q) without dividing by their sum (one pass over the
    # vocabulary): a rejected draft must still be replaced by a draw from norm(max(0, p - q)), also when that
    # mass is small (here 0.015; std per frequency <= sqrt(0.25/N) = 1.1e-3, tolerance 6e-3 > 5 sigma, while
    # racing p instead misses by > 0.3). Greedy (one-hot p and q): a rejected draft becomes argmax p, whatever the noise.
    N = 200_000
    p = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]])
    q = torch.tensor([[0.305, 0.24, 0.195, 0.15, 0.11]])              # residual (0, .01, .005, 0, 0): mass .015
    g = gen(0)
    draft = torch.zeros(N, dtype=torch.long)                           # p(0) < q(0): with u -> 1, always rejected
    u = torch.full((N,), 1.0 - 1e-7)
    ok, tok = sample.accept_given(p.expand(N, -1), q.expand(N, -1), draft, u, sample.exp_noise((N, 5), "cpu", g))
    assert not ok.any()
    want = (p - q).clamp_min(0)[0] / (p - q).clamp_min(0).sum()
    assert (torch.bincount(tok, minlength=5).double() / N - want).abs().max() < 6e-3, torch.bincount(tok) / N
    one_hot = lambda i: torch.nn.functional.one_hot(torch.tensor([i] * 8), 5).float()   # (8, 5)
    ok, tok = sample.accept_given(one_hot(3), one_hot(1), torch.full((8,), 1), torch.rand(8, generator=g),
                                  sample.exp_noise((8, 5), "cpu", g))
    assert not ok.any() and (tok == 3).all()


# --- speculative decoding ---------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_plain_trained(trained, depth):
    # a prompt inside the word text (drafts accepted) and an out-of-distribution one (drafts rejected at first)
    for prompt in ([5, 6, 7, 8, 9, 1, 2], [30, 0, 29, 31, 7, 3]):
        plain, _ = sample.generate(trained, prompt, 50, gen(), temperature=0)
        spec, st = sample.generate_speculative(trained, prompt, 50, gen(), temperature=0, depth=depth)
        assert spec == plain
        assert len(st["tried"]) == depth
        assert st["accepted"][0] > 0.8 * st["tried"][0], f"trained MTP should mostly be accepted: {st}"
        # fewer main forwards than tokens: that is the point of speculation
        assert st["forwards"] < 0.75 * len(spec)


def test_greedy_speculative_equals_plain_with_rejections():
    model = untrained()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain, _ = sample.generate(model, prompt, 40, gen(), temperature=0)
    spec, st = sample.generate_speculative(model, prompt, 40, gen(), temperature=0)
    assert spec == plain
    assert st["accepted"][0] < st["tried"][0], f"an untrained draft must get rejected sometimes: {st}"


def reference_caches(model, committed, main_len, mtp_valid):
    """Caches built from scratch over the committed tokens only: main positions 0..main_len-1 and MTP depth k
    slots 0..mtp_valid[k]-1 (depth k at position j reads h_{k-1,j} and token j+k)."""
    model.setup_cache(1, model.args.max_seq_len)
    x = torch.tensor([committed])
    with torch.no_grad():
        h = model.trunk(x[:, :main_len])                          # (1, main_len, D)
        for k, v in enumerate(mtp_valid, start=1):
            _, h = model.mtp_forward(k, h[:, :v], x[:, k:v + k])  # (1, v, D)
    return [(m.kv_cache.clone(), m.pe_cache.clone()) for m in model.attn_modules()]


@pytest.mark.parametrize("which, temperature", [("trained", 1.0), ("untrained", 1.0), ("untrained", 0.0)])
def test_caches_after_speculation_equal_caches_without_rejected_tokens(trained, which, temperature):
    model = trained if which == "trained" else untrained()
    prompt = [1, 2, 3, 4, 10, 11]
    new, st = sample.generate_speculative(model, prompt, 45, gen(3), temperature=temperature)
    # the trained model exercises acceptance, the untrained one rejection (and, with sampling, both at depth 2)
    assert sum(st["accepted"]) > 0 and (which == "trained" or sum(st["tried"]) > sum(st["accepted"])), st
    got = [(m.kv_cache.clone(), m.pe_cache.clone()) for m in model.attn_modules()]
    L = got[0][0].size(1)
    want = reference_caches(model, prompt + new, st["main_len"], st["mtp_valid"])
    assert st["main_len"] == len(prompt) + len(new) - 1   # the last token is sampled, not yet fed
    for (gk, gp), (wk, wp) in zip(got, want):
        # chunked vs one-shot prefill differ by float64 rounding (~1e-16); everything past the valid slots is 0
        for g_, w_ in ((gk, wk[:, :L]), (gp, wp[:, :L])):
            assert (g_ - w_).abs().max() < 1e-10


def test_rollback_restores_cache_bitwise():
    model = untrained()
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    m = 7
    with torch.no_grad():
        model.setup_cache(1, 16)
        h = model.trunk(x[:, :m])
        model.mtp_forward(1, h[:, :m - 1], x[:, 1:m])
        before = [(a.kv_cache.clone(), a.pe_cache.clone()) for a in model.attn_modules()]
        # write rejected positions m..m+3 (main) and m-1..m+2 (MTP), then forget them
        h2 = model.trunk(x[:, m:m + 4], start_pos=m)
        model.mtp_forward(1, h2, x[:, m:m + 4], start_pos=m - 1)
        assert not torch.equal(model.layers[0].attn.kv_cache, before[0][0])
        model.rollback_cache(m, m + 4)
        model.rollback_cache(m - 1, m + 3, depth=1)
    for a, (k, p) in zip(model.attn_modules(), before):
        assert torch.equal(a.kv_cache, k) and torch.equal(a.pe_cache, p)


def test_cache_report_counts_latent_only():
    model = Transformer(tiny_args())
    r = model.cache_report()
    assert r["mla"] == 2 * (16 + 8) * 4                 # n_layers x (Ckv + Dr) x fp32
    assert r["mha"] == 2 * 2 * (8 + 8 + 8) * 4          # n_layers x H x (Dn + Dr + Dv) x fp32
    assert r["mtp"] == 2 * (16 + 8) * 4                 # one MLA per MTP depth


# --- command line -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A checkpoint in train.py's format, with a byte-level tokenizer (256 bytes + <|endoftext|>)."""
    from data import save_tokenizer
    d = tmp_path_factory.mktemp("out")
    torch.manual_seed(0)
    args = tiny_args(vocab_size=257, max_seq_len=96, original_seq_len=96, init_std=0.1)
    model = Transformer(args)
    torch.save(dict(model=model.state_dict(), model_args=vars(args), config={}, step=7), d / "ckpt.pt")
    save_tokenizer({bytes([i]): i for i in range(256)}, str(d / "tokenizer.tiktoken"))
    return d


def test_cli_generates_and_reports(ckpt_dir, capsys):
    rc = sample.main([f"--out_dir={ckpt_dir}", "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0",
                      "--speculative=True", "--device=cpu", "--num_samples=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "(step 7)" in out and "KV cache per token: 192 bytes" in out and "MHA" in out
    assert "sample 2/2" in out and "tokens/s" in out and "acceptance" in out


@pytest.mark.parametrize("args, msg", [
    (["--out_dir=/nonexistent/dir"], "no checkpoint at /nonexistent/dir/ckpt.pt"),
    (["--temperature=hot"], "--temperature must be float"),
    (["--bogus=1"], "unknown option --bogus"),
    (["--top_kk=5"], "did you mean --top_k?"),
    (["--prompt=FILE:/nonexistent.txt"], "cannot read prompt file"),
    (["--max_new_tokens=500"], "exceeds the model's max_seq_len=96"),
    (["--speculative=True", "--draft_depth=3", "--max_new_tokens=20"], "draft depth"),
    (["--prompt=FILE:{latin1}"], "is not UTF-8 text (invalid byte at offset 3)"),
    (["--device=foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--temperature=1e999"], "--temperature and --top_p must be finite"),
    (["--prompt=" + "To be, or not to be. " * 10], "prompt (210 tokens) + max_new_tokens (200) exceeds"),
    (["--compile=True"], "--compile=True compiles the CUDA-graph steps: it needs a GPU and --graphs=True"),
])
def test_cli_bad_input_is_one_line_exit_2(ckpt_dir, capsys, tmp_path, args, msg):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    argv = [f"--out_dir={ckpt_dir}", "--device=cpu"] + [a.format(latin1=tmp_path / "latin1.txt") for a in args]
    assert sample.main(argv) == 2
    out, err = capsys.readouterr()
    assert msg in err and err.count("\n") == 1, err
    assert "To be" not in out   # a rejected prompt is not echoed first


def test_cli_uses_the_checkpoints_own_tokenizer(tmp_path, capsys):
    # train.py stores the tokenizer in the checkpoint; a tokenizer.tiktoken beside it may belong to another run
    from data import save_tokenizer
    torch.manual_seed(0)
    args = tiny_args(vocab_size=257, max_seq_len=96, original_seq_len=96, init_std=0.1)
    save_tokenizer({bytes([i]): i for i in range(256)}, str(tmp_path / "own.tiktoken"))
    own = open(tmp_path / "own.tiktoken").read()
    torch.save(dict(model=Transformer(args).state_dict(), model_args=vars(args), config={}, step=7,
                    data=dict(tokenizer=own)), tmp_path / "ckpt.pt")
    save_tokenizer({bytes([(i + 1) % 256]): i for i in range(256)}, str(tmp_path / "tokenizer.tiktoken"))  # another's
    rc = sample.main([f"--out_dir={tmp_path}", "--prompt=ROMEO:", "--max_new_tokens=3", "--device=cpu"])
    assert rc == 0 and "ROMEO:" in capsys.readouterr().out   # the file's shifted bytes would print "QNLDN9"


def test_cli_corrupt_checkpoint_exit_code(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint" * 10)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={tmp_path}", "--device=cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "cannot load checkpoint" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- static-shape steps and CUDA graphs ------------------------------------------------------

def test_static_steps_decode_the_same_tokens(trained, temperature=0.8):
    # 'static' is what a CUDA graph replays (positions as tensors, one max_seq_len cache attended with a mask):
    # the same tokens as eager decoding, plain and speculative, sampled with the same generator; and one Steps
    # serves several sequences (its cache is zeroed, not reallocated, between them)
    prompt = [5, 6, 7, 8, 9, 1, 2]
    steps = sample.Steps(trained, "static")
    for _ in range(2):
        eager, _ = sample.generate(trained, prompt, 24, gen(), temperature=temperature)
        static, _ = sample.generate(trained, prompt, 24, gen(), temperature=temperature, steps=steps)
        assert static == eager
        eager, _ = sample.generate_speculative(trained, prompt, 24, gen(), temperature=temperature)
        static, _ = sample.generate_speculative(trained, prompt, 24, gen(), temperature=temperature, steps=steps)
        assert static == eager
    assert steps.cache_len == trained.args.max_seq_len


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_whole_rounds_on_the_device_equal_the_host_loop(trained, which, monkeypatch):
    # Steps(whole=True) runs each plain step / speculative round on device buffers (the MTP window n-D..n, the
    # acceptance, the position update: what one CUDA graph replays) and reads back every READ_EVERY of them:
    # the same tokens AND the same acceptance counts, cache length and MTP validity as the host loop, greedy
    # (then equal to plain greedy decoding) and sampled; near the end of the cache (prompt 100 of max_seq_len 128)
    # and of max_new_tokens it must hand over to the host loop's shorter rounds
    monkeypatch.setattr(sample, "READ_EVERY", 5)   # several read-backs per sequence
    model = trained if which == "trained" else untrained()
    whole = sample.Steps(model, "static")
    for prompt, n_new in (([5, 6, 7, 8, 9, 1, 2], 45), ([3, 1, 4, 1, 5, 9, 2, 6] * 12 + [1, 2, 3, 4], 28)):
        for temperature in (0.0, 0.8):
            plain, _ = sample.generate(model, prompt, n_new, gen(2), temperature=temperature)
            assert sample.generate(model, prompt, n_new, gen(2), temperature=temperature, steps=whole)[0] == plain
            for depth in (1, 2):
                ref, st_ref = sample.generate_speculative(model, prompt, n_new, gen(2), temperature=temperature,
                                                          depth=depth)
                got, st = sample.generate_speculative(model, prompt, n_new, gen(2), temperature=temperature,
                                                      depth=depth, steps=whole)
                assert got == ref and st == st_ref, (depth, temperature, st, st_ref)
                assert temperature or got == plain
                assert whole.b[depth]["tried"].sum() > 0, "no round ran on the device"
    if which == "untrained":
        assert st["accepted"][0] < st["tried"][0], f"an untrained draft must get rejected sometimes: {st}"


def test_compiled_whole_steps_equal_the_host_loop(trained):
    # Steps(compile=...) torch.compiles the whole plain step / speculative round (step_core, round_core) with its
    # random numbers drawn beforehand in the host loop's order: the same tokens and acceptance counts as the host
    # loop, each step or round ONE graph (a graph break would split what inductor fuses). 'aot_eager' traces and
    # functionalizes exactly as inductor's front end does (the buffer updates, the noise) without its C++ code
    # generation (~2 min on two cores); inductor itself runs in the CUDA test below
    from torch._dynamo.utils import counters
    counters.clear()
    trained = copy.deepcopy(trained)
    trained.zero_grad(set_to_none=True)   # the fixture's fp32 grads of now-float64 weights: dynamo refuses those
    prompt = [5, 6, 7, 8, 9, 1, 2]
    steps = sample.Steps(trained, "static", compile="aot_eager")
    plain, _ = sample.generate(trained, prompt, 30, gen(2), temperature=0.8)
    assert sample.generate(trained, prompt, 30, gen(2), temperature=0.8, steps=steps)[0] == plain
    for depth in (1, 2):
        ref, st_ref = sample.generate_speculative(trained, prompt, 30, gen(2), temperature=0.8, depth=depth)
        got, st = sample.generate_speculative(trained, prompt, 30, gen(2), temperature=0.8, depth=depth, steps=steps)
        assert got == ref and st == st_ref, (depth, st, st_ref)
        assert steps.b[depth]["tried"].sum() > 0, "no round ran on the device"
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"], dict(counters["graph_break"])


def test_stacked_experts_are_the_experts_weights(trained):
    # MoE.stack_experts: the experts' weights become slices of one tensor that no-grad forwards read directly;
    # the same logits, and an in-place change of a weight (an optimizer step, load_state_dict) reaches the stack
    model = copy.deepcopy(trained)
    x = torch.tensor([[5, 6, 7, 8, 9, 1, 2]])
    with torch.no_grad():
        ref = model(x).logits
        model.set_impl(moe="grouped")   # float64 runs routed_sorted: stacked is read by routed_grouped only
        for m in model.moe_layers():
            m.stack_experts()
        assert torch.equal(model(x).logits, ref)
        moe = model.moe_layers()[0]
        moe.experts[1].w2.weight.mul_(2.0)
        assert torch.equal(moe.stacked["w2"][1], moe.experts[1].w2.weight)


def test_speculative_decoding_with_bf16_parameters(trained):
    # sample.py casts the parameters to bf16 (buffers stay fp32): the MTP block must take the embedding's dtype
    model = copy.deepcopy(trained)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    out, st = sample.generate_speculative(model, [5, 6, 7, 8, 9, 1, 2], 20, gen(), temperature=0.8)
    assert len(out) == 20 and st["tried"][0] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("whole, compiled", [(True, False), (False, False), (True, True)])
def test_cuda_graph_steps_equal_static_steps(trained, whole, compiled):
    # whole=True: one graph per plain step / speculative round, the generator's draws inside it; False: one per
    # forward; compiled: the whole step / round torch.compile'd (inductor) then captured, against the same compiled
    # code run without graphs (bf16: compiled and eager kernels round differently, the same kernels do not)
    model = copy.deepcopy(trained).cuda()   # bf16 parameters, as sample.py loads them (CUDA's _grouped_mm is bf16)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    for m in model.moe_layers():
        m.stack_experts()
    prompt = [5, 6, 7, 8, 9, 1, 2]
    g = lambda: torch.Generator(device="cuda").manual_seed(1)
    static = sample.Steps(model, "static", whole, compile=compiled)
    plain, _ = sample.generate(model, prompt, 40, g(), temperature=0.8, steps=static)
    ref, st_ref = sample.generate_speculative(model, prompt, 40, g(), temperature=0.8, steps=static)
    graphed = sample.Steps(model, "graphs", whole, compile=compiled)
    for i in range(2):   # the first run captures, the second replays
        assert sample.generate(model, prompt, 40, g(), temperature=0.8, steps=graphed)[0] == plain
        spec, st = sample.generate_speculative(model, prompt, 40, g(), temperature=0.8, steps=graphed)
        assert spec == ref and st == st_ref
        if i == 0:   # another Steps on the model in between: graphed puts its own cache back, captures nothing again
            captured = dict(graphed.graphs)
            sample.generate(model, prompt, 10, g(), temperature=0.8, steps=static)
    assert all(graphed.graphs[k] is v for k, v in captured.items())
    assert graphed.mode == "graphs" and graphed.graphs, "capture failed or nothing was captured"
    assert all(v is not None for v in graphed.graphs.values()), "a capture failed"
    assert whole == any(k[0] == "round" for k in graphed.graphs)
