"""Tests for hf.py: our models exported to transformers' DeepseekV3 give our logits (main and MTP), greedy
tokens and tokenizer ids; random transformers models imported give theirs; round trips are bit for bit; bad
input is one line and exit code 2.

Logit tolerance: max abs diff < 1e-4 in fp32. The two implementations compute the same function in a different
order (fused vs separate projections, SDPA vs matmuls, RoPE in float32 vs float64 tables), which costs ~1e-6 on
these logits (|logits| ~ 1); a wrong permutation, norm, scale or routing rule costs > 1e-2.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM, pipeline
from transformers.modeling_layers import MtpModel

import conftest
import data
import hf
import sample
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: thread hand-offs cost more than the maths


def tiny_args(**kw):   # conftest's tiny model with 3 layers, 8 experts in 4 groups, a byte vocabulary, confident logits
    return conftest.tiny_args(**{**dict(vocab_size=257, n_layers=3, n_routed_experts=8, n_expert_groups=4,
                                        n_limited_groups=2, route_scale=2.5, init_std=0.1), **kw})


def make_ckpt(d, args, seed=0):
    """A checkpoint as train.py writes it (plus non-zero router biases) with a byte-level tokenizer."""
    torch.manual_seed(seed)
    model = Transformer(args)
    for moe in model.moe_layers():
        moe.gate.bias.normal_(0, 0.05)   # a zero bias would not notice a missing or misplaced one
    os.makedirs(d, exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=vars(args), step=3), os.path.join(d, "ckpt.pt"))
    data.save_tokenizer({bytes([i]): i for i in range(256)}, os.path.join(d, "tokenizer.tiktoken"))
    return model.eval()


def run_hf(*argv):
    assert hf.main([*argv, "--verify=False"] if "--verify=True" not in argv else list(argv)) == 0


def load_hf(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def tokens(args, T=40, B=2, seed=1):
    return torch.randint(args.vocab_size, (B, min(T, args.max_seq_len)), generator=torch.Generator().manual_seed(seed))


# --- export: ours -> transformers -------------------------------------------------------------

VARIANTS = {   # YaRN on (context 64 > original 16) and off; compressed queries and not (q_lora_rank 0 -> None)
    "yarn": dict(max_seq_len=64, original_seq_len=16, rope_factor=4.0, q_lora_rank=16),
    "plain": dict(max_seq_len=64, original_seq_len=64, q_lora_rank=0),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        args = tiny_args(**kw)
        model = make_ckpt(str(d / "out"), args)
        run_hf("export", f"--out_dir={d / 'out'}", f"--hf_dir={d / 'hf'}")
        out[name] = (args, model, str(d / "hf"), load_hf(str(d / "hf")))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["naive", "absorb"])
@torch.no_grad()
def test_exported_logits_equal_ours(exported, variant, impl):
    args, model, hf_dir, hfm = exported[variant]
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["rope_parameters"]["rope_type"] == ("yarn" if variant == "yarn" else "default")
    assert (cfg["q_lora_rank"] is None) == (variant == "plain")
    model.set_impl(attn=impl)
    x = tokens(args)
    ours, _ = hf.our_logits(model, x)
    diff = (hfm(x).logits - ours).abs().max().item()
    model.set_impl(attn="naive")
    assert diff < TOL, diff


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_identical(exported, variant):
    args, model, hf_dir, hfm = exported[variant]
    prompt = [82, 79, 77, 69, 79, 58]   # "ROMEO:"
    ours, _ = sample.generate(model, prompt, 20, torch.Generator(), temperature=0.0)
    model.clear_cache()
    hfm.generation_config.eos_token_id = None   # ours does not stop at <|endoftext|> either
    theirs = hfm.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert theirs == ours


def test_pipeline_runs_on_the_exported_folder(exported):
    _, _, hf_dir, _ = exported["yarn"]
    out = pipeline("text-generation", model=hf_dir, dtype=torch.float32)("ROMEO:", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("ROMEO:") and len(out[0]["generated_text"]) > len("ROMEO:")


@torch.no_grad()
def test_mtp_layer_as_the_released_checkpoint_and_its_logits_match(exported):
    args, model, hf_dir, hfm = exported["yarn"]
    L = args.n_layers
    names = set(load_file(os.path.join(hf_dir, "model.safetensors")))
    mtp = {n.removeprefix(f"model.layers.{L}.") for n in names if n.startswith(f"model.layers.{L}.")}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
            "embed_tokens.weight", "input_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight",
            "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight",
            "mlp.shared_experts.up_proj.weight"} <= mtp
    assert not any(n.startswith(f"model.layers.{L + 1}.") for n in names)
    # transformers' own MTP loader reads the layer; its pattern list names only V3's layer 61, so point it at ours
    hfm._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]
    mtp_model = MtpModel.from_pretrained(hfm).eval()
    x = tokens(args)
    out = hfm(x, output_hidden_states=True)
    _, ours = hf.our_logits(model, x)
    # transformers places the MTP token at its own position (1..T-1); RoPE is relative, so this is the same function
    pos = torch.arange(1, x.size(1)).expand(x.size(0), -1)
    h = mtp_model.forward_layer(0, out.hidden_states[-1][:, :-1], pos, None, input_ids=x[:, 1:])
    diff = (mtp_model._project_to_logits(h) - ours).abs().max().item()
    assert diff < TOL, diff


def test_export_import_round_trip_is_bit_for_bit(exported, tmp_path):
    args, model, hf_dir, _ = exported["yarn"]
    run_hf("import", f"--hf_dir={hf_dir}", f"--out_dir={tmp_path}")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"] == vars(args)
    sd = model.state_dict()
    assert set(ckpt["model"]) == set(sd) and any(k.startswith("mtp.0.") for k in sd)
    assert all(torch.equal(ckpt["model"][k], sd[k]) for k in sd)
    assert open(tmp_path / "tokenizer.tiktoken", "rb").read() == \
        open(os.path.join(os.path.dirname(hf_dir), "out", "tokenizer.tiktoken"), "rb").read()


def test_tokenizer_encodes_the_corpus_like_ours(tmp_path):
    meta = data.prepare(None, 512)   # the Shakespeare tokenizer (cached in data_cache/, as test_train uses it)
    enc = data.load_tokenizer(meta["tokenizer"])
    hf.export_tokenizer(enc, str(tmp_path), 128)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    plays = data.shakespeare_plays()
    text = data.markdown_to_play(plays[data.VAL_PLAYS[0]])   # a whole held-out play, ~100K characters
    assert len(text) > 50_000
    ids = enc.encode_ordinary(text)
    assert tok.encode(text) == ids
    para = text[10_000:12_000] + data.EOT + "ACT II."
    assert tok.encode(para) == enc.encode(para, allowed_special="all") and enc.eot_token in tok.encode(para)
    assert tok.decode(ids) == text
    ranks, why = hf.import_tokenizer(str(tmp_path))
    assert why is None and ranks == enc._mergeable_ranks


# --- import: transformers -> ours -------------------------------------------------------------

def random_hf(path, seed=0, shard_size="5GB", **kw):
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
                q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                routed_scaling_factor=2.5, initializer_range=0.1)
    base.update(kw)
    torch.manual_seed(seed)
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**base)).eval()
    with torch.no_grad():   # non-trivial norms and router biases, so none can be dropped or swapped unnoticed
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
        for mod in m.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.05)
    m.save_pretrained(path, max_shard_size=shard_size)
    return m


HF_VARIANTS = {
    "v3-sharded": dict(shard_size="40KB"),   # several files + model.safetensors.index.json
    "no-q-lora": dict(q_lora_rank=None),
    "yarn": dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                                      beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    "rotate-half": dict(rope_interleave=False),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
@torch.no_grad()
def test_imported_random_transformers_model_gives_its_logits(variant, tmp_path, capsys):
    theirs = random_hf(str(tmp_path / "hf"), **HF_VARIANTS[variant])
    assert (len(list((tmp_path / "hf").glob("*.safetensors"))) > 1) == (variant == "v3-sharded")
    run_hf("import", f"--hf_dir={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}")
    assert "imported without MTP" in capsys.readouterr().out   # save_pretrained writes no MTP weights
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    model = Transformer(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    x = tokens(model.args)
    ref = theirs(x).logits
    for impl in ("naive", "absorb"):
        model.set_impl(attn=impl)
        diff = (hf.our_logits(model.eval(), x)[0] - ref).abs().max().item()
        assert diff < TOL, (impl, diff)
    if variant != "rotate-half":   # export(import(x)) writes every tensor of x again, bit for bit
        data.save_tokenizer({bytes([i]): i for i in range(256)}, str(tmp_path / "out" / "tokenizer.tiktoken"))
        run_hf("export", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'again'}")
        a, b = hf.read_tensors(str(tmp_path / "hf")), hf.read_tensors(str(tmp_path / "again"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- the command line: bad input, verification, sample.py and train.py from an import ----------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    random_hf(str(d / "hf"))
    return d / "hf"


def corrupt(src, dst, config=None, tensors=None):
    """A copy of the folder with config.json fields changed and tensors edited by a function (or truncated)."""
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(src / "config.json"))
    cfg.update(config or {})
    json.dump(cfg, open(dst / "config.json", "w"))
    if tensors == "truncate":
        (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
        return dst
    t = load_file(str(src / "model.safetensors"))
    save_file(tensors(t) if tensors else t, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("config, tensors, msg", [
    ({"scoring_func": "softmax", "topk_method": "greedy"}, None, "unsupported checkpoint: router scoring_func='softmax'"),
    ({"model_type": "llama"}, None, "model_type 'llama' is not 'deepseek_v3'"),
    ({"norm_topk_prob": False}, None, "norm_topk_prob=False"),
    (None, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.gate.e_score" not in k}, "1 tensor(s) missing"),
    (None, lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, "unexpected tensor(s)"),
    ({"intermediate_size": 48}, None, "shape mismatch: model.layers.0.mlp."),
    (None, lambda t: {**t, "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1)}, "FP8"),
    (None, "truncate", "cannot read"),
])
def test_import_bad_checkpoint_is_one_line_exit_2(hf_folder, tmp_path, capsys, config, tensors, msg):
    src = corrupt(hf_folder, tmp_path / "hf", config, tensors)
    assert hf.main(["import", f"--hf_dir={src}", f"--out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()   # nothing written


def test_cli_refuses_to_overwrite_and_bad_options(hf_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"precious")
    cases = [(["import", f"--hf_dir={hf_folder}", f"--out_dir={tmp_path / 'out'}"], "exists; pass --overwrite=True"),
             (["export", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'new'}"], "no tokenizer.tiktoken"),
             (["export", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={hf_folder}"], "exists and is not empty"),
             (["export", f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'x'}"], "no ckpt.pt"),
             (["export", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'out'}", "--overwrite=True"],
              "holds a ckpt.pt"),
             (["import", f"--hf_dir={hf_folder}"], "import needs --out_dir=DIR"),
             (["import", "--hf_dir=/nonexistent", "--out_dir=x"], "no config.json in /nonexistent"),
             (["import", f"--hf_dir={hf_folder}", "--out_dir=x", "--verify=maybe"], "--verify must be bool"),
             (["convert"], "usage: python hf.py export")]
    for argv, msg in cases:
        assert hf.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == b"precious"


def test_trained_model_exports_imports_samples_and_fine_tunes(tmp_path, capsys):
    """train.py -> export (verified against transformers) -> import -> sample.py and train.py --resume=True."""
    from test_train import TINY
    out, hf_dir, back = tmp_path / "out", tmp_path / "hf", tmp_path / "back"
    train = [sys.executable, "train.py", "--config", "small", *TINY, "--sample_tokens=0", "--eval_interval=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")   # a tiny model: one thread is faster on shared cores
    p = subprocess.run([*train, "--max_iters=1", f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert hf.main(["export", f"--out_dir={out}", f"--hf_dir={hf_dir}"]) == 0   # verifies against transformers
    printed = capsys.readouterr().out
    assert "transformers reproduces our logits to max abs diff" in printed and float(printed.split()[-1]) < TOL
    assert hf.main(["import", f"--hf_dir={hf_dir}", f"--out_dir={back}", "--verify=False"]) == 0
    hint = capsys.readouterr().out.split("fine-tune with: python train.py ")[1].split()   # the printed command
    assert sample.main([f"--out_dir={back}", "--prompt=ROMEO:", "--max_new_tokens=5", "--device=cpu"]) == 0
    fast = ["--max_iters=1", "--batch_size=4", "--eval_iters=2", "--sample_tokens=0", "--eval_interval=1000"]
    p = subprocess.run([sys.executable, "train.py", *hint, *fast], cwd=ROOT, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.load(back / "ckpt.pt", weights_only=True)["step"] == 1   # imported at step 0, fine-tuned one step
    data.save_tokenizer({bytes([i]): i for i in range(256)}, str(back / "tokenizer.tiktoken"))
    p = subprocess.run([*train, "--max_iters=2", f"--out_dir={back}", "--resume=True"], cwd=ROOT,
                       capture_output=True, text=True, env=env)   # token ids that would mean other text
    assert p.returncode == 2 and "differs from the tokenizer built for this data" in p.stderr, p.stderr[-2000:]
    assert torch.load(back / "ckpt.pt", weights_only=True)["step"] == 1


def test_bfloat16_export_keeps_the_router_in_fp32(tmp_path, capsys):
    make_ckpt(str(tmp_path / "out"), tiny_args())
    assert hf.main(["export", f"--out_dir={tmp_path / 'out'}", f"--hf_dir={tmp_path / 'hf'}", "--dtype=bfloat16"]) == 0
    printed = capsys.readouterr().out   # the verification compares transformers with our bf16-rounded weights
    assert float(printed.split()[-1]) < TOL, printed
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    router = {k for k in t if k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")}
    assert router and all(t[k].dtype == torch.float32 for k in router)
    assert all(t[k].dtype == torch.bfloat16 for k in set(t) - router)


def test_v3_config_maps_to_the_released_fields_and_back():
    from model import V3_ARGS
    args = ModelArgs(**V3_ARGS)
    c = hf.to_hf_config(args, 1)
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace, c.n_routed_experts, c.num_experts_per_tok,
            c.n_group, c.topk_group, c.routed_scaling_factor, c.q_lora_rank, c.kv_lora_rank,
            c.num_nextn_predict_layers) == (7168, 61, 3, 256, 8, 8, 4, 2.5, 1536, 512, 1)
    rope = c.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"], rope["mscale"],
            rope["mscale_all_dim"], rope["beta_fast"], rope["beta_slow"]) == ("yarn", 40, 4096, 1.0, 1.0, 32, 1)
    assert hf.from_hf_config(c) == args
    assert hf.hf_name("mtp.0.norm.weight", 61) == "model.layers.61.shared_head.norm.weight"
    assert hf.hf_name("layers.3.ffn.experts.255.w2.weight", 61) == "model.layers.3.mlp.experts.255.down_proj.weight"


def test_core_path_does_not_import_transformers():
    code = "import sys, model, sample, data; assert 'transformers' not in sys.modules and 'hf' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
