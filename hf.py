"""
hf.py: move a model between nanoDeepSeek and the Hugging Face `transformers` DeepseekV3 format, both ways.

  export: out_dir/ckpt.pt + tokenizer.tiktoken -> a folder that transformers (v5) loads with
          AutoModelForCausalLM / AutoTokenizer / pipeline("text-generation"): config.json, model.safetensors
          (the released DeepSeek-V3 checkpoint's tensor names, MTP module included), tokenizer.json.
  import: such a folder (ours, or any DeepseekV3ForCausalLM checkpoint we can represent) -> out_dir/ckpt.pt
          (+ tokenizer.tiktoken) that sample.py samples from and train.py fine-tunes (--resume=True).

Not part of the paper; it maps our modules (model.py, named after the official inference code) onto the names
of the released checkpoint, which transformers reads through its own conversion rules:

  ours                                  checkpoint (model.safetensors)
  embed / norm / head                   model.embed_tokens / model.norm / lm_head
  layers.i.attn_norm / ffn_norm         model.layers.i.input_layernorm / post_attention_layernorm
  attn.wq_a, q_norm, wq_b (or wq)       self_attn.q_a_proj, q_a_layernorm, q_b_proj (or q_proj)
  attn.wkv_a, kv_norm, wkv_b, wo        self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
  ffn.w1 / w3 / w2 (dense, experts.e,   mlp.gate_proj / up_proj / down_proj (mlp.experts.e.*,
    shared_experts)                       mlp.shared_experts.*)
  ffn.gate.weight / ffn.gate.bias       mlp.gate.weight / mlp.gate.e_score_correction_bias (fp32)
  mtp.k.block.*                         model.layers.{n_layers+k}.* (same names as a main layer)
  mtp.k.enorm / hnorm / eh_proj / norm  model.layers.{n_layers+k}.enorm / hnorm / eh_proj / shared_head.norm
  (shared embed and head)               model.layers.{n_layers+k}.embed_tokens / shared_head.head (copies)

RoPE needs no permutation: transformers' DeepseekV3 with rope_interleave=True (its default, and the released
config's) rotates the same interleaved pairs (x0,x1),(x2,x3),... as we do; it writes the rotated pairs out as
[evens ; odds], but q and k get the same order, so q·k is unchanged. A checkpoint with rope_interleave=False
(rotate-half pairs (x_i, x_{i+Dr/2})) is imported by permuting the rope rows of wq_b/wq and wkv_a.

What is not mapped (import says so in one line and exits 2): a softmax router or another top-k method (V2),
norm_topk_prob=False, a dense-MoE interleave (moe_layer_freq != 1), biases, GQA-style num_key_value_heads,
rms_norm_eps != 1e-6, RoPE types other than default/YaRN, YaRN with mscale != mscale_all_dim, FP8-quantized
weights (dequantize them first). Training-only fields (MTP λ, α, γ, init std) are not DeepseekV3 config fields:
export keeps them under "nanodeepseek" in config.json so that a round trip is exact; a foreign checkpoint gets
model.py's defaults. Tokenizers: ours is written as a byte-level BPE tokenizer.json; on import, a tokenizer.json
is turned back into tokenizer.tiktoken only if it is such a BPE with our pre-split (our own exports).

Transformers is imported here only: model.py, train.py and sample.py never need it.

Run: python hf.py export --out_dir=out-small --hf_dir=hf-small
     python hf.py import --hf_dir=hf-small --out_dir=out-hf        (then: python sample.py --out_dir=out-hf)
"""
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict

import torch

from config import MODEL_DEFAULTS, PRESETS, TRAIN_DEFAULTS, ConfigError, parse
from model import ModelArgs, Transformer

TRAINING_FIELDS = ("mtp_lambda", "aux_alpha", "bias_update_speed", "init_std", "attn_impl", "moe_impl")
# a fixed text with letters, digits, punctuation, whitespace runs and non-ASCII: a converted tokenizer must
# give the same ids as the original on it (and the tests check a paragraph of the corpus)
PROBE_TEXT = "ROMEO: But soft! what light through yonder window breaks?\n\n  It is the east, 1597 -- é, 日本, 😀.  \n"


class HFError(ValueError):
    """Bad input (arguments, checkpoint, an architecture we do not map). The message is one line for the user."""


# -----------------------------------------------------------------------------
# config: ModelArgs <-> DeepseekV3Config

def to_hf_config(args: ModelArgs, eot_id: int):
    from transformers import DeepseekV3Config
    if args.n_shared_experts < 1 and (args.n_dense_layers < args.n_layers or args.n_mtp_depth):
        raise HFError("transformers' DeepseekV3 always has a shared expert: n_shared_experts=0 cannot be exported")
    yarn = args.max_seq_len > args.original_seq_len   # model.py applies YaRN exactly when the context is extended
    rope = dict(rope_type="default", rope_theta=args.rope_theta)
    if yarn:
        # mscale == mscale_all_dim: cos/sin are not rescaled and the softmax scale gets mscale², as in model.py
        rope = dict(rope_type="yarn", rope_theta=args.rope_theta, factor=args.rope_factor,
                    original_max_position_embeddings=args.original_seq_len, beta_fast=args.beta_fast,
                    beta_slow=args.beta_slow, mscale=args.mscale, mscale_all_dim=args.mscale)
    return DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
        n_shared_experts=args.n_shared_experts, n_routed_experts=args.n_routed_experts,
        num_experts_per_tok=args.n_activated_experts, n_group=args.n_expert_groups,
        topk_group=args.n_limited_groups, routed_scaling_factor=args.route_scale, norm_topk_prob=True,
        first_k_dense_replace=args.n_dense_layers, q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
        max_position_embeddings=args.max_seq_len, rope_parameters=rope, rope_interleave=True,
        rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=args.n_mtp_depth,
        initializer_range=args.init_std, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None,
        # the released config's router fields (vLLM and SGLang read them; transformers assumes these values)
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
        nanodeepseek={k: getattr(args, k) for k in TRAINING_FIELDS},
    )


def from_hf_config(c) -> ModelArgs:
    """A DeepseekV3Config -> ModelArgs, or HFError naming the first thing model.py does not implement."""
    def need(ok, what):
        if not ok:
            raise HFError(f"unsupported checkpoint: {what}")
    need(getattr(c, "model_type", None) == "deepseek_v3", f"model_type {getattr(c, 'model_type', None)!r} is not "
         "'deepseek_v3'")
    need(getattr(c, "quantization_config", None) is None, "the weights are quantized (FP8?); dequantize them first")
    scoring, topk = getattr(c, "scoring_func", "sigmoid"), getattr(c, "topk_method", "noaux_tc")
    need(scoring == "sigmoid", f"router scoring_func={scoring!r} (model.py has only V3's sigmoid router)")
    need(topk == "noaux_tc", f"topk_method={topk!r} (model.py routes as V3's 'noaux_tc')")
    need(c.norm_topk_prob in (True, None), "norm_topk_prob=False (model.py always normalizes the top-k gates)")
    need(getattr(c, "moe_layer_freq", 1) == 1, "moe_layer_freq != 1 (every layer after the dense ones is MoE here)")
    need(c.hidden_act == "silu", f"hidden_act={c.hidden_act!r} (SwiGLU only)")
    need(not c.attention_bias, "attention_bias=True (model.py's projections have no biases)")
    need(c.num_key_value_heads in (None, c.num_attention_heads), "num_key_value_heads != num_attention_heads")
    need(abs(c.rms_norm_eps - 1e-6) < 1e-12, f"rms_norm_eps={c.rms_norm_eps} (model.py uses 1e-6)")
    rope = dict(c.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    need(kind in ("default", "yarn"), f"rope_type={kind!r} (default RoPE and YaRN only)")
    L = c.max_position_embeddings
    kw = dict(max_seq_len=L, original_seq_len=L, rope_theta=float(rope.get("rope_theta", 10000.0)))
    if kind == "yarn":
        orig, factor = rope["original_max_position_embeddings"], rope.get("factor")
        need(factor is not None and L > orig, f"YaRN with max_position_embeddings={L} <= original {orig} (model.py "
             "applies YaRN only to an extended context)")
        need(rope.get("attention_factor") is None and rope.get("mscale", 1.0) == rope.get("mscale_all_dim", 1.0),
             "YaRN with mscale != mscale_all_dim or an explicit attention_factor")
        need(float(rope.get("beta_fast") or 32).is_integer() and float(rope.get("beta_slow") or 1).is_integer(),
             "non-integer YaRN beta_fast/beta_slow")
        kw.update(original_seq_len=orig, rope_factor=float(factor), beta_fast=int(rope.get("beta_fast") or 32),
                  beta_slow=int(rope.get("beta_slow") or 1), mscale=float(rope.get("mscale") or 1.0))
    extra = getattr(c, "nanodeepseek", None) or {}
    kw.update({k: extra[k] for k in TRAINING_FIELDS if k in extra})
    try:
        return ModelArgs(
            vocab_size=c.vocab_size, dim=c.hidden_size, inter_dim=c.intermediate_size,
            moe_inter_dim=c.moe_intermediate_size, n_layers=c.num_hidden_layers,
            n_dense_layers=min(c.first_k_dense_replace or 0, c.num_hidden_layers), n_heads=c.num_attention_heads,
            n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
            n_activated_experts=c.num_experts_per_tok, n_expert_groups=c.n_group or 1,
            n_limited_groups=c.topk_group or 1, route_scale=float(c.routed_scaling_factor),
            q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
            n_mtp_depth=getattr(c, "num_nextn_predict_layers", 0) or 0, **kw)
    except ValueError as e:   # ModelArgs' own invariants (e.g. experts not divisible into groups)
        raise HFError(f"unsupported checkpoint: {e}") from None


# -----------------------------------------------------------------------------
# tensor names: our state_dict <-> the checkpoint's

BLOCK_NAMES = [   # (ours, checkpoint) prefixes inside one block; the first match wins
    ("attn.wq_a.", "self_attn.q_a_proj."), ("attn.q_norm.", "self_attn.q_a_layernorm."),
    ("attn.wq_b.", "self_attn.q_b_proj."), ("attn.wq.", "self_attn.q_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."), ("attn.wo.", "self_attn.o_proj."),
    ("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.", "mlp."),
]
SWIGLU = {"1": "gate_proj", "3": "up_proj", "2": "down_proj"}   # w2(silu(w1 x) * w3 x)


def _block_name(rest: str) -> str:
    for ours, theirs in BLOCK_NAMES:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    # then the SwiGLU's own Linears, in the dense FFN, each expert and the shared experts: ...w1.weight -> ...gate_proj.weight
    return re.sub(r"\.w([123])\.weight$", lambda m: f".{SWIGLU[m[1]]}.weight", "." + rest)[1:]


def hf_name(key: str, n_layers: int) -> str:
    """Our state_dict key -> the checkpoint's tensor name (import inverts it over the keys of a meta model)."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
    if key in top:
        return top[key]
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    if m:
        return f"model.layers.{m[1]}.{_block_name(m[2])}"
    m = re.match(r"mtp\.(\d+)\.(.*)", key)
    if m:   # MTP module k is the layer after the main ones: its block's names are a main layer's
        layer, rest = f"model.layers.{n_layers + int(m[1])}.", m[2]
        if rest.startswith("block."):
            return layer + _block_name(rest[len("block."):])
        return layer + ("shared_head." + rest if rest.startswith("norm.") else rest)   # enorm, hnorm, eh_proj, norm
    raise KeyError(key)


def mtp_copies(args: ModelArgs) -> dict[str, str]:
    """The released checkpoint stores the shared embedding and head again inside each MTP layer."""
    out = {}
    for k in range(args.n_mtp_depth):
        out[f"model.layers.{args.n_layers + k}.embed_tokens.weight"] = "embed.weight"
        out[f"model.layers.{args.n_layers + k}.shared_head.head.weight"] = "head.weight"
    return out


def interleave_rope_rows(w: torch.Tensor, n_heads: int, dn: int, dr: int) -> torch.Tensor:
    """Rows of a projection whose per-head outputs are [nope (dn) ; rope (dr)] in rotate-half order (pairs
    (i, i + dr/2)) -> our interleaved order (pairs (2i, 2i+1)). n_heads=1, dn=Ckv for wkv_a."""
    perm = torch.arange(dr).view(2, dr // 2).t().flatten()   # [0, dr/2, 1, dr/2+1, ...]
    w = w.view(n_heads, dn + dr, -1)
    return torch.cat([w[:, :dn], w[:, dn:][:, perm]], dim=1).flatten(0, 1)


# -----------------------------------------------------------------------------
# the one place that calls our model's forward (its return shape is model.py's business)

@torch.no_grad()
def our_logits(model: Transformer, tokens: torch.Tensor):
    """Main-model logits (B, T, V) and, with an MTP module, depth-1 logits (B, T-1, V): position i predicts
    token i+2 from the main model's final-normed h_i and the embedding of token i+1."""
    h = model.trunk(tokens)                               # (B, T, D) final-normed
    mtp = model.mtp_forward(1, h[:, :-1], tokens[:, 1:])[0] if len(model.mtp) else None
    return model.logits(h), mtp


@torch.no_grad()
def compare_with_transformers(model: Transformer, hf_dir: str, seq_len: int = 32, seed: int = 0) -> float:
    """Max |our logits - transformers' logits| on a random sequence, both fp32 (what export/import print)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(model.args.vocab_size, (1, min(seq_len, model.args.max_seq_len)),
                           generator=torch.Generator().manual_seed(seed))
    ours, _ = our_logits(model.float().eval(), tokens)
    return (ours - hf(tokens).logits.float()).abs().max().item()


# -----------------------------------------------------------------------------
# tokenizer: tiktoken ranks <-> tokenizer.json

def hf_pattern() -> str:
    # The tokenizers library runs Oniguruma, where `{1,3}+` means "one or more groups of 1-3" rather than a
    # possessive {1,3}; the possessive adds nothing there (nothing follows it in its alternative), so drop it.
    from data import PAT_STR
    return PAT_STR.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def export_tokenizer(enc, hf_dir: str, max_len: int):
    """Our byte-level BPE (tiktoken ranks) as a tokenizer.json that AutoTokenizer loads, via transformers'
    own tiktoken converter; <|endoftext|> (id = vocab size) is the special bos/eos token."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from data import EOT
    conv = TikTokenConverter(pattern=hf_pattern(), extra_special_tokens=[EOT])
    conv.load_tiktoken_bpe = lambda _: enc._mergeable_ranks   # it would read a file; we have the ranks
    tok = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), bos_token=EOT, eos_token=EOT,
                                  model_max_length=max_len)
    tok.save_pretrained(hf_dir)
    ids = tok.encode(PROBE_TEXT)
    if ids != enc.encode_ordinary(PROBE_TEXT):
        raise HFError("the converted tokenizer does not reproduce ours on the probe text")


def import_tokenizer(hf_dir: str):
    """tokenizer.json -> tiktoken ranks when it is a byte-level BPE with our pre-split and <|endoftext|> as the
    only special token, placed after the vocabulary (what export writes); else (None, reason)."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None, "no tokenizer.json"
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from data import EOT
    spec = json.load(open(path, encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    if spec.get("model", {}).get("type") != "BPE" or splits != [hf_pattern()]:
        return None, "tokenizer.json is not a byte-level BPE with our pre-split pattern"
    decode = {c: b for b, c in bytes_to_unicode().items()}
    vocab = spec["model"]["vocab"]
    ranks = {bytes(decode[ch] for ch in tok): i for tok, i in vocab.items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if sorted(ranks.values()) != list(range(len(ranks))) or specials != {EOT: len(ranks)}:
        return None, "tokenizer.json's ids are not 0..n-1 plus <|endoftext|> = n"
    from data import PAT_STR
    import tiktoken
    enc = tiktoken.Encoding("imported", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    if AutoTokenizer.from_pretrained(hf_dir).encode(PROBE_TEXT) != enc.encode_ordinary(PROBE_TEXT):
        return None, "tokenizer.json and its tiktoken conversion disagree on the probe text"
    return ranks, None


# -----------------------------------------------------------------------------
# export

def export(out_dir: str, hf_dir: str, dtype: str = "float32", overwrite: bool = False, verify: bool = True) -> str:
    from data import load_tokenizer
    import huggingface_hub
    from transformers import GenerationConfig
    ckpt_path, tok_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "tokenizer.tiktoken")
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise HFError(f"--hf_dir={hf_dir} is a file, not a folder")
    if os.path.exists(os.path.join(hf_dir, "ckpt.pt")):   # --overwrite replaces the whole folder: never a checkpoint
        raise HFError(f"{hf_dir} holds a ckpt.pt; export into another folder")
    if os.path.exists(hf_dir) and os.listdir(hf_dir) and not overwrite:
        raise HFError(f"{hf_dir} exists and is not empty; pass --overwrite=True to replace it")
    for p in (ckpt_path, tok_path):
        if not os.path.isfile(p):
            raise HFError(f"no {os.path.basename(p)} in {out_dir} (train one: python train.py --out_dir={out_dir})")
    if dtype not in ("float32", "bfloat16"):
        raise HFError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        args = ModelArgs(**ckpt["model_args"])
        sd = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    except Exception as e:
        raise HFError(f"cannot read {ckpt_path}: {type(e).__name__}: {str(e).strip()[:200]}") from None
    enc = load_tokenizer(tok_path)
    if enc.n_vocab > args.vocab_size:
        raise HFError(f"the tokenizer has {enc.n_vocab} tokens but the model only {args.vocab_size}")

    def router(key):   # the gate's centroids and bias stay fp32 (§3.3 keeps the gate in high precision)
        return key.endswith("ffn.gate.weight") or key.endswith("ffn.gate.bias")
    tensors = {}
    for key, t in sd.items():
        t = t.float() if router(key) else t.to(getattr(torch, dtype))
        tensors[hf_name(key, args.n_layers)] = t.contiguous()
    for name, key in mtp_copies(args).items():
        tensors[name] = tensors[hf_name(key, args.n_layers)].clone()   # own storage: safetensors refuses aliases

    parent = os.path.dirname(os.path.abspath(hf_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)   # everything is written here, then renamed
    try:
        config = to_hf_config(args, enc.eot_token)
        config.architectures = ["DeepseekV3ForCausalLM"]
        config.dtype = dtype
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=enc.eot_token, eos_token_id=enc.eot_token).save_pretrained(tmp)
        huggingface_hub.save_torch_state_dict(tensors, tmp, max_shard_size="5GB", metadata={"format": "pt"})
        export_tokenizer(enc, tmp, args.max_seq_len)
        report = f"wrote {hf_dir}: {len(tensors)} tensors ({dtype}), {args.n_mtp_depth} MTP layer(s), vocab {enc.n_vocab}"
        if verify:
            model = Transformer(args)
            model.load_state_dict(sd)
            if dtype == "bfloat16":   # compare against what was written
                for key, p in model.named_parameters():
                    if not router(key):
                        p.data = p.data.bfloat16().float()
            report += f"; transformers reproduces our logits to max abs diff {compare_with_transformers(model, tmp):.2e}"
        os.chmod(tmp, 0o755)   # mkdtemp made it private; the export is an ordinary folder
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o644)
        _replace_dir(tmp, hf_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _replace_dir(tmp: str, dst: str):
    old = None
    if os.path.exists(dst):
        old = dst.rstrip("/") + ".old-hf"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# import

def read_tensors(hf_dir: str) -> dict:
    """Every tensor of the folder's safetensors files (one file or shards), by name."""
    from safetensors import safe_open
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):   # shards: the index names the files (a stray .safetensors is not read)
        files = sorted({os.path.join(hf_dir, f) for f in json.load(open(index))["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise HFError(f"no .safetensors files in {hf_dir}")
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    out[name] = st.get_tensor(name)
        except Exception as e:   # a missing shard, a truncated file
            raise HFError(f"cannot read {f}: {type(e).__name__}: {str(e).strip()[:200]}") from None
    # a checkpoint saved with the experts fused (transformers' in-memory layout): split them per expert
    for name in [n for n in out if n.endswith("mlp.experts.gate_up_proj")]:
        gate_up, down, prefix = out.pop(name), out.pop(name.replace("gate_up_proj", "down_proj")), name[:-len("gate_up_proj")]
        for e in range(gate_up.size(0)):
            gate, up = gate_up[e].chunk(2, dim=0)          # (2I, D): gate rows first, as transformers splits it
            out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
            out[f"{prefix}{e}.down_proj.weight"] = down[e]
    return out


def _names(names, n=3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_hf(hf_dir: str):
    """A DeepseekV3 folder -> (ModelArgs, our state_dict, notes). Raises HFError for anything we cannot map."""
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise HFError(f"no config.json in {hf_dir}")
    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except Exception as e:
        raise HFError(f"cannot read {hf_dir}/config.json: {type(e).__name__}: {str(e).strip()[:200]}") from None
    args = from_hf_config(config)
    tensors = read_tensors(hf_dir)
    if any(n.endswith("_scale_inv") or n.endswith(".scale") for n in tensors):
        raise HFError("unsupported checkpoint: FP8 weights with scales; dequantize them first")
    notes = []
    L = args.n_layers
    mtp_layers = sorted({int(m[1]) for n in tensors if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= L})
    if not mtp_layers and args.n_mtp_depth:   # e.g. saved by DeepseekV3ForCausalLM.save_pretrained: no MTP weights
        notes.append(f"config has {args.n_mtp_depth} MTP layer(s) but the weights have none: imported without MTP")
        args.n_mtp_depth = 0
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    expected = {hf_name(k, L): k for k in shapes}
    copies = mtp_copies(args)
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected) - set(copies)
    if missing:
        raise HFError(f"{len(missing)} tensor(s) missing from {hf_dir}: {_names(missing)}")
    if unexpected:
        raise HFError(f"{len(unexpected)} unexpected tensor(s) in {hf_dir}: {_names(unexpected)}")
    for name, key in expected.items():
        if tuple(tensors[name].shape) != tuple(shapes[key]):
            raise HFError(f"shape mismatch: {name} is {tuple(tensors[name].shape)} in the file, the config implies "
                          f"{tuple(shapes[key])}")
    for name, key in copies.items():   # we share embedding and head with the MTP modules, so copies must agree
        if name in tensors and not torch.equal(tensors[name], tensors[hf_name(key, L)]):
            raise HFError(f"{name} differs from {hf_name(key, L)} (nanoDeepSeek shares them)")
    sd = {key: tensors[name].float() for name, key in expected.items()}   # fp32 master weights, as train.py keeps
    if not getattr(config, "rope_interleave", True):
        H, Dn, Dr, C = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
        for key in sd:
            if key.endswith("attn.wq_b.weight") or key.endswith("attn.wq.weight"):
                sd[key] = interleave_rope_rows(sd[key], H, Dn, Dr)
            elif key.endswith("attn.wkv_a.weight"):
                sd[key] = interleave_rope_rows(sd[key], 1, C, Dr)
        notes.append("rope_interleave=False: permuted the rope rows of wq_b/wq and wkv_a to interleaved pairs")
    return args, sd, notes


def import_(hf_dir: str, out_dir: str, overwrite: bool = False, verify: bool = True) -> str:
    from data import save_tokenizer
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path) and not overwrite:
        raise HFError(f"{ckpt_path} exists; pass --overwrite=True to replace it")
    args, sd, notes = load_hf(hf_dir)
    model = Transformer(args)
    model.load_state_dict(sd)
    ranks, why = import_tokenizer(hf_dir)
    report = [f"imported {hf_dir}: {model.num_params()['total'] / 1e6:.2f}M params, {args.n_layers} layers, "
              f"{args.n_mtp_depth} MTP module(s)"] + notes
    if verify:
        report.append(f"transformers reproduces our logits to max abs diff {compare_with_transformers(model, hf_dir):.2e}")
    os.makedirs(out_dir, exist_ok=True)
    if ranks is not None:
        save_tokenizer(ranks, os.path.join(out_dir, "tokenizer.tiktoken"))
    else:
        report.append(f"tokenizer not converted ({why}): sample.py needs {out_dir}/tokenizer.tiktoken")
    # train.py's checkpoint without optimizer state: train.py --resume=True starts fine-tuning at step 0
    ckpt = dict(model=model.state_dict(), model_args=asdict(args), step=0, best_val=float("inf"),
                config=dict(source=os.path.abspath(hf_dir)))
    torch.save(ckpt, ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)   # atomic: never half a checkpoint
    small = {**TRAIN_DEFAULTS, **MODEL_DEFAULTS, **PRESETS["small"]}   # train.py's default preset
    flags = [f"--{k}={v}" for k, v in asdict(args).items() if small[k] != v]
    if small["seq_len"] > args.max_seq_len:
        flags.append(f"--seq_len={args.max_seq_len}")
    report.append(f"wrote {ckpt_path}; fine-tune with: python train.py --out_dir={out_dir} --resume=True " +
                  " ".join(flags))
    return "\n".join(report)


# -----------------------------------------------------------------------------
# command line

OPTIONS = {
    "export": dict(out_dir=None, hf_dir=None, dtype="float32", overwrite=False, verify=True),
    "import": dict(hf_dir=None, out_dir=None, overwrite=False, verify=True),
}


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """`export|import` then config.py's --key=value grammar (the same as train.py's and sample.py's)."""
    if not argv or argv[0] not in OPTIONS:
        raise HFError("usage: python hf.py export --out_dir=DIR --hf_dir=DIR | import --hf_dir=DIR --out_dir=DIR")
    cmd, cfg = argv[0], parse(argv[1:], OPTIONS[argv[0]])
    for key in ("out_dir", "hf_dir"):
        if not cfg[key]:
            raise HFError(f"{cmd} needs --{key}=DIR")
    return cmd, cfg


def main(argv: list[str]) -> int:
    try:
        cmd, cfg = parse_args(argv)
        from transformers.utils import logging
        logging.set_verbosity_error()   # transformers would warn that model.layers.{n_layers}.* (MTP) is unused
        logging.disable_progress_bar()
        print(export(**cfg) if cmd == "export" else import_(**cfg))
        return 0
    except (HFError, ConfigError) as e:
        print(f"hf.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
