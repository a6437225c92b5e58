"""Shared by every test file: the repository root on sys.path, the `one_thread` fixture, the tiny model config."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelArgs  # noqa: E402  (needs the path above)

# The tiny DeepSeek-V3 of the unit tests: MLA with a query latent, 1 dense + 1 MoE block (4 experts in 2 groups,
# 2 active, 1 shared), one MTP module. Tests override what they exercise (e.g. tiny_args(n_mtp_depth=2)).
TINY = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
            n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            max_seq_len=64, original_seq_len=64, n_mtp_depth=1, init_std=0.02)


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY, **overrides})


@pytest.fixture
def one_thread():
    # tiny matmuls: a second intra-op thread buys nothing, and on a shared 2-core machine its spinning made single
    # runs stall for up to 30 s and whole files run 2-5x slower (measured); restored for the other test files
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
