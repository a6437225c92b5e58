"""The check shared by tests/test_dualpipe.py and dualpipe_demo.py: a tiny DeepSeek-V3 and its ordinary
(non-pipelined) forward/backward, against which a pipeline schedule's losses and gradients are compared."""
import torch
import torch.nn as nn

from model import ModelArgs, Transformer


def grad_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    # the official examples' check: 1 - 2<x,y>/(|x|^2+|y|^2), 0 iff x == y (direction and norm at once)
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum().item()
    return 0.0 if den == 0 else 1 - 2 * (x * y).sum().item() / den


def tiny_setup(pp: int, nmb: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
               bm: int = 2, seq: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny DeepSeek-V3 (MLA + MoE, 2 Blocks per stage) and N micro-batches of random tokens, (N, Bm, T)."""
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2 * pp, n_dense_layers=1,
                     n_heads=2, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                     n_limited_groups=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, max_seq_len=16, original_seq_len=16, n_mtp_depth=0, aux_alpha=0.0,
                     init_std=0.1, attn_impl="naive",   # naive: wkv_b is used only through its nn.Linear
                     moe_impl="sorted")   # sorted: each expert is nn.Linear calls, so W defers the experts' dW too
    model = Transformer(args).to(device=device, dtype=dtype)
    tokens = torch.randint(0, args.vocab_size, (nmb, bm, seq), device=device)
    return model, tokens, torch.randint(0, args.vocab_size, (nmb, bm, seq), device=device)


def check_against_reference(model: nn.Module, losses: torch.Tensor, grads: dict[str, torch.Tensor],
                            tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Ordinary training on the untouched model, one micro-batch after another, gradients summed.
    Returns (max |loss - reference|, max grad_diff over all parameters)."""
    model.zero_grad(set_to_none=True)
    ref = []
    for tok, tgt in zip(tokens, targets):
        _, l = model(tok, tgt)
        l["loss"].backward()             # = ce exactly: aux_alpha = 0 and no MTP add exact zeros
        ref.append(l["ce"].detach())
    zero = torch.zeros((), device=tokens.device)
    return ((torch.stack(ref) - losses).abs().max().item(),
            max(grad_diff(zero.expand_as(p) if p.grad is None else p.grad, grads.get(n, zero.expand_as(p)))
                for n, p in model.named_parameters()))
