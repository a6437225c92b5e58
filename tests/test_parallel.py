"""parallel.py on CPU ranks (gloo, spawned processes): DP, EP and PP each give the losses and gradients of one
process on the same global batch; layouts; the dry-run accounting. train.py's own distributed runs
(save/resume, bad layouts) are in tests/test_train.py."""
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel as P
from model import ModelArgs, Transformer

# float64 on both sides, so the order of the reductions is the only difference: relative errors ~1e-15 here
# (a wrong scale, a missing replica or a lost token gives 1e-2 or more); fp32 would need ~1e-5 and could
# flip a near-tie of the router between the two runs
TOL = 1e-10
TINY = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=4, n_dense_layers=1, n_heads=2,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            max_seq_len=16, original_seq_len=16, n_mtp_depth=1, init_std=0.1, bias_update_speed=0.01)
GLOBAL_B, T, STEPS, LR = 8, 12, 2, 1e-2


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(seed=0, dead_expert=False):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY)).double()
    if dead_expert:   # the router never picks expert 13 (on EP rank 1): its selection bias is hopeless
        for moe in model.moe_layers():
            moe.gate.bias[13] = -1e3
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, TINY["vocab_size"], (STEPS, GLOBAL_B, T), generator=g)
    return model, x, torch.randint(0, TINY["vocab_size"], (STEPS, GLOBAL_B, T), generator=g)


@functools.lru_cache
def reference(dead_expert=False):
    """One process, the whole global batch: losses per step, gradients of step 1, router biases at the end."""
    model, x, y = make(dead_expert=dead_expert)
    opt = P.Optimizer(model, None, torch.optim.AdamW, zero=False, weight_decay=0.1, lr=LR, betas=(0.9, 0.95))
    losses, grads = [], None
    for i in range(STEPS):
        _, l = model(x[i], y[i])
        l["loss"].backward()
        losses.append(l["loss"].detach())
        if grads is None:
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
    return torch.stack(losses), grads, {n: b for n, b in model.named_buffers() if n.endswith("gate.bias")}


CASES = {"dp2": (P.Layout(dp=2), False), "ep2": (P.Layout(ep=2), False),
         "ep2-expert-without-tokens": (P.Layout(ep=2), True), "pp2": (P.Layout(pp=2), False)}


def _run_case(rank, tmp, name, layout, dead_expert):
    groups = P.Groups(layout, rank)
    model, x, y = make(dead_expert=dead_expert)
    P.shard_experts(model, groups)
    nmb = 2 * layout.pp if layout.pp > 1 else 1
    pipe = P.Pipeline(model, groups, nmb) if layout.pp > 1 else None
    step_model = P.data_parallel(model, groups) if pipe is None else model
    opt = P.Optimizer(model, groups, torch.optim.AdamW, zero=True, weight_decay=0.1, lr=LR, betas=(0.9, 0.95))
    b = GLOBAL_B // groups.batch_ranks                     # this rank's slice of the global batch
    losses, grads = [], None
    for i in range(STEPS):
        xs = x[i, groups.batch_rank * b:(groups.batch_rank + 1) * b]
        ys = y[i, groups.batch_rank * b:(groups.batch_rank + 1) * b]
        if pipe is not None:   # micro-batches of the rank's slice, the loss of the slice is their mean
            loss = pipe.step(xs.view(nmb, -1, T), ys.view(nmb, -1, T))["loss"]
        else:
            _, l = step_model(xs, ys)
            l["loss"].backward()
            loss = l["loss"].detach()
        dist.all_reduce(loss, group=groups.replicas)       # mean over the batch ranks: the global loss
        losses.append(loss / dist.get_world_size(groups.replicas))
        P.sync_grads(model, groups, ddp=step_model is not model)
        if grads is None:
            grads = {P.global_name(n, groups.e, TINY["n_routed_experts"] // layout.ep): p.grad.clone()
                     for n, p in model.named_parameters()}
        P.clip_grad_norm(model, groups, 1.0)
        opt.step()
        opt.zero_grad()
        model.update_router_biases(all_reduce=lambda t: dist.all_reduce(t, group=groups.replicas))
    stats = next((m.ep.stats for m in model.moe_layers() if m.ep is not None), None)
    torch.save(dict(losses=torch.stack(losses), grads=grads, stats=stats, state_bytes=opt.local_state_bytes(),
                    biases={n: b for n, b in model.named_buffers() if n.endswith("gate.bias")}),
               os.path.join(tmp, f"{name}-rank{rank}.pt"))


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    for name, (layout, dead) in CASES.items():
        _run_case(rank, tmp, name, layout, dead)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """ONE spawn of 2 gloo ranks runs every case (process start-up dominates the time on 2 cores)."""
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2)
    return lambda name: [torch.load(tmp / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_same_losses_and_gradients_as_one_process(two_ranks, name):
    layout, dead = CASES[name]
    ref_losses, ref_grads, ref_biases = reference(dead)
    ranks = two_ranks(name)
    for r, out in enumerate(ranks):
        assert rel(out["losses"], ref_losses) < TOL, (r, out["losses"], ref_losses)
        assert out["grads"], r
        for n, g in out["grads"].items():    # every parameter this rank holds, by its unsharded name
            assert rel(g, ref_grads[n]) < TOL, (r, n, rel(g, ref_grads[n]))
        for n, b in out["biases"].items():   # router biases moved by the globally summed loads
            assert torch.equal(b, ref_biases[n]), (r, n)
    held = set().union(*(o["grads"] for o in ranks))
    assert held == set(ref_grads)            # together the ranks hold the whole model
    if dead:   # expert 13 (on EP rank 1) received no token, yet has a zero gradient, not a missing one
        g5 = [g for n, g in ranks[1]["grads"].items() if ".experts.13." in n]
        assert g5 and all(g.abs().max() == 0 for g in g5)
    if layout.ep > 1:   # group-limited routing mapped to ranks: a token reaches at most n_limited_groups ranks
        assert all(0 < o["stats"]["max_ranks"] <= TINY["n_limited_groups"] for o in ranks)
        assert all(o["stats"]["rows"] < TINY["n_activated_experts"] * o["stats"]["tokens"] for o in ranks)


def test_dry_run_accounts_for_every_parameter_once():
    # PP4 x DP2 x EP2 on the tiny model: the pipeline ranks' shares, with experts times EP and the DualPipe
    # mirror halved, add up to the whole model; ZeRO-1 divides the optimizer state by the replica counts
    from dualpipe import program, schedule_dualpipe
    args, L = ModelArgs(**TINY), P.Layout(pp=4, dp=2, ep=2)
    report, rows = P.dry_run(args, L, batch=2, seq=T, nmb=8)
    n = Transformer(args).num_params()
    assert sum(r["dense"] + r["expert"] * L.ep for r in rows) / 2 == n["total"] + n["mtp"]
    assert [r["stages"] for r in rows] == [[0, 3], [1, 2], [1, 2], [0, 3]]
    for r in rows:
        assert r["optim"] == pytest.approx(8 * (r["dense"] / (2 * 2 * 2) + r["expert"] / (2 * 2)))
        assert r["optim_unsharded"] == 8 * (r["dense"] + r["expert"]) and r["params"] == r["grads"]
        assert r["act_peak"] == 4 + 1                     # Table 2: PP+1 micro-batch-stages on every rank
        sends = sum(1 for rank, a in program(schedule_dualpipe(4, 8)) if rank == r["rank"] and a[0] == "send")
        assert r["pp"] == sends * 4 * 2 * T * args.dim    # one (Bm, T, D) fp32 tensor per message
        assert r["ep"] > 0 and r["dp"] > 0 and r["zero"] > 0
    assert "PP4 x DP2 x EP2 = 16 ranks" in report


@pytest.mark.parametrize("kw, world, message", [
    (dict(dp=2), 1, "= 2 ranks, but the world has 1"),
    (dict(ep=3), 3, "--ep=3 must divide n_routed_experts=16"),
    (dict(pp=3), 3, "--pp=3 must be even"),
    (dict(ep=8), 8, "must divide one another"),          # 6 expert groups over 8 ranks
])
def test_bad_layouts(kw, world, message):
    args = ModelArgs(**{**TINY, "n_expert_groups": 4 if kw.get("ep") != 8 else 2 * 3, "n_routed_experts": 16 if
                        kw.get("ep") != 8 else 24})
    with pytest.raises(P.LayoutError, match=message.replace("(", r"\(").replace("+", r"\+")):
        P.check_layout(P.Layout(**kw), args, world, nmb=4)
