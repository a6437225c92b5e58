"""
Generate text from a trained checkpoint with MLA's compressed KV cache, and with the MTP modules as the draft
model of speculative decoding.

Paper: DeepSeek-V3 Technical Report (arXiv 2412.19437), sections used here:
  §2.1.1 MLA at inference: only c_kv (Ckv) and the shared RoPE key k_R (Dr) are cached per token and layer,
         and W^UK / W^UV are absorbed into the query / output ("absorb", the default)  -> generate
  §2.2 + §5.4.3 the MTP modules, otherwise dropped at inference, draft the next tokens; the main model checks
         them in one forward (85-90% acceptance of the 2nd token, 1.8x tokens/s in V3)   -> generate_speculative
  Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep a draft d ~ q with prob. min(1, p(d)/q(d)),
         else draw from norm(max(0, p - q)); the output is then distributed exactly as the main model's
         samples. Greedy decoding is the one-hot special case (keep iff argmax p == d)    -> accept_or_resample

Simplifications vs. the real thing:
  - one sequence at a time (num_samples run one after another); servers batch many, with paged caches.
  - speculation keeps every position's final hidden state per MTP depth ((D+1) x S x dim numbers, beside the
    latent cache) because the MTP modules read them; only the last ~2D positions are ever read again.
  - no sliding context: prompt + max_new_tokens must fit in max_seq_len (RoPE positions are absolute).
  - decoding one sequence of a small model is bound by Python and kernel launches, so on a GPU each whole step or
    speculative round (sampling and acceptance included) is one CUDA graph replay (Steps, --graphs=True): static
    shapes, the whole cache attended with a mask, tokens read back every READ_EVERY steps. Inside the graphs the
    time is the number of small kernels: --compile=True torch.compiles each step / round first (inductor fuses
    its element-wise work), at the price of a compile before the first token.

Run: python sample.py --out_dir=out-small --prompt="ROMEO:" --max_new_tokens=300 [--speculative=True] [--compile=True]
  (--prompt=FILE:path.txt reads the prompt from a file; the default prompt is <|endoftext|>, a new play)

Dimension legend: B batch (always 1 here), T tokens in one call, S cache positions, V vocab, D model dim (dim).
"""
import codecs
import math
import os
import sys
import time

import torch

from config import ConfigError, check_device, parse
from model import ModelArgs, Transformer


READ_EVERY = 16   # whole-step decoding (Steps.whole) reads the new tokens back once per this many steps or rounds


class SampleError(ValueError):
    """Bad input (arguments, prompt, checkpoint). The message is one line meant for the user."""


# -----------------------------------------------------------------------------
# distributions: temperature, top-k, top-p, and the speculative acceptance rule

def probs_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """logits (..., V) -> probabilities (..., V) fp32. temperature 0 = greedy: a one-hot on the argmax, so greedy
    decoding is sampling from a point mass and needs no special case in the speculative rule."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]                 # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p
        sp, order = probs.sort(-1, descending=True)                        # (..., V)
        drop = sp.cumsum(-1) - sp >= top_p                                  # mass before this token already enough
        probs = probs.scatter(-1, order, sp.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of probs (N, V) -> (N,): argmax of p / E with E ~ Exp(1), which picks x with probability
    p(x) (the exponential race). It is what torch.multinomial(probs, 1) computes, draw for draw (the same noise
    from the same generator), without the host read-back multinomial does to check its input, which a CUDA
    graph cannot contain."""
    return race(probs, exp_noise(probs.shape, probs.device, gen))


def exp_noise(shape, device, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=gen)   # Exp(1), fp32


def race(probs: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """draw with its noise e (the shape of probs) drawn beforehand: torch.compile'd code can take no generator."""
    return (probs / e).argmax(-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, gen: torch.Generator):
    """Speculative sampling for N independent drafts. p, q (N, V): target and draft probabilities (processed by
    the same temperature/top-k/top-p); draft (N,) drawn from q. Returns (accepted (N,) bool, token (N,)): the
    draft where accepted, else a draw from the residual norm(max(0, p - q)). P(token = x) = p(x) exactly:
    min(p, q)(x) from acceptance plus (1 - sum min(p, q)) * residual(x) = max(0, p - q)(x) from resampling."""
    u = torch.rand(draft.shape, generator=gen, device=p.device)            # (N,) uniforms, then the residual's noise
    return accept_given(p, q, draft, u, exp_noise(p.shape, p.device, gen))


def accept_given(p, q, draft, u: torch.Tensor, e: torch.Tensor):
    """accept_or_resample with its random numbers drawn beforehand: u (N,) ~ U(0, 1), e (N, V) ~ Exp(1)."""
    pd = p.gather(1, draft[:, None]).squeeze(1)                             # (N,) p(d)
    qd = q.gather(1, draft[:, None]).squeeze(1)                             # (N,) q(d) > 0 since d ~ q
    accepted = u * qd < pd                                                  # u < p(d)/q(d), without dividing
    # the race needs no normalized residual: argmax w(x)/E_x picks x with probability w(x) / sum(w) for any
    # weights w >= 0: one pass over the vocabulary, not a sum and then the race.
    # p == q leaves no residual (the race then picks index 0), but then every draft is accepted
    return accepted, torch.where(accepted, draft, race((p - q).clamp_min(0), e))   # (N, V) residual weights


def check_length(model: Transformer, n_prompt: int, max_new_tokens: int):
    if n_prompt < 1 or max_new_tokens < 1:
        raise SampleError(f"need a non-empty prompt and max_new_tokens >= 1 (got {n_prompt} tokens, {max_new_tokens})")
    if n_prompt + max_new_tokens > model.args.max_seq_len:
        raise SampleError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"max_seq_len={model.args.max_seq_len}")


# -----------------------------------------------------------------------------
# the model calls of decoding: eager, static-shape, or replayed from CUDA graphs

class Steps:
    """The forwards that decoding makes. The prompt runs once, eagerly (`prefill`); then every step feeds T = 1
    (or D+1 when verifying drafts) new tokens at position pos (`main`, `mtp`). One token of a small model is a few
    hundred tiny kernels, so eager decoding waits on Python and kernel launches, not on the GPU. mode:
      'eager'   positions as Python ints: the cache is read back up to pos+T (MLA.forward), shapes change each step;
      'static'  positions as (1,) device tensors: every step has the same shapes and buffers (the cache is the
                full max_seq_len, attended with a mask: MLA.write_cache_static); the reference for 'graphs';
      'graphs'  'static', captured once per (module, T) into a CUDA graph and replayed: one launch per step.
    A graph replays on the buffers it was captured with: inputs are copied into them, and the outputs it returns
    are overwritten by its next replay (callers use or copy them before that).
    whole=True (static modes): a WHOLE plain step or speculative round -- forwards, sampling, acceptance, position
    update -- runs on the device (`step`, `round`) on persistent buffers (`bufs`: the sequence, the position, the
    MTP states), so one graph replays it with no host work in between; generate reads the tokens back once
    every READ_EVERY steps or rounds. whole=False keeps one graph per forward and a read-back per step.
    compile=True (whole only): step_core / round_core torch.compile'd, then captured as above. Inductor fuses the
    element-wise work (norms, RoPE, routing, softmax, sampling) between the matmuls: fewer, larger kernels."""

    def __init__(self, model: Transformer, mode: str = "eager", whole: bool = True, compile: bool = False):
        assert mode in ("eager", "static", "graphs"), mode
        if mode == "graphs" and not model.embed.weight.is_cuda:
            mode = "eager"   # CUDA graphs need a GPU (and without them static shapes buy nothing)
        self.model, self.mode, self.graphs, self.cache_len, self.cache = model, mode, {}, 0, None
        self.dev, self.whole, self.b = model.embed.weight.device, whole and mode != "eager", {}
        self.core = dict(step=self.step_core, round=self.round_core)
        if compile and self.whole:   # one compile per (function, D, sampling); a str names the backend (tests)
            backend = compile if isinstance(compile, str) else "inductor"
            self.core = {k: torch.compile(f, dynamic=False, backend=backend) for k, f in self.core.items()}

    def reset(self, need: int) -> int:
        """A fresh (zeroed) cache for a sequence of `need` positions; returns its length. The static modes keep
        one max_seq_len cache for every sequence (the graphs hold its address)."""
        L, mods = need if self.mode == "eager" else self.model.args.max_seq_len, self.model.attn_modules()
        if self.mode != "eager" and self.cache_len == L:
            for m, buf in zip(mods, self.cache):   # ours again, if another Steps on this model replaced them
                m.latent_cache = buf
            for depth in range(len(self.model.mtp) + 1):
                self.model.rollback_cache(0, L, depth)
        else:
            self.model.setup_cache(1, L)
            self.graphs.clear()
            self.cache_len, self.cache = L, [m.latent_cache for m in mods]
        return L

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (1, P) at positions 0..P-1 -> final-normed states (1, P, D); the cache now holds them."""
        return self.model.trunk(tokens)

    def main(self, tokens: torch.Tensor, pos: int):
        """tokens (1, T) at positions pos.. -> logits (1, T, V), states (1, T, D)."""
        def fn(toks, p):
            h = self.model.trunk(toks, p)
            return self.model.logits(h), h
        return self.run(("main", tokens.size(1)), fn, (tokens,), pos)

    def mtp(self, k: int, h_prev: torch.Tensor, tokens: torch.Tensor, pos: int):
        """MTP depth k on h_prev (1, T, D) and tokens (1, T) at positions pos.. -> logits (1, T, V), h_k (1, T, D)."""
        return self.run(("mtp", k, tokens.size(1)), lambda h, toks, p: self.model.mtp_forward(k, h, toks, p),
                        (h_prev, tokens), pos)

    def run(self, key, fn, inputs, pos: int):
        if self.mode == "eager":
            return fn(*inputs, pos)
        if self.mode == "static" or key[-1] > len(self.model.mtp) + 1:   # a long one-off chunk: not worth a graph
            return fn(*inputs, torch.tensor([pos], device=self.dev))
        if key not in self.graphs:
            return self.capture(key, fn, inputs, pos)
        graph, static_in, static_pos, out = self.graphs[key]
        for buf, x in zip(static_in, inputs):
            buf.copy_(x)
        static_pos.fill_(pos)
        graph.replay()
        return out

    def capture(self, key, fn, inputs, pos: int):
        """Capture fn on static copies of its inputs (first use of this key), then replay it once."""
        try:
            static_in = [x.clone() for x in inputs]
            static_pos = torch.tensor([pos], device=self.dev)
            side = torch.cuda.Stream()    # warm up off the capture (library handles, workspaces) on a side stream;
            side.wait_stream(torch.cuda.current_stream())   # it writes this step's cache entries, as the replay will
            with torch.cuda.stream(side):
                fn(*static_in, static_pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(*static_in, static_pos)
        except RuntimeError as e:   # e.g. an op that synchronizes with the host: say so, decode without graphs
            print(f"sample.py: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); static steps instead",
                  file=sys.stderr)
            self.mode = "static"
            return fn(*inputs, torch.tensor([pos], device=self.dev))
        self.graphs[key] = (graph, static_in, static_pos, out)
        graph.replay()
        return out

    # --- whole steps and rounds on the device: no host read inside, so a graph can hold all of it ----------

    def bufs(self, D: int) -> dict:
        """Persistent buffers of whole-step decoding with D draft depths (0: plain): seq (the tokens by position,
        room for a round's overshoot), n (1,) the last position in the main cache, a (1,) drafts kept by the last
        round, tried/acc (D,) per-depth counts, hid (D+1, 1, S, dim) every depth's states (as generate_speculative's)."""
        if D not in self.b:   # kept for the Steps' life: the graphs hold their addresses
            L, dev, w = self.model.args.max_seq_len, self.dev, self.model.embed.weight
            z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)
            self.b[D] = dict(D=D, seq=z(L + D + 2), n=z(1), a=z(1), tried=z(D), acc=z(D),
                             ar=torch.arange(D + 2, device=dev), hid=w.new_zeros(D + 1, 1, L, w.size(1)) if D else None)
        return self.b[D]

    def step(self, b, sampling, gen):
        """One plain step: the token at seq[n+1] goes in at position n+1, the next one is drawn into seq[n+2].
        The random numbers are drawn first, from gen, in generate's order; step_core (torch.compile'd with
        compile=True, which can read no generator) does the rest."""
        self.core["step"](b, sampling, exp_noise((1, self.model.args.vocab_size), self.dev, gen))

    def step_core(self, b, sampling, e):
        m = self.model
        logits = m.logits(m.trunk(b["seq"][b["n"] + 1][None], b["n"] + 1))             # (1, 1, V)
        b["seq"].index_copy_(0, b["n"] + 2, race(probs_from_logits(logits[:, -1], *sampling), e))
        b["n"] += 1

    def round(self, b, sampling, gen):
        """One speculative round of generate_speculative with all D drafts, computed from device state only:
        each MTP depth k re-runs the fixed window of positions n-D..n (it covers every slot the last round left
        stale: valid[k] >= n-D; re-running valid ones rewrites the same values), so every shape is static.
        The random numbers first, in generate_speculative's order: each depth's draw, then accept_or_resample's
        uniforms and residual draws, then the draw after the last draft; round_core does the rest."""
        D, V = b["D"], self.model.args.vocab_size
        e_q = [exp_noise((1, V), self.dev, gen) for _ in range(D)]
        u = torch.rand(D, generator=gen, device=self.dev)
        self.core["round"](b, sampling, e_q, u, exp_noise((D, V), self.dev, gen), exp_noise((1, V), self.dev, gen))

    def round_core(self, b, sampling, e_q, u, e_res, e_last):
        m, D = self.model, b["D"]
        n, seq, hid, ar = b["n"], b["seq"], b["hid"], b["ar"]
        win = n - D + ar[:D + 1]                                                        # (D+1,) positions n-D..n
        drafts, qs = [], []
        for k in range(1, D + 1):   # depth k at positions n-D..n reads x_{n-D+k}..x_{n+1}, then d_1..d_{k-1}
            toks = torch.cat([seq[n - D + k + ar[:D + 2 - k]], *drafts])                # (D+1,)
            _, h_k = m.mtp_forward(k, hid[k - 1].index_select(1, win), toks[None], n - D, with_logits=False)
            hid[k].index_copy_(1, win, h_k)
            logits_k = m.logits(m.mtp[k - 1].head_input(h_k[:, -1:]))                   # (1, 1, V): the draft's row
            qs.append(probs_from_logits(logits_k[:, -1], *sampling))                     # (1, V)
            drafts.append(race(qs[-1], e_q[k - 1]))                                      # (1,)
        h = m.trunk(torch.cat([seq[n + 1], *drafts])[None], n + 1)                      # (1, D+1, dim) verify
        hid[0].index_copy_(1, n + 1 + ar[:D + 1], h)
        p = probs_from_logits(m.logits(h)[0], *sampling)                                # (D+1, V)
        ok, tok = accept_given(p[:D], torch.cat(qs), torch.cat(drafts), u, e_res)       # (D,), (D,)
        a = ok.long().cumprod(0).sum(0, keepdim=True)                                   # (1,) drafts kept
        seq.index_copy_(0, n + 2 + ar[:D + 1], torch.cat([tok, race(p[D:], e_last)]))   # committed: n+2..n+2+a
        b["tried"] += ar[:D] <= a
        b["acc"] += ar[:D] < a
        b["a"].copy_(a)
        n += 1 + a

    def replay(self, fn, b, sampling, gen):
        """Run fn (step or round) on the buffers: eagerly in 'static' mode; in 'graphs' mode the first call runs it
        eagerly (on a side stream: library handles, workspaces) and then captures it, later calls replay."""
        key = (fn.__name__, b["D"], tuple(sampling), gen)
        if self.mode == "static" or key in self.graphs and self.graphs[key] is None:   # None: capture failed
            return fn(b, sampling, gen)
        if key in self.graphs:
            return self.graphs[key].replay()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(b, sampling, gen)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            if gen is not torch.cuda.default_generators[self.dev.index or 0]:
                graph.register_generator_state(gen)   # replays draw fresh numbers from gen, as eager calls would
            with torch.cuda.graph(graph):   # records only: the buffers are not changed by the capture
                fn(b, sampling, gen)
        except RuntimeError as e:
            print(f"sample.py: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); whole steps run eagerly",
                  file=sys.stderr)
            graph = None
        self.graphs[key] = graph


# -----------------------------------------------------------------------------
# plain decoding: with the latent cache, or recomputing the whole prefix for every token

@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, gen, temperature=1.0, top_k=0, top_p=1.0,
             use_cache=True, on_token=None, steps: "Steps | None" = None):
    """Decode one sequence; prompt is a list of token ids. Returns the new token ids and a stats dict.
    steps: how the forwards run (Steps: eager by default, CUDA graphs with Steps(model, 'graphs'))."""
    check_length(model, len(prompt), max_new_tokens)
    dev = model.embed.weight.device
    seq = torch.tensor([prompt], device=dev)                                  # (1, P)
    new = []
    if not use_cache:   # the reference: the whole prefix again for every token
        model.clear_cache()
        while len(new) < max_new_tokens:
            logits = model(seq).logits                                        # (1, P+len(new), V)
            tok = draw(probs_from_logits(logits[:, -1], temperature, top_k, top_p), gen)  # (1,)
            seq = torch.cat([seq, tok[:, None]], dim=1)                       # (1, P+len(new)+1)
            new.append(tok.item())
            if on_token:
                on_token(new[-1])
        return new, dict(forwards=max_new_tokens)
    steps = steps or Steps(model)
    steps.reset(len(prompt) + max_new_tokens)
    logits = model.logits(steps.prefill(seq)[:, -1:])                         # (1, 1, V)
    if steps.whole:   # every step on the device; the tokens come back READ_EVERY at a time
        b, P = steps.bufs(0), len(prompt)
        b["seq"][:P] = seq[0]
        b["seq"][P:P + 1] = draw(probs_from_logits(logits[:, -1], temperature, top_k, top_p), gen)
        b["n"].fill_(P - 1)
        todo = 1
        while True:
            got = b["seq"][P + len(new):P + len(new) + todo].tolist()   # the one read-back per READ_EVERY steps
            new += got
            for t in got if on_token else ():
                on_token(t)
            if len(new) == max_new_tokens:
                return new, dict(forwards=max_new_tokens)
            todo = min(READ_EVERY, max_new_tokens - len(new))
            for _ in range(todo):
                steps.replay(steps.step, b, (temperature, top_k, top_p), gen)
    while True:
        tok = draw(probs_from_logits(logits[:, -1], temperature, top_k, top_p), gen)  # (1,)
        new.append(tok.item())
        if on_token:
            on_token(new[-1])
        if len(new) == max_new_tokens:
            return new, dict(forwards=max_new_tokens)
        logits, _ = steps.main(tok[:, None], len(prompt) + len(new) - 1)      # (1, 1, V)


# -----------------------------------------------------------------------------
# speculative decoding with the MTP modules as the draft model (§5.4.3)

@torch.no_grad()
def generate_speculative(model, prompt: list[int], max_new_tokens: int, gen, temperature=1.0, top_k=0, top_p=1.0,
                         depth: int = 0, on_token=None, steps: "Steps | None" = None):
    """Each round, with the main model's cache holding positions 0..n and x_{n+1} already chosen:
      1. draft: MTP depth k at position n reads h_{k-1,n} and x_{n+k} and proposes x_{n+k+1} ~ q_k (eqs. 21-23);
      2. verify: the main model reads [x_{n+1}, d_1..d_D] in ONE forward over the cached prefix, giving p at
         positions n+1..n+1+D;
      3. keep drafts left to right while accept_or_resample accepts; the first rejection is replaced by a draw
         from the residual, or, if all D are kept, the last p gives one more token: 1..D+1 tokens per forward;
      4. roll every cache back past the first rejected position.
    MTP depth k's cache slot j depends on tokens up to x_{j+k}, so slots built from drafts of this round are
    only valid up to the last accepted token; `valid[k]` counts depth k's leading slots built from committed
    tokens, and the next round re-runs depth k from there (a short chunk) before it drafts again.
    Batch size 1. depth=0 uses all MTP modules. steps: as for generate (the rule above is exact whatever runs the
    forwards). Returns the new token ids and acceptance statistics."""
    D = depth or len(model.mtp)
    if not 1 <= D <= len(model.mtp):
        raise SampleError(f"speculative decoding needs 1 <= draft depth <= n_mtp_depth={len(model.mtp)}, got {D}")
    P = len(prompt)
    check_length(model, P, max_new_tokens)
    dev, sampling = model.embed.weight.device, (temperature, top_k, top_p)
    steps = steps or Steps(model)
    # cache length: room for the last round's drafts (never more than max_seq_len positions)
    L = min(P + max_new_tokens + D, model.args.max_seq_len)
    steps.reset(L)
    b = steps.bufs(D) if steps.whole else None   # whole rounds on the device share hid with the rounds below
    hid = b["hid"] if b else model.embed.weight.new_zeros(D + 1, 1, L, model.args.dim)  # h_{k,j}: depth k, position j

    h = steps.prefill(torch.tensor([prompt], device=dev))      # prefill: (1, P, D) final-normed states
    logits = model.logits(h[:, -1:])                           # (1, 1, V)
    hid[0, :, :P] = h
    seq = list(prompt) + [draw(probs_from_logits(logits[:, -1], *sampling), gen).item()]  # x_{n+1}
    if on_token:
        on_token(seq[-1])
    n = P - 1                 # last position in the main cache
    valid = [0] * (D + 1)     # valid[k]: leading slots of MTP depth k's cache (and hid[k]) built from committed tokens
    tried, accepted, forwards = [0] * (D + 1), [0] * (D + 1), 1
    while len(seq) - P < max_new_tokens:
        # whole rounds (Steps.round: all D drafts, the MTP window n-D..n) while R of them fit in max_new_tokens
        # and the cache, whatever they accept (1..D+1 tokens each); then one read-back
        R = min(READ_EVERY, (min(max_new_tokens - 1 - D, L - P - D) - (len(seq) - P)) // (D + 1) + 1)
        if b and R > 0 and n >= D and min(valid[1:]) >= n - D:
            b["seq"][:len(seq)] = torch.tensor(seq)
            b["n"].fill_(n)
            for x in (b["tried"], b["acc"]):
                x.zero_()
            for _ in range(R):
                steps.replay(steps.round, b, sampling, gen)
            out = torch.cat([b["n"], b["a"], b["tried"], b["acc"], b["seq"][len(seq):len(seq) + R * (D + 1)]]).tolist()
            n2, a = out[:2]
            tried = [0] + [x + y for x, y in zip(tried[1:], out[2:2 + D])]
            accepted = [0] + [x + y for x, y in zip(accepted[1:], out[2 + D:2 + 2 * D])]
            valid = [0] + [min(n2 - a, n2 + 1 - k) for k in range(1, D + 1)]   # as step 4 below, for the last round
            new = out[2 + 2 * D:2 + 2 * D + n2 - n]
            n, seq, forwards = n2, seq + new, forwards + R
            for t in new if on_token else ():
                on_token(t)
            continue
        # never draft past max_new_tokens or the cache: the round writes main positions n+1..n+1+d
        d = min(D, max_new_tokens - (len(seq) - P) - 1, L - n - 2)
        # 1. draft, depth by depth; depth k first catches up on slots valid[k]..n-1 in the same chunk. The drafts
        # stay on the device (1,) tensors: the round reads nothing back until its end, so the GPU runs drafting,
        # verification and acceptance back to back (one host sync per round, as plain decoding has per token)
        drafts, qs = [], []
        for k in range(1, d + 1):
            s = valid[k]   # depth k reads x_{j+k} for j = s..n: committed up to x_{n+1}, then drafts d_1..d_{k-1}
            committed = torch.tensor(seq[s + k:n + 2], dtype=torch.long, device=dev)
            toks = torch.cat([committed, *drafts[max(0, s + k - n - 2):]])     # (n-s+1,)
            logits_k, h_k = steps.mtp(k, hid[k - 1, :, s:n + 1], toks[None], s)   # (1, n-s+1, V/D)
            hid[k, :, s:n + 1] = h_k
            qs.append(probs_from_logits(logits_k[:, -1], *sampling))            # (1, V): q_k of x_{n+k+1}
            drafts.append(draw(qs[-1], gen))                                     # (1,) d_k on the device
        # 2. verify: one main forward over [x_{n+1}, d_1..d_d] at positions n+1..n+1+d
        first = torch.tensor(seq[-1:], dtype=torch.long, device=dev)
        logits, h = steps.main(torch.cat([first, *drafts])[None], n + 1)       # (1, d+1, V/D)
        forwards += 1
        hid[0, :, n + 1:n + 2 + d] = h                                          # (1, d+1, D)
        p = probs_from_logits(logits[0], *sampling)                             # (d+1, V): p[i] of x_{n+2+i}
        # 3. accept left to right: every draft gets its own uniform and residual draw (independent, so using
        # the first rejection's residual draw is the rule of accept_or_resample); the token after d kept drafts
        # is drawn from the verify forward's last position. One read-back: [kept (d), token (d), that token (1)]
        if d:
            ok, tok = accept_or_resample(p[:d], torch.cat(qs), torch.cat(drafts), gen)   # (d,), (d,)
            out = torch.cat([ok.long(), tok, draw(p[d:d + 1], gen)]).tolist()
        else:
            out = draw(p[d:d + 1], gen).tolist()
        kept, toks_out = out[:d], out[d:]
        a = kept.index(0) if 0 in kept else d                                   # drafts kept, left to right
        for i in range(min(a + 1, d)):
            tried[i + 1] += 1
            accepted[i + 1] += i < a
        # the kept drafts (tok = draft where kept), then the first rejection's residual draw or the free token
        new = toks_out[:a + 1]
        # 4. commit; depth k's slot j (j <= n) used x_{j+k}, which is committed iff j + k <= n + 1 + a
        for k in range(1, d + 1):
            valid[k] = min(n + 1, n + 2 + a - k)
            model.rollback_cache(valid[k], n + 1, depth=k)
        model.rollback_cache(n + 2 + a, n + 2 + d)                             # rejected positions n+2+a..n+1+d
        n += 1 + a
        seq += new
        if on_token:
            for t in new:
                on_token(t)
    return seq[P:], dict(forwards=forwards, tried=tried[1:], accepted=accepted[1:], main_len=n + 1,
                         mtp_valid=valid[1:])


# -----------------------------------------------------------------------------
# checkpoint, tokenizer, command line

def load_checkpoint(out_dir: str, device: str, dtype: torch.dtype):
    """out_dir/best.pt (the weights at train.py's lowest val loss) if there is one, else out_dir/ckpt.pt (the
    last state); both hold 'model' (a state_dict), 'model_args' and the tokenizer they were trained with (a
    checkpoint from before train.py stored it, or hf.py's import, uses out_dir/tokenizer.tiktoken)."""
    import checkpoint as C
    from data import load_tokenizer, tokenizer_from_text   # here, not at the top: tests and the bench need none
    path = os.path.join(out_dir, "best.pt")
    if not os.path.isfile(path):
        path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise SampleError(f"no checkpoint at {path} (train one: python train.py --out_dir={out_dir})")
    try:
        ckpt = C.load(path, device)
        ckpt["path"] = path
    except C.CheckpointError as e:
        raise SampleError(str(e)) from None
    try:
        with torch.device(device):   # drawn on the device it runs on (its random init is overwritten next)
            model = Transformer(ModelArgs(**ckpt["model_args"]))
        # a torch.compile'd model's state_dict prefixes every key with _orig_mod.; an FP8 model has the same keys
        if "layout" in ckpt:   # written by ranks (train.py under torchrun): gather the shards of every rank
            from parallel import consolidate
            ckpt["model"] = consolidate(out_dir, device)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except Exception as e:   # unreadable file, missing keys, wrong shapes: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SampleError(f"cannot load checkpoint {path}: {type(e).__name__}: {msg[:300]}") from None
    # cast the parameters only: the buffers (RoPE table, router bias) stay fp32, as in training
    for prm in model.parameters():
        prm.data = prm.data.to(device=device, dtype=dtype)
    model.to(device).eval()
    tok_path = os.path.join(out_dir, "tokenizer.tiktoken")
    if C.tokenizer_text(ckpt) is not None:   # the checkpoint's own: a copy beside it could be another run's
        enc = tokenizer_from_text(C.tokenizer_text(ckpt), name=os.path.basename(os.path.abspath(out_dir)))
    elif os.path.isfile(tok_path):
        enc = load_tokenizer(tok_path)
    else:
        raise SampleError(f"no tokenizer in {path} and none at {tok_path}")
    if enc.n_vocab > model.args.vocab_size:
        raise SampleError(f"tokenizer has {enc.n_vocab} tokens but the model only {model.args.vocab_size}")
    return model, enc, ckpt


DEFAULTS = dict(out_dir="out", prompt="<|endoftext|>", num_samples=1, max_new_tokens=200, temperature=0.8,
                top_k=200, top_p=1.0, seed=1337, device="auto", dtype="auto", attn="absorb", speculative=False,
                draft_depth=0, graphs=True, compile=False)


def main(argv: list[str]) -> int:
    try:
        return run(parse(argv, DEFAULTS))
    except (ConfigError, SampleError) as e:   # bad input: one line, exit 2
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def run(c: dict) -> int:
    if c["temperature"] < 0 or c["top_k"] < 0 or not 0 < c["top_p"] <= 1 or c["num_samples"] < 1:
        raise SampleError("need temperature >= 0, top_k >= 0 (0 = off), 0 < top_p <= 1, num_samples >= 1")
    if not all(math.isfinite(c[k]) for k in ("temperature", "top_p")):
        raise SampleError("--temperature and --top_p must be finite")
    check_device(c["device"])
    device = ("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto" else c["device"]
    dtype = c["dtype"] if c["dtype"] != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SampleError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if c["compile"] and not (c["graphs"] and device.startswith("cuda")):
        raise SampleError("--compile=True compiles the CUDA-graph steps: it needs a GPU and --graphs=True")
    if c["attn"] not in ("naive", "absorb"):
        raise SampleError(f"--attn must be naive or absorb, got {c['attn']!r}")
    model, enc, ckpt = load_checkpoint(os.path.expanduser(c["out_dir"]), device, getattr(torch, dtype))
    model.set_impl(attn=c["attn"])
    text = c["prompt"]
    if text.startswith("FILE:"):
        try:
            text = open(text[5:], encoding="utf-8").read()
        except OSError as e:
            raise SampleError(f"cannot read prompt file {text[5:]}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise SampleError(f"prompt file {text[5:]} is not UTF-8 text (invalid byte at offset {e.start})") from None
    prompt = enc.encode(text, allowed_special={"<|endoftext|>"})
    check_length(model, len(prompt), c["max_new_tokens"])   # before anything is printed: no echo of a bad prompt
    a, n, cb = model.args, model.num_params(), model.cache_report()
    print(f"checkpoint {ckpt['path']} (step {ckpt.get('step', '?')}): {n['total'] / 1e6:.2f}M params "
          f"({n['activated'] / 1e6:.2f}M activated), {len(model.mtp)} MTP module(s); {device}, {dtype}, attn={c['attn']}")
    print(f"KV cache per token: {cb['mla']:,} bytes (MLA latent: {a.n_layers} layers x (Ckv {a.kv_lora_rank} + "
          f"Dr {a.qk_rope_head_dim}) x {cb['dtype_bytes']} B) vs {cb['mha']:,} bytes for MHA with per-head K/V "
          f"({cb['mha'] / cb['mla']:.1f}x more); MTP blocks add {cb['mtp']:,}")
    gen = torch.Generator(device=device).manual_seed(c["seed"])
    sampling = dict(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"])

    def stream(tok):
        print(utf8.decode(enc.decode_single_token_bytes(tok)), end="", flush=True)

    for moe in model.moe_layers():   # the experts' weights as one tensor each: no stacking per forward (same values)
        moe.stack_experts()
    steps = Steps(model, "graphs" if c["graphs"] else "eager", compile=c["compile"])   # --graphs=False: eager
    tokens, secs, fwd, per_sample = 0, 0.0, 0, []
    tried, acc = [0] * len(model.mtp), [0] * len(model.mtp)
    for i in range(c["num_samples"]):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")   # a token may end mid-character
        print(f"\n--------------- sample {i + 1}/{c['num_samples']}\n{text}", end="", flush=True)
        t0 = time.perf_counter()
        if c["speculative"]:
            new, st = generate_speculative(model, prompt, c["max_new_tokens"], gen, **sampling,
                                           depth=c["draft_depth"], on_token=stream, steps=steps)
            tried = [x + y for x, y in zip(tried, st["tried"])]      # zip: draft_depth may use fewer depths
            acc = [x + y for x, y in zip(acc, st["accepted"])]
        else:
            new, st = generate(model, prompt, c["max_new_tokens"], gen, **sampling, on_token=stream, steps=steps)
        per_sample.append((len(new), time.perf_counter() - t0))
        secs += per_sample[-1][1]
        tokens, fwd = tokens + len(new), fwd + st["forwards"]
    print(f"\n---------------\n{tokens} tokens in {secs:.2f} s: {tokens / secs:.1f} tokens/s "
          f"({'speculative' if c['speculative'] else 'plain'} decoding, prefill"
          f"{' and CUDA graph capture' if steps.mode == 'graphs' else ''} included)")
    if len(per_sample) > 1:   # the first sample captured the graphs; the later ones only replay them
        n, t = sum(x for x, _ in per_sample[1:]), sum(y for _, y in per_sample[1:])
        print(f"samples 2..{len(per_sample)}: {n} tokens in {t:.2f} s: {n / t:.1f} tokens/s (first sample: "
              f"{per_sample[0][0] / per_sample[0][1]:.1f} tokens/s)")
    if c["speculative"]:
        rates = ", ".join(f"depth {k}: {y}/{x} = {y / max(x, 1):.1%}" for k, (x, y) in enumerate(zip(tried, acc), 1))
        print(f"acceptance (of drafts that reached verification) {rates}; {tokens / fwd:.2f} tokens per main forward"
              " (speed against plain decoding: bench/bench_sample.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
