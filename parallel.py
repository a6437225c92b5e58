"""
Scale-out machinery for train.py: how DeepSeek-V3's parameters, tokens and gradients are spread over ranks.

Paper: DeepSeek-V3 Technical Report (arXiv 2412.19437), §3.2 "Training Framework": 16-way pipeline parallelism
with DualPipe (§3.2.1), 64-way expert parallelism over 8 nodes with node-limited all-to-all dispatch (§3.2.2,
§2.1.2), ZeRO-1 data parallelism; §2.1.2's router-bias update needs the load of every token in the step.

  Layout               world = PP x DP x EP ranks; which rank holds what, and the process groups
  ExpertParallel       the routed experts of an MoE layer sharded over the EP group: dispatch the tokens to the
                       ranks holding their experts with all_to_all_single (variable splits), run the local
                       experts, combine with the reverse all_to_all. Group-limited routing maps to ranks: a
                       token reaches at most n_limited_groups ranks (whole expert groups live on one rank).
  data_parallel        DDP for the non-expert parameters (bucketed all-reduce overlapped with the backward),
                       the experts' gradients reduced only across their data-parallel replicas
  Optimizer            ZeRO-1: torch's ZeroRedundancyOptimizer, one per replica group (dense / experts)
  clip_grad_norm       the global gradient norm over all shards, each parameter counted once
                       (router biases: model.update_router_biases sums the loads over groups.replicas)
  Pipeline             dualpipe.py's DualPipe executor on the real model: rank r runs stage r (direction 0)
                       and stage PP-1-r (direction 1); embedding on the first stage, head + MTP + losses on the last
  dry_run              per-rank memory and per-step communication of a layout, without any rank

Why DDP + ZeroRedundancyOptimizer (and not FSDP2): ZeRO-1 is what the paper uses, and it keeps every rank's
parameters whole, so the EP all-to-all, the pipeline stages and the FP8 Linears see plain tensors. FSDP2 would
shard the parameters too (ZeRO-3): less memory, but an all-gather per layer per micro-batch, which V3 avoids
by holding each stage's few layers whole (the dry run: at most 21 GiB of FP32 weights per GPU on its layout). DDP cannot see the gradients DualPipe's
W phase writes by hand (dW = gᵀx outside autograd), so with --pp > 1 the same reduction runs after the
pipeline's last W, one flat all-reduce per replica group.

Simplifications vs. the real thing:
  - every rank builds the whole model on the CPU with the same seed (identical initial weights), then keeps its
    shard: fine up to a few billion parameters, not for 671B (the dry run accounts for that one);
  - dispatch and combine send fp32/bf16 rows (the paper dispatches FP8 1x128 tiles, §3.3.3); no
    IB -> NVLink two-hop forwarding, no warp-specialized comm kernels, no overlap of the all-to-all with compute;
  - the experts' gradient all-reduce runs after the backward (DDP overlaps only the dense one);
  - no tensor parallelism, no DualPipeV, no recomputation of RMSNorm/MLA up-projections (§3.2.3).

Run: torchrun --nproc_per_node=4 train.py --config small --device=cpu --dp=1 --ep=2 --pp=2
     python train.py --config v3 --dry_run=True --pp=16 --ep=64 --dp=2

Legend: rank = (s*DP + d)*EP + e with s the pipeline rank, d the data-parallel index, e the expert-parallel index;
N tokens on this rank, D model dim, K active experts, E routed experts, El = E/EP experts per rank,
S rows sent (token, destination rank), R rows received.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import dualpipe as DP
from model import cross_entropy


# -----------------------------------------------------------------------------
# 1. Layout: which rank holds what

class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(s, d, e) of a global rank: EP innermost, so an EP group is a block of consecutive ranks (one node)."""
        return rank // (self.dp * self.ep), rank // self.ep % self.dp, rank % self.ep

    def rank(self, s: int, d: int, e: int) -> int:
        return (s * self.dp + d) * self.ep + e

    def mirror(self, s: int) -> list[int]:
        # DualPipe: pipeline ranks s and PP-1-s hold the same two stages (Table 2's 2x parameters)
        return sorted({s, self.pp - 1 - s}) if self.pp > 1 else [s]

    def __str__(self) -> str:
        return f"PP{self.pp} x DP{self.dp} x EP{self.ep} = {self.world} ranks"


def check_layout(layout: Layout, args, world: int | None, nmb: int) -> None:
    """Raise LayoutError (one line) for a layout these ranks and this model cannot run. world=None: dry run."""
    for k in ("pp", "dp", "ep"):
        if getattr(layout, k) < 1:
            raise LayoutError(f"--{k} must be >= 1, got {getattr(layout, k)}")
    E, G = args.n_routed_experts, args.n_expert_groups
    if layout.ep > 1 and E % layout.ep:
        raise LayoutError(f"--ep={layout.ep} must divide n_routed_experts={E}")
    if layout.ep > 1 and G % layout.ep and layout.ep % G:
        raise LayoutError(f"--ep={layout.ep} and n_expert_groups={G} must divide one another (whole groups per "
                          f"rank, or whole ranks per group) for group-limited routing to map to ranks")
    if layout.pp > 1:
        if layout.pp % 2:
            raise LayoutError(f"--pp={layout.pp} must be even: DualPipe pairs pipeline rank r with PP-1-r")
        if args.n_layers < layout.pp:
            raise LayoutError(f"--pp={layout.pp} needs at least one layer per stage, n_layers={args.n_layers}")
        if nmb % 2 or nmb < 2 * layout.pp:
            raise LayoutError(f"--pp={layout.pp} needs --grad_accum (micro-batches per step) even and >= 2*pp = "
                              f"{2 * layout.pp}, got {nmb}")
    if world is not None and layout.world != world:
        raise LayoutError(f"--pp={layout.pp} x --dp={layout.dp} x --ep={layout.ep} = {layout.world} ranks, but "
                          f"the world has {world} (torchrun --nproc_per_node={layout.world} ...)")


class Groups:
    """The process groups of one rank. Every rank creates every group (torch.distributed requires it)."""

    def __init__(self, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self.s, self.d, self.e = layout.coords(rank)
        L, P, Dn, En = layout, range(layout.pp), range(layout.dp), range(layout.ep)
        self.ep = self.replicas = self.expert_replicas = self.pipe = None
        mirrors = sorted({tuple(L.mirror(s)) for s in P})
        for d in Dn:                                             # one pipeline: every stage of one (d, e)
            for e in En:
                g = dist.new_group([L.rank(s, d, e) for s in P])
                if (d, e) == (self.d, self.e):
                    self.pipe, self.pipe_ranks = g, [L.rank(s, d, e) for s in P]
        for s in P:                                              # EP: same stage and replica, every expert shard
            for d in Dn:
                g = dist.new_group([L.rank(s, d, e) for e in En])
                if (s, d) == (self.s, self.d):
                    self.ep = g
        for m in mirrors:                                        # every rank holding the same dense weights
            g = dist.new_group([L.rank(s, d, e) for s in m for d in Dn for e in En])
            if self.s in m:
                self.replicas = g
            for e in En:                                         # ... and the same experts
                g = dist.new_group([L.rank(s, d, e) for s in m for d in Dn])
                if self.s in m and e == self.e:
                    self.expert_replicas = g
        self.batch_rank = self.d * layout.ep + self.e            # which slice of the global batch this rank reads
        self.batch_ranks = layout.dp * layout.ep


# -----------------------------------------------------------------------------
# 2. Expert parallelism: all-to-all dispatch and combine (§3.2.2)

class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its backward is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _AllToAll.apply(g, ctx.send, ctx.recv, ctx.group), None, None, None


class ExpertParallel:
    """MoE.forward hands its routed part here when model.py's `moe.ep` is set. Rank e of the EP group holds
    experts [e*El, (e+1)*El); expert groups are contiguous ranges of expert ids, so with EP <= G each rank holds
    whole groups and group-limited routing (top-M groups) sends a token to at most M ranks."""

    def __init__(self, group, n_experts: int):
        self.group, self.ep, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.per_rank = n_experts // self.ep
        self.stats = dict(rows=0, tokens=0, max_ranks=None)   # rows sent, tokens, most ranks one token reached

    def __deepcopy__(self, memo):   # a process group is not copied with the module that uses it
        return self

    @torch.compiler.disable          # collectives with host-side split sizes: a graph break under torch.compile
    def __call__(self, moe: nn.Module, u: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """u (N, D) tokens, g (N, K) gates, idx (N, K) global expert ids -> (N, D) gated sum of routed outputs."""
        N, K, El = idx.size(0), idx.size(1), self.per_rank
        dest = idx // El                                          # (N, K) EP rank holding each chosen expert
        to_rank = F.one_hot(dest, self.ep).amax(dim=1).bool()      # (N, EP): does token n go to rank j (once)
        rank_of_row, tok = to_rank.t().nonzero(as_tuple=True)     # (S,), (S,): rows grouped by destination
        send_counts = to_rank.sum(dim=0)                          # (EP,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)   # the split sizes, one host sync
        send, recv = send_counts.tolist(), recv_counts.tolist()
        here = dest[tok] == rank_of_row[:, None]                  # (S, K): slots served by that row's rank
        local = torch.where(here, idx[tok] - rank_of_row[:, None] * El, -1)  # (S, K) local expert id, -1 = not there
        gates = torch.where(here, g[tok], torch.zeros((), dtype=g.dtype, device=g.device))  # (S, K)
        with torch.no_grad():                                    # statistics for tests and logs, no extra sync
            self.stats["rows"] += len(tok)                       # (nonzero already synced: S is on the host)
            self.stats["tokens"] += N
            reach = to_rank.sum(dim=1).amax() if N else torch.zeros((), dtype=torch.long, device=u.device)
            prev = self.stats["max_ranks"]
            self.stats["max_ranks"] = reach if prev is None else torch.maximum(prev, reach)
        # dispatch: each row once per destination rank, with its local expert ids and gates
        x_in = _AllToAll.apply(u[tok], recv, send, self.group)          # (R, D)
        g_in = _AllToAll.apply(gates, recv, send, self.group)           # (R, K)
        l_in = local.new_empty((sum(recv), K))
        dist.all_to_all_single(l_in, local.contiguous(), recv, send, group=self.group)   # (R, K), no grad
        y_in = self.local_experts(moe, x_in, g_in, l_in)                # (R, D) gated sum per received row
        # combine: the reverse exchange, then add each rank's partial sum into its token
        y_back = _AllToAll.apply(y_in, send, recv, self.group)          # (S, D)
        return torch.zeros_like(u).index_add_(0, tok, y_back)

    def local_experts(self, moe: nn.Module, x: torch.Tensor, g: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """model.py's 'sorted' path over this rank's experts. EVERY local expert runs, on zero rows if no token
        chose it, so its weights always get a (zero) gradient: DDP and ZeRO need the same set on every step."""
        row, slot = (local >= 0).nonzero(as_tuple=True)           # (P,) (row, slot) pairs this rank computes
        e = local[row, slot]
        order = e.argsort(stable=True)                            # pairs grouped by expert
        row, slot, e = row[order], slot[order], e[order]
        counts = torch.bincount(e, minlength=self.per_rank).tolist()
        xs = x[row].split(counts)                                  # one (n_e, D) slice per local expert
        ys = torch.cat([expert(chunk) for expert, chunk in zip(moe.experts, xs)])  # (P, D)
        ys = ys.to(torch.promote_types(ys.dtype, torch.float32)) * g[row, slot, None]   # gated in fp32
        return torch.zeros_like(x).index_add_(0, row, ys.to(x.dtype))


def shard_experts(model: nn.Module, groups: Groups) -> None:
    """Keep only this rank's routed experts in every MoE layer (main and MTP) and route through the EP group."""
    E, ep = model.args.n_routed_experts, groups.layout.ep
    if ep == 1:
        return
    dispatcher, El = ExpertParallel(groups.ep, E), E // ep
    for moe in model.moe_layers():
        moe.experts = nn.ModuleList(list(moe.experts)[groups.e * El:(groups.e + 1) * El])
        moe.ep = dispatcher


def is_expert(name: str) -> bool:
    return ".experts." in name


def global_name(name: str, e: int, per_rank: int) -> str:
    """'layers.1.ffn.experts.0.w1.weight' on EP rank e -> the unsharded model's name (expert e*El + 0)."""
    if not is_expert(name):
        return name
    head, tail = name.split(".experts.", 1)
    i, rest = tail.split(".", 1)
    return f"{head}.experts.{e * per_rank + int(i)}.{rest}"


# -----------------------------------------------------------------------------
# 3. Data parallelism: gradients, ZeRO-1, clipping, router loads

def split_params(model: nn.Module) -> tuple[list, list]:
    """(dense, expert) named parameters this rank holds. Dense: replicated on every rank of the replica group;
    expert: replicated only across the data-parallel copies of this EP shard."""
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if not is_expert(n)], [(n, p) for n, p in named if is_expert(n)]


def data_parallel(model: nn.Module, groups: Groups) -> nn.Module:
    """pp == 1: DDP (bucketed all-reduce overlapped with the backward) over the dense replicas. The experts are
    left out of DDP: their replica group is smaller (the DP copies of this EP shard); sync_grads reduces them."""
    if dist.get_world_size(groups.replicas) == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    experts = [n for n, _ in split_params(model)[1]]
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    # broadcast_buffers=False: MoE.load counts this rank's tokens and must not be overwritten by rank 0's;
    # the router biases stay equal on every rank because they move by globally summed loads
    return DDP(model, process_group=groups.replicas, broadcast_buffers=False)


def _all_reduce_flat(tensors: list[torch.Tensor], group, scale: float) -> None:
    """Sum the tensors over the group (one flat buffer, one call), times scale."""
    if not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat *= scale
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view_as(t))


@torch.no_grad()
def sync_grads(model: nn.Module, groups: Groups, ddp: bool) -> None:
    """Gradient of the global mean loss: sum over all replicas of a parameter, divided by the number of batch
    ranks (DP x EP; with DualPipe the two stage copies saw different micro-batches of the same pipeline).
    With DDP the dense part is already averaged; the experts are summed over their DP copies here."""
    dense, experts = split_params(model)
    for _, p in dense + experts:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ddp:
        _all_reduce_flat([p.grad for _, p in dense], groups.replicas, 1 / groups.batch_ranks)
    _all_reduce_flat([p.grad for _, p in experts], groups.expert_replicas, 1 / groups.batch_ranks)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, groups: Groups, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole sharded model: each rank adds its gradients' squares
    divided by how many ranks hold that parameter, so the world-wide sum counts every parameter once."""
    dense, experts = split_params(model)
    n_dense = dist.get_world_size(groups.replicas) if dist.is_initialized() else 1
    n_expert = dist.get_world_size(groups.expert_replicas) if dist.is_initialized() else 1
    sq = lambda ps: sum((p.grad.double() ** 2).sum() for _, p in ps) if ps else torch.zeros((), dtype=torch.float64)
    total = sq(dense) / n_dense + sq(experts) / n_expert
    if dist.is_initialized():
        total = total.to(next(model.parameters()).device)
        dist.all_reduce(total)
    norm = total.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for _, p in dense + experts:
        p.grad.mul_(coef.to(p.grad.device))
    return norm


class Optimizer:
    """AdamW (or fp8.py's AdamWBF16) with ZeRO-1: optimizer state sharded by torch's ZeroRedundancyOptimizer
    over each replica group (dense weights over all their replicas, experts over their DP copies); after its
    step each rank broadcasts the parameters it updated. Looks like one torch optimizer to train.py."""

    def __init__(self, model: nn.Module, groups: Groups | None, cls, zero: bool, weight_decay: float, **kw):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        self.parts = []
        # one process: one optimizer over all parameters; ranks: one per replica group (dense, experts)
        for named, group in (zip(split_params(model), (groups.replicas, groups.expert_replicas)) if groups else
                             [(list(model.named_parameters()), None)]):
            if not named:
                continue
            # decay only matrices (weights, embeddings, gate centroids); norms' gains are never decayed
            pg = [dict(params=[p for _, p in named if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for _, p in named if p.dim() < 2], weight_decay=0.0)]
            pg = [g for g in pg if g["params"]]
            if zero and group is not None and dist.get_world_size(group) > 1:
                self.parts.append(ZeroRedundancyOptimizer(pg, optimizer_class=cls, process_group=group, **kw))
            else:
                self.parts.append(cls(pg, **kw))

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def local_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments, step counters): what ZeRO-1 shrinks."""
        total = 0
        for o in self.parts:
            inner = getattr(o, "optim", o)        # a ZeroRedundancyOptimizer keeps its shard in .optim
            total += sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                         if torch.is_tensor(t))
        return total

    def state_dicts(self) -> list[dict | None]:
        """Full (consolidated) state of each part on the part's group rank 0, None elsewhere. Collective."""
        out = []
        for o in self.parts:
            if hasattr(o, "consolidate_state_dict"):
                o.consolidate_state_dict(to=0)
                out.append(o.state_dict() if dist.get_rank(o.process_group) == 0 else None)
            else:
                out.append(o.state_dict())
        return out

    def load_state_dicts(self, states: list[dict]) -> None:
        for o, s in zip(self.parts, states):
            o.load_state_dict(s)


# -----------------------------------------------------------------------------
# 4. Pipeline parallelism: dualpipe.py's executor on the real model

class _WithLoss(torch.autograd.Function):
    """Return x unchanged; its backward also backpropagates `loss` with gradient 1. A middle stage's MoE balance
    losses cannot ride to the last stage inside the activations, so they enter the backward here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.like = loss
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, torch.ones_like(ctx.like)


class PipeStage(nn.Module):
    """Stage s of PP for training: model.pipeline_stage(s, pp) (embedding on stage 0, its Blocks, the final norm
    and head on the last), plus on the last stage the MTP modules and the embedding they read (registered here,
    so .parameters() is everything this stage's backward must reach). Holds the model's own modules."""

    def __init__(self, model: nn.Module, s: int, pp: int):
        super().__init__()
        self.part = model.pipeline_stage(s, pp)
        self.first, self.last = s == 0, s == pp - 1
        self.mtp, self.mtp_embed = (model.mtp, model.embed) if self.last and len(model.mtp) else (None, None)
        self.model = [model]              # a list: not a submodule (its other stages are not ours)
        self.moes = [m for m in self.modules() if hasattr(m, "balance_loss")]
        self.scale = 1.0                  # 1 / micro-batches per step: the step's loss is their mean

    def forward(self, x, tokens, targets):
        """x (Bm, T, D) from the previous stage (None on the first) -> (Bm, T, D) for the next stage, or on the
        last the scaled loss; and the parts of the micro-batch's loss computed here (unscaled, detached): the
        balance losses of a middle stage, {'loss', 'ce', 'mtp'} on the last."""
        h = self.part.trunk(tokens if self.first else x)          # (Bm, T, D), final-normed on the last stage
        if not self.last:
            balance = [m.balance_loss for m in self.moes if m.balance_loss is not None]
            for m in self.moes:
                m.balance_loss = None
            if not balance:
                return h, {}
            balance = sum(balance)
            return _WithLoss.apply(h, balance * self.scale), dict(loss=balance.detach())
        # the last stage: Transformer.forward's losses (eq. 25 for MTP), from the model's own methods
        model, T = self.model[0], tokens.size(1)
        ce = cross_entropy(model.logits(h), targets)
        mtp_k, h_k = [], h
        for k in range(1, len(model.mtp) + 1):   # the full (Bm, T) shape, the last k targets ignored
            if T - k <= 0:
                break
            logits_k, h_k = model.mtp_forward(k, h_k, tokens.roll(-k, dims=1))     # (Bm, T, V/D)
            valid = torch.arange(T, device=targets.device) < T - k                # (T,)
            mtp_k.append(cross_entropy(logits_k, targets.roll(-k, dims=1).where(valid, -1)))
        mtp = model.args.mtp_lambda / len(model.mtp) * sum(mtp_k) if mtp_k else ce.new_zeros(())
        balance = [m.balance_loss for m in self.moes if m.balance_loss is not None]
        for m in self.moes:
            m.balance_loss = None
        loss = ce + mtp + (sum(balance) if balance else 0)
        return loss * self.scale, dict(loss=loss.detach(), ce=ce.detach(), mtp=mtp.detach())


class _Worker(DP.Worker):
    """dualpipe.Worker whose stages take (x, tokens, targets) and return the model's losses."""

    def forward(self, d: int, mb: int) -> None:
        s, g = DP.stage_of(self.pp, self.rank, d), d * self.per_dir + mb
        x = None if s == 0 else self.inbox.pop(("act", d, mb)).requires_grad_()   # (Bm, T, D) from stage s-1
        self.records = []
        out, parts = self.stages[d](x, self.tokens[g], self.targets[g])
        records, self.records = self.records, None
        self.losses[(g, s)] = parts
        if s < self.pp - 1:
            self.outbox[("act", d, mb)] = out.detach()           # on the wire: the values, never the graph
        self.live[(d, mb)] = (x, out, records)


class Pipeline:
    """DualPipe over the PP ranks of this rank's pipeline (same d, e): pipeline rank r holds stages r and PP-1-r,
    and drops every other layer. step() runs one optimizer step's micro-batches; gradients are left in .grad
    (each stage copy holds its half; sync_grads sums the copies)."""

    def __init__(self, model: nn.Module, groups: Groups, nmb: int):
        L, r = groups.layout, groups.s
        self.groups, self.pp, self.r, self.nmb = groups, L.pp, r, nmb
        self.stages = {d: PipeStage(model, DP.stage_of(L.pp, r, d), L.pp) for d in (0, 1)}
        held = {id(m) for st in self.stages.values() for m in st.modules()}
        for i, layer in enumerate(model.layers):                   # free the layers of the other stages
            if id(layer) not in held:
                model.layers[i] = nn.Identity()
        if not any(st.first or st.last for st in self.stages.values()):
            model.embed = model.norm = model.head = None
            model.mtp = nn.ModuleList()
        self.worker = _Worker(r, L.pp, self.stages, {0: [], 1: []}, torch.empty(nmb, 0), torch.empty(nmb, 0))
        self.sched = DP.schedule_dualpipe(L.pp, nmb)
        self.program = DP.program(self.sched)                       # the global send/recv order, computed once
        self.dim, self.dtype = model.args.dim, next(model.parameters()).dtype

    def _play(self, shape, device):
        sent, lane = [], self.groups.pipe_ranks

        def send(src, dst, msg, t):
            t = t.contiguous()
            sent.append((dist.isend(t, lane[dst]), t))             # keep t alive until its send completes

        def recv(src, dst, msg):
            buf = torch.empty(shape, dtype=self.dtype, device=device)
            dist.recv(buf, lane[src])
            return buf

        for r, act in self.program:                                 # dualpipe.play, for this rank only
            if r == self.r:
                if act[0] == "op":
                    self.worker.run(act[1])
                elif act[0] == "send":
                    send(r, act[1], act[2], self.worker.outbox.pop(act[2]))
                else:
                    self.worker.inbox[act[2]] = recv(act[1], r, act[2])
        for req, _ in sent:
            req.wait()

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
        """tokens, targets (N, Bm, T): the N micro-batches of this pipeline. Returns the mean of each loss part
        over the micro-batches, the same on every rank of the pipeline."""
        w = self.worker
        w.tokens, w.targets, w.losses = tokens, targets, {}
        for st in self.stages.values():
            st.scale = 1 / len(tokens)
        self._play((*tokens.shape[1:], self.dim), tokens.device)
        parts = torch.zeros(3, device=tokens.device, dtype=torch.float64)   # loss, ce, mtp summed here
        for p in w.losses.values():                                 # every stage adds what it computed
            parts += torch.stack([p.get(k, parts.new_zeros(())) for k in ("loss", "ce", "mtp")]).double()
        dist.all_reduce(parts, group=self.groups.pipe)
        parts = (parts / len(tokens)).to(self.dtype)
        return dict(loss=parts[0], ce=parts[1], mtp=parts[2])

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
        """Evaluation: one micro-batch (Bm, T) through the stages of direction 0 in turn; losses on every rank."""
        lane, st, x = self.groups.pipe_ranks, self.stages[0], None
        if not st.first:
            x = torch.empty((*tokens.shape, self.dim), dtype=self.dtype, device=tokens.device)
            dist.recv(x, lane[self.r - 1])
        out, parts = st(x, tokens, targets)
        if not st.last:
            dist.send(out.contiguous(), lane[self.r + 1])
        ce = parts["ce"].double() if st.last else torch.zeros((), dtype=torch.float64, device=tokens.device)
        dist.all_reduce(ce, group=self.groups.pipe)
        return dict(ce=ce.to(self.dtype))


# -----------------------------------------------------------------------------
# 5. Dry run: per-rank memory and per-step communication of a layout, counted without any rank

def stage_of_param(name: str, args, pp: int) -> list[int]:
    """Pipeline stages holding a parameter (PipeStage's split): layer i on stage i*pp//n_layers's inverse,
    the embedding on the first stage (and the last, for MTP), final norm, head and MTP on the last."""
    n = args.n_layers
    if name.startswith("layers."):
        i = int(name.split(".")[1])
        return [next(s for s in range(pp) if s * n // pp <= i < (s + 1) * n // pp)]
    if name.startswith("embed."):
        return [0, pp - 1] if args.n_mtp_depth else [0]
    return [pp - 1]                                   # norm, head, mtp


def activation_bytes_per_token(args, moe: bool, a: int = 2) -> float:
    """Bytes autograd keeps per token for one Block's backward: `a`-byte (bf16) activations, fp32 residual and
    router, flash/cuDNN-style attention (q, k, v, o and a log-sum-exp; never the T x T probabilities), no
    recomputation. An estimate from the shapes in model.py, not a measurement."""
    D, H, Dn, Dr, Dv = args.dim, args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    Cq, Ckv, K, Im = args.q_lora_rank, args.kv_lora_rank, args.n_activated_experts, args.moe_inter_dim
    attn = (4 * D + a * D                              # residual into attn_norm, its output (wq_a/wkv_a input)
            + 2 * a * Cq                               # c_q before and after q_norm (wq_b's input)
            + a * (2 * Ckv + Dr)                       # c_kv before/after kv_norm, k_R
            + a * (2 * H * (Dn + Dr) + 2 * H * Dv)     # q, k, v, o (o is also wo's input)
            + a * (H * Dr + Dr) + 4 * H)               # RoPE inputs, log-sum-exp
    ffn = 4 * D + a * D                                # residual into ffn_norm, its output
    if not moe:
        return attn + ffn + 3 * a * args.inter_dim     # SwiGLU: w1 out, w3 out, their product (w2's input)
    routed = K * (a * D + 3 * a * Im + 4 * D)          # per chosen expert: its input, SwiGLU, gated fp32 output
    return attn + ffn + 8 * args.n_routed_experts + routed + 3 * a * args.n_shared_experts * Im


def dry_run(args, layout: Layout, batch: int, seq: int, nmb: int, fp8: bool = False) -> tuple[str, list[dict]]:
    """Per pipeline rank (every DP/EP rank of a stage holds the same amounts): parameter, gradient, optimizer
    and activation bytes, and the bytes it sends per optimizer step. Returns (report, rows)."""
    from model import Transformer
    with torch.device("meta"):                        # shapes only: no memory, no init (671B counts in seconds)
        model = Transformer(args)
    L, pp, tok = layout, layout.pp, batch * seq
    mirror = 2 if pp > 1 else 1
    n_dense, n_expert = L.dp * L.ep * mirror, L.dp * mirror          # replicas of a dense / expert weight
    per_stage = [[0, 0, 0, 0] for _ in range(pp)]                   # (MoE layers, dense layers) at [2], [3]
    params = [(set(stage_of_param(n, args, pp)), p.numel() / (L.ep if is_expert(n) else 1), is_expert(n))
              for n, p in model.named_parameters()]                # (stages holding it, numel here, expert?)
    for i in range(args.n_layers):
        per_stage[stage_of_param(f"layers.{i}.", args, pp)[0]][2 if i >= args.n_dense_layers else 3] += 1
    per_stage[-1][2] += args.n_mtp_depth                             # MTP blocks are MoE blocks
    act_moe, act_dense = activation_bytes_per_token(args, True), activation_bytes_per_token(args, False)
    act_stage = [tok * (m * act_moe + d * act_dense) for _, _, m, d in per_stage]
    act_stage[-1] += tok * (4 * args.vocab_size * (1 + args.n_mtp_depth) + 2 * 2 * args.dim * args.n_mtp_depth)
    if pp > 1:
        timeline = DP.simulate(DP.schedule_dualpipe(pp, nmb))
        peak = timeline.peak_act                                     # micro-batch-stages alive, per rank
        sends = [0] * pp
        for r, act in DP.program(DP.schedule_dualpipe(pp, nmb)):
            sends[r] += act[0] == "send"
    else:
        peak, sends = [1], [0]
    # EP: a token's row goes to at most R ranks (group-limited routing); (EP-1)/EP of them leave the rank
    R = min(args.n_activated_experts, args.n_limited_groups * max(1, L.ep // args.n_expert_groups), L.ep)
    row_fwd = 4 * args.dim + args.n_activated_experts * (4 + 8)     # fp32 row + gates + local ids, dispatch
    row_bytes = row_fwd + 4 * args.dim + 4 * args.dim + (4 * args.dim + 4 * args.n_activated_experts)  # + combine, bwd
    row_paper = (args.dim + args.dim // 128 * 4) + 3 * 2 * args.dim   # §3.3.3: FP8 1x128 dispatch, BF16 the rest
    mom = 4 if fp8 else 8                                            # AdamW moments: BF16 (fp8.AdamWBF16) or FP32
    rows = []
    for r in range(pp):
        held = sorted(set(L.mirror(r)) | {pp - 1 - r}) if pp > 1 else [0]
        dense = sum(k for st, k, ex in params if st & set(held) and not ex)   # each parameter once (the
        expert = sum(k for st, k, ex in params if st & set(held) and ex)       # embedding: first and last stage)
        moe_layers = sum(per_stage[s][2] for s in held)
        mbs = nmb // 2 if pp > 1 else nmb                            # micro-batches each held stage runs here
        ep_rows = moe_layers * mbs * tok * R * (L.ep - 1) / L.ep if L.ep > 1 else 0   # rows leaving the rank
        ring = lambda n: 2 * (n - 1) / n
        dp_bytes = 4 * (dense * ring(n_dense) + expert * ring(n_expert))
        zero = 4 * (dense * (n_dense - 1) / n_dense + expert * (n_expert - 1) / n_expert)
        rows.append(dict(rank=r, stages=held, dense=dense, expert=expert, params=4 * (dense + expert),
                         grads=4 * (dense + expert), optim=mom * (dense / n_dense + expert / n_expert),
                         optim_unsharded=mom * (dense + expert),
                         act=peak[r] * max(act_stage[s] for s in held), act_peak=peak[r],
                         ep=ep_rows * row_bytes, ep_paper=ep_rows * row_paper, dp=dp_bytes, zero=zero, pp=sends[r] * 4 * tok * args.dim))
    for row in rows:
        row["total"] = row["params"] + row["grads"] + row["optim"] + row["act"]
    n = model.num_params()
    G = 2 ** 30
    out = [f"dry run: {L}; micro-batch {batch} x {seq} tokens, {nmb} micro-batches per pipeline per step, "
           f"{batch * nmb * L.dp * L.ep:,} sequences ({batch * seq * nmb * L.dp * L.ep / 1e6:.1f}M tokens) per step",
           f"model: {n['total'] / 1e9:.2f}B parameters + {n['mtp'] / 1e9:.2f}B MTP, {args.n_layers} layers, "
           f"{args.n_routed_experts} routed experts ({args.n_routed_experts // L.ep} per EP rank); a token's "
           f"experts live on at most {R} EP ranks",
           f"memory per rank, GiB (FP32 weights and gradients, {'BF16' if fp8 else 'FP32'} AdamW moments with "
           f"ZeRO-1 over {n_dense} dense / {n_expert} expert replicas; bf16 activations, estimated):",
           " pipe rank  stages    params(dense+expert)  grads  optim (unsharded)  activations (peak mb-stages)  total"]
    for w in rows:
        out.append(f" {w['rank']:>9}  {','.join(map(str, w['stages'])):<8} {w['params'] / G:>7.2f} "
                   f"({w['dense'] / 1e9:.2f}B+{w['expert'] / 1e9:.2f}B) {w['grads'] / G:>6.2f} {w['optim'] / G:>6.2f} "
                   f"({w['optim_unsharded'] / G:>6.2f}) {w['act'] / G:>12.2f} ({w['act_peak']:>2}) {w['total'] / G:>14.2f}")
    out += ["communication sent per rank per optimizer step, GiB (EP: at most, as sent here in fp32 / as the "
            "paper's FP8 dispatch + BF16 combine would):",
            " pipe rank  EP all-to-all (FP8/BF16)  DP all-reduce  ZeRO-1 broadcast  PP p2p"]
    for w in rows:
        out.append(f" {w['rank']:>9}  {w['ep'] / G:>13.2f} ({w['ep_paper'] / G:>8.2f})  {w['dp'] / G:>13.2f}  "
                   f"{w['zero'] / G:>16.2f}  {w['pp'] / G:>6.2f}")
    return "\n".join(out), rows


# -----------------------------------------------------------------------------
# 6. Sharded checkpoints: one file per (stage pair, EP shard), written by its first DP replica

def shard_file(out_dir: str, layout: Layout, s: int, e: int) -> str:
    s = min(s, layout.pp - 1 - s)                     # DualPipe: ranks s and PP-1-s hold the same two stages
    return os.path.join(out_dir, "ckpt.pt" if (s, e) == (0, 0) else f"ckpt-pp{s}-ep{e}.pt")


def save_checkpoint(out_dir: str, model: nn.Module, optimizer: Optimizer, groups: Groups, meta: dict,
                    rng: dict) -> None:
    """Collective. ckpt.pt (shard 0, plus the step, config, layout and every rank's RNG) is written last, after
    a barrier: a crash between shards leaves the previous ckpt.pt, whose step the other shards must match."""
    L = groups.layout
    states = optimizer.state_dicts()                  # ZeRO shards gathered on each replica group's rank 0
    rngs = [None] * L.world
    dist.all_gather_object(rngs, rng)
    writer = groups.d == 0 and groups.s <= L.pp - 1 - groups.s
    path = shard_file(out_dir, L, groups.s, groups.e)
    first = path.endswith("ckpt.pt")

    def write():
        ckpt = dict(model=model.state_dict(), optimizer=states, layout=vars(L).copy(), step=meta["step"])
        if first:
            ckpt.update(meta, rng=rngs)
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)
    if writer and not first:
        write()
    dist.barrier()
    if writer and first:
        write()
    dist.barrier()


def checkpoint_layout(path: str) -> Layout:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # reads only what we touch
    return Layout(**ckpt.get("layout", {}))          # a single-process checkpoint has no layout: PP1 x DP1 x EP1


def load_checkpoint(out_dir: str, model: nn.Module, optimizer: Optimizer, groups: Groups, device) -> dict:
    """Load this rank's shard (and the dense optimizer state from EP shard 0). Returns ckpt.pt's contents with
    this rank's RNG as 'rng'. Raises LayoutError if the shards do not belong together."""
    L = groups.layout
    main = torch.load(shard_file(out_dir, L, 0, 0), map_location=device, weights_only=True)
    path = shard_file(out_dir, L, groups.s, groups.e)
    own = main if path.endswith("ckpt.pt") else torch.load(path, map_location=device, weights_only=True)
    if own["step"] != main["step"]:
        raise LayoutError(f"{path} is from step {own['step']} but ckpt.pt from step {main['step']} (a save was "
                          f"interrupted); no consistent checkpoint to resume")
    model.load_state_dict(own["model"])
    dense_src = own if groups.e == 0 else torch.load(shard_file(out_dir, L, groups.s, 0), map_location=device,
                                                     weights_only=True)
    for i, o in enumerate(optimizer.parts):        # [dense, experts]; the dense state lives in EP shard 0
        o.load_state_dict((dense_src if i == 0 else own)["optimizer"][i])
    main["rng"] = main["rng"][groups.rank]
    return main


def consolidate(out_dir: str, map_location="cpu") -> dict:
    """The whole model's state dict, by its unsharded names, from the shards of any layout (sample.py uses it)."""
    main = torch.load(shard_file(out_dir, Layout(), 0, 0), map_location=map_location, weights_only=True)
    L, state = Layout(**main["layout"]), {}
    per_rank = main["model_args"]["n_routed_experts"] // L.ep
    for s in range((L.pp + 1) // 2):                 # one of each DualPipe mirror pair
        for e in range(L.ep):
            ckpt = main if (s, e) == (0, 0) else torch.load(shard_file(out_dir, L, s, e), map_location=map_location,
                                                            weights_only=True)
            state.update({global_name(k, e, per_rank): v for k, v in ckpt["model"].items()})
    return state


@torch.no_grad()
def in_sync(model: nn.Module, groups: Groups) -> bool:
    """Every replica of every weight (and router bias) ends bit-identical: checksums compared in each group."""
    dense, experts = split_params(model)
    ok = True
    for named, group in ((dense, groups.replicas), (experts, groups.expert_replicas)):
        extra = [b.double().sum() for n, b in model.named_buffers() if n.endswith("gate.bias")] if named is dense else []
        check = torch.stack([p.detach().double().sum() for _, p in named] + extra) if named or extra else \
            torch.zeros(1, dtype=torch.float64)
        check = check.to(next(model.parameters()).device)
        got = [torch.zeros_like(check) for _ in range(dist.get_world_size(group))]
        dist.all_gather(got, check, group=group)
        ok &= all(torch.equal(g, got[0]) for g in got)
    return ok
