"""TSP MLP: ffn weight shards circulate around a ring, each rank computes its own tokens against all of them.

Rank p of a TSP group of size D holds its tokens ``x [S/D, B, h]`` and the tensor-parallel shard p (ffn
slice p) of the MLP weights, in Megatron's layout (degree D):

- ``linear_fc1.weight`` ``[2*ffn/D, h]`` = [gate rows of slice p ; up rows of slice p] when gated,
  ``[ffn/D, h]`` otherwise; ``linear_fc1.bias`` has the same rows;
- ``linear_fc2.weight`` ``[h, ffn/D]`` (its bias is replicated and added by the caller).

The activation is elementwise over ffn, so summing the D slices' outputs is exact.

Experts (``--tsp-expert-ring``): the same ring serves a rank's local MoE experts, each sharded over the TSP
axis in Megatron's expert-tensor-parallel layout of degree D. One message carries the slices of all local
experts; each rank runs its own dispatched tokens (sorted by expert, ``tokens_per_expert`` of them per
expert) through every slice, so tokens never leave their rank for the experts' sake. A rank with no tokens
for an expert still forwards that expert's weights and accumulators.

The shards circulate by ``weight_ring.py`` (ring order, double buffering, grad accumulators that travel
with the shards and arrive at their owner holding the sum over all ranks).

Gathered weights (dense MLP, ``schedule="gather"``, ``--tsp-mlp-schedule gather``): instead of D ring steps
on ffn/D slices, every rank all-gathers the D shards (fc1 rows and fc1 bias in rank order are Megatron's
full fc1, [gate_0 ; up_0 ; gate_1 ; up_1 ; ...] when gated; fc2 travels transposed, so the gathered rows are
the full fc2 transposed) and runs one fc1 GEMM, one activation and one fc2 GEMM over the whole ffn for its
tokens; backward gathers the weights again (unless kept; not the fc1 bias, which it does not need) and
reduce-scatters the weight grads to their owners in e_acc. The ring's bytes (all_gather W*e*(D-1)/D forward
and, less the fc1 bias, backward; reduce_scatter W*e_acc*(D-1)/D) in 2-3 messages, about D times fewer
operators, for the whole layer's weights (and in backward fc2's grads) held at once instead of two shards.
In forward fc2's gather travels during the fc1 GEMM; fc1's can be started earlier by the caller
(:func:`prefetch_gathered_fc1`: the TSP layer starts it during its attention, specs.py), and is otherwise
waited for at once.

Communication per rank per layer, bytes, for W = the weight elements of the whole layer (3*F*h^2 gated,
2*F*h^2 not, plus the fc1 bias; for experts, summed over the rank's local experts), e the weight element
size and e_acc the accumulator's (fp32 for bf16/fp16 weights, else the weight dtype):

- forward:  ring_send W*e*(D-1)/D.
- backward: ring_send W*e*(D-1)/D (weights re-circulated) + W*e_acc*(D-1)/D (accumulators). With
  ``keep_weights`` (``--tsp-keep-weight-shards``) the forward keeps every shard it received (D weight
  buffers, W*e per layer, alive until the layer's backward) and backward sends only the accumulators.

Memory: forward saves the local input ``x`` and, when it will be differentiated, every shard's fc1 output
(``[S/D, B, 2*ffn]`` per layer in all when gated, ``[S/D, B, ffn]`` not; experts ``[T, 2*ffn_e]``), each
freed once backward has used it. Backward recomputes only the activation (elementwise) and differentiates
both GEMMs by hand, so it costs exactly two forwards of GEMMs. Under Megatron's full recompute only the
layer being differentiated holds them; without it, Megatron's ``--recompute-granularity selective
--recompute-modules mlp`` trades them for a forward again, as for any Megatron MLP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_tsp.comm import (
    Pending,
    Prefetch,
    all_gather_linear_pair,
    all_gather_seq,
    group_size,
    reduce_scatter_seq,
)
from megatron_tsp.grads import (
    add_linear_,
    linear_backward,
    linear_weight_grads,
    needs_backward,
    weight_grad_for_autograd,
)
from megatron_tsp.weight_ring import gather_shard_grads, visit_shards

__all__ = ["MLP_SCHEDULES", "TSPGatheredMLPFunction", "TSPMLPFunction", "prefetch_gathered_fc1", "tsp_expert_mlps",
           "tsp_mlp"]

MLP_SCHEDULES = ("ring", "gather")  # --tsp-mlp-schedule; the first is the default


@dataclass(frozen=True)
class _MLPSpec:
    tsp_group: dist.ProcessGroup
    activation: Callable[[Tensor], Tensor]
    gated: bool
    has_fc1_bias: bool
    tokens_per_mlp: tuple[int, ...]  # rows of x (dim 0) for each MLP of the shard, in order
    keep_weights: bool = False  # keep every shard the forward received for backward (no second circulation)
    keep_fc1_outputs: bool = False  # keep every shard's fc1 output for backward (this call is differentiated)

    @property
    def tensors_per_mlp(self) -> int:
        return 3 if self.has_fc1_bias else 2


def _per_mlp(shard: Sequence[Tensor], spec: _MLPSpec) -> list[Sequence[Tensor]]:
    """A shard's tensors grouped by MLP: [fc1_weight, (fc1_bias), fc2_weight] for each, in order."""
    n = spec.tensors_per_mlp
    return [shard[i * n:(i + 1) * n] for i in range(len(spec.tokens_per_mlp))]


def _rows_per_mlp(t: Tensor, spec: _MLPSpec) -> Sequence[Tensor]:
    """This rank's tokens (or their grads) grouped by MLP: views of t's rows (dim 0)."""
    return (t,) if len(spec.tokens_per_mlp) == 1 else t.split(spec.tokens_per_mlp)


def _activate(fc1_out: Tensor, spec: _MLPSpec) -> Tensor:
    """The activation of one ffn slice's fc1 output: ``[n, ..., 2*ffn/D]`` ([gate ; up]) -> act(gate) * up
    ``[n, ..., ffn/D]`` when gated, else ``[n, ..., ffn/D]`` -> act of it."""
    return _activate_keeping_gate(fc1_out, spec)[0]


def _activate_keeping_gate(fc1_out: Tensor, spec: _MLPSpec) -> tuple[Tensor, Tensor | None]:
    """(:func:`_activate`, and when gated act(gate), which its backward needs)."""
    if not spec.gated:
        return spec.activation(fc1_out), None
    gate, up = fc1_out.chunk(2, dim=-1)
    activated_gate = spec.activation(gate)
    return activated_gate * up, activated_gate


# Activations whose elementwise backward has an aten op that writes into a given tensor (Megatron's --swiglu
# is F.silu, its default F.gelu); others are differentiated by autograd and copied there.
_ACTIVATION_BACKWARDS: dict[Callable[[Tensor], Tensor], Callable[..., Tensor]] = {
    F.silu: torch.ops.aten.silu_backward.grad_input,
    F.gelu: torch.ops.aten.gelu_backward.grad_input,
}


def _activation_backward_into(out: Tensor, activation: Callable[[Tensor], Tensor], x: Tensor,
                              grad: Tensor) -> None:
    """``out`` = grad * activation'(x), elementwise; ``out`` may be a strided view of a larger buffer."""
    fused = _ACTIVATION_BACKWARDS.get(activation)
    if fused is not None:
        fused(grad, x, grad_input=out)
        return
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        (grad_x,) = torch.autograd.grad(activation(leaf), leaf, grad)
    out.copy_(grad_x)


def _activate_backward(fc1_out: Tensor, activated_gate: Tensor | None, grad_hidden: Tensor,
                       spec: _MLPSpec) -> Tensor:
    """The grad of :func:`_activate`'s input from its output's, ``grad_hidden`` (consumed: scaled in place),
    and the act(gate) of :func:`_activate_keeping_gate`. Both halves of a gated grad are written into one
    ``[..., 2*ffn/D]`` buffer: no concatenation, and no grad of a half alive beside it (the same ops and
    values as autograd's)."""
    grad_fc1_out = torch.empty_like(fc1_out)
    if not spec.gated:
        _activation_backward_into(grad_fc1_out, spec.activation, fc1_out, grad_hidden)
        return grad_fc1_out
    gate, up = fc1_out.chunk(2, dim=-1)
    grad_gate, grad_up = grad_fc1_out.chunk(2, dim=-1)
    torch.mul(grad_hidden, activated_gate, out=grad_up)
    _activation_backward_into(grad_gate, spec.activation, gate, grad_hidden.mul_(up))
    return grad_fc1_out


def _shard_forward(x: Tensor, shard: Sequence[Tensor], spec: _MLPSpec, kept_fc1: list[Tensor] | None,
                   out: Tensor) -> None:
    """Add one shard's output for this rank's tokens into ``out`` (like x, the sum over shards): each MLP's
    rows of x through that MLP's slice, fc2's GEMM adding into the MLP's rows of ``out``
    (:func:`~megatron_tsp.grads.add_linear_`). Appends each MLP's fc1 output to ``kept_fc1`` unless it is
    None."""
    for rows, mlp, out_rows in zip(_rows_per_mlp(x, spec), _per_mlp(shard, spec), _rows_per_mlp(out, spec)):
        fc1_out = F.linear(rows, mlp[0], mlp[1] if spec.has_fc1_bias else None)
        if kept_fc1 is not None:
            kept_fc1.append(fc1_out)
        add_linear_(out_rows, _activate(fc1_out, spec), mlp[-1])


def _shard_grads(x: Tensor, shard: Sequence[Tensor], fc1_outs: Sequence[Tensor], grad_out: Tensor,
                 grad_x: Tensor, spec: _MLPSpec) -> list[Tensor]:
    """Grads of one shard's tensors from this rank's tokens and forward's fc1 outputs of that shard; adds the
    input grad into ``grad_x``. Only the activation is recomputed (by autograd); both GEMMs are differentiated
    by hand: d fc2 = d out^T @ hidden, d hidden = d out @ fc2, d fc1 = d fc1_out^T @ x, dx = d fc1_out @ fc1.
    """
    grads = []
    for rows, mlp, fc1_out, grad_rows, grad_x_rows in zip(
            _rows_per_mlp(x, spec), _per_mlp(shard, spec), fc1_outs, _rows_per_mlp(grad_out, spec),
            _rows_per_mlp(grad_x, spec)):
        hidden, activated_gate = _activate_keeping_gate(fc1_out, spec)
        grad_hidden, grad_fc2 = linear_backward(grad_rows, hidden, mlp[-1])
        del hidden
        grad_fc1_out = _activate_backward(fc1_out, activated_gate, grad_hidden, spec)
        del activated_gate, grad_hidden
        add_linear_(grad_x_rows, grad_fc1_out, mlp[0].t())  # += grad_fc1_out @ fc1
        grads += [*linear_weight_grads(grad_fc1_out, rows, spec.has_fc1_bias), *grad_fc2]
    return grads


class TSPMLPFunction(torch.autograd.Function):
    """The TSP MLP ring schedule, forward and backward; see the module docstring for ring order and bytes.

    Inputs: x ``[T, ..., h]`` (this rank's tokens), spec, then the rank's own shard: for each MLP in order
    fc1_weight, (fc1_bias), fc2_weight (Megatron TP shards). Output like x, without fc2 biases. Each shard
    tensor that needs a grad gets it exactly once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: _MLPSpec, *own_shard: Tensor) -> Tensor:
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        kept_fc1: dict[int, list[Tensor]] = {}  # owner -> its shard's fc1 output of each MLP

        def add_shard_output(shard: list[Tensor], owner: int) -> None:
            _shard_forward(x, shard, spec, kept_fc1.setdefault(owner, []) if spec.keep_fc1_outputs else None, out)

        ctx.kept_shards = visit_shards(own_shard, spec.tsp_group, add_shard_output, keep=spec.keep_weights)
        ctx.kept_fc1 = kept_fc1 if spec.keep_fc1_outputs else None
        ctx.spec = spec
        ctx.save_for_backward(x, *own_shard)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _MLPSpec = ctx.spec
        x, *own_shard = ctx.saved_tensors
        kept, ctx.kept_shards = ctx.kept_shards, None  # freed with this frame
        kept_fc1, ctx.kept_fc1 = ctx.kept_fc1, None  # each shard's freed after its use
        if kept_fc1 is None:
            raise RuntimeError("TSP MLP backward without forward's fc1 outputs: it runs once per forward (no "
                               "retain_graph), from a forward that ran with grad enabled")
        grad_x = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)

        def shard_grads(shard: list[Tensor], owner: int) -> list[Tensor]:
            return _shard_grads(x, shard, kept_fc1.pop(owner), grad_out, grad_x, spec)

        own_grads = gather_shard_grads(own_shard, spec.tsp_group, shard_grads, kept)
        grad_shard = [weight_grad_for_autograd(param, grad) for param, grad in zip(own_shard, own_grads)]
        return grad_x.to(x.dtype), None, *grad_shard


def _slices(t: Tensor, tsp_size: int) -> Tensor:
    """The gathered fc1's output (or the hidden grad) ``[..., D * n]`` viewed slice by slice ``[..., D, n]``: a
    gated slice's fc1 rows are its gate then its up, so :func:`_activate` applies to each slice."""
    return t.unflatten(-1, (tsp_size, t.shape[-1] // tsp_size))


class TSPGatheredMLPFunction(torch.autograd.Function):
    """The dense TSP MLP with gathered weights (module docstring), forward and backward.

    Inputs: x ``[T, ..., h]``, spec, fc1_weight, fc1_bias (or None), fc2_weight (Megatron TP shards), and fc1's
    gathers if the caller started them (:func:`prefetch_gathered_fc1`, or None; not kept: the gathered weight
    is freed with the forward). Output like x, without the fc2 bias.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: _MLPSpec, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                prefetched_fc1: Prefetch | None) -> Tensor:
        tsp_size = group_size(spec.tsp_group)
        fc1_gathers = None if prefetched_fc1 is None else prefetched_fc1.take(fc1_weight, fc1_bias)
        if fc1_gathers is None:
            fc1_gathers = _gather_fc1(fc1_weight, fc1_bias, spec.tsp_group)
        fc2_gather = all_gather_seq(fc2_weight.t(), spec.tsp_group)  # as all_gather_linear_pair's
        fc1, fc1_b = fc1_gathers[0].wait(), None if fc1_gathers[1] is None else fc1_gathers[1].wait()
        fc1_out = F.linear(x, fc1, fc1_b)  # fc2's gather is in flight meanwhile
        fc2_t = fc2_gather.wait()
        out = F.linear(_activate(_slices(fc1_out, tsp_size), spec).flatten(-2), fc2_t.t())
        ctx.kept_weights = (fc1, fc2_t) if spec.keep_weights else None
        ctx.kept_fc1 = fc1_out if spec.keep_fc1_outputs else None
        ctx.spec = spec
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        spec: _MLPSpec = ctx.spec
        x, fc1_weight, fc1_bias, fc2_weight = ctx.saved_tensors
        kept, ctx.kept_weights = ctx.kept_weights, None
        fc1_out, ctx.kept_fc1 = ctx.kept_fc1, None
        if fc1_out is None:
            raise RuntimeError("TSP MLP backward without forward's fc1 output: it runs once per forward (no "
                               "retain_graph), from a forward that ran with grad enabled")
        tsp_size = group_size(spec.tsp_group)
        acc_dtype = torch.promote_types(fc1_weight.dtype, torch.float32)
        if kept is None:
            gathers = all_gather_linear_pair(fc1_weight, None, fc2_weight, spec.tsp_group)
            fc1, fc2_t = gathers[0], gathers[2]
        else:
            fc1, fc2_t = (Pending(t, []) for t in kept)
        fc1_slices = _slices(fc1_out, tsp_size)
        hidden, activated_gate = _activate_keeping_gate(fc1_slices, spec)
        hidden = hidden.flatten(-2)  # [..., ffn] in slice order
        (fc2_t_grad,) = linear_weight_grads(hidden, grad_out, dtype=acc_dtype)  # [ffn, h], fc2's transposed
        grad_fc2_t = reduce_scatter_seq(fc2_t_grad, spec.tsp_group)  # -> this rank's [ffn/D, h], in flight
        del hidden
        grad_hidden = F.linear(grad_out, fc2_t.wait())  # grad_out @ fc2
        grad_fc1_out = _activate_backward(fc1_slices, activated_gate, _slices(grad_hidden, tsp_size), spec)
        grad_fc1_out = grad_fc1_out.flatten(-2)
        del activated_gate, grad_hidden, fc1_out, fc1_slices
        own = [reduce_scatter_seq(g, spec.tsp_group)  # in flight during the input grad's GEMM
               for g in linear_weight_grads(grad_fc1_out, x, spec.has_fc1_bias, acc_dtype)]
        grad_x = grad_fc1_out @ fc1.wait()
        own_grads = [pending.wait() for pending in own] + [grad_fc2_t.wait().t()]
        params = [t for t in (fc1_weight, fc1_bias, fc2_weight) if t is not None]
        grad_fc1_weight, *grad_fc1_bias, grad_fc2_weight = [weight_grad_for_autograd(param, grad)
                                                            for param, grad in zip(params, own_grads)]
        return grad_x, None, grad_fc1_weight, (grad_fc1_bias or [None])[0], grad_fc2_weight, None


def _gather_fc1(fc1_weight: Tensor, fc1_bias: Tensor | None, tsp_group: dist.ProcessGroup) -> list[Pending | None]:
    """Start all-gathering fc1's D shards into the full weight and bias (the column half of
    ``all_gather_linear_pair``)."""
    return [all_gather_seq(fc1_weight, tsp_group), None if fc1_bias is None else all_gather_seq(fc1_bias, tsp_group)]


@torch.no_grad()  # a copy of the weights, differentiated by hand; gloo refuses to gather into grad-mode views
def prefetch_gathered_fc1(fc1_weight: Tensor, fc1_bias: Tensor | None, tsp_group: dist.ProcessGroup) -> Prefetch:
    """Start the gathered schedule's fc1 weight (and bias) gathers ahead of its forward, for
    :func:`tsp_mlp`'s ``prefetched_fc1``: the same messages, issued while other compute runs (the layer's
    attention), and used only while the shards are unchanged (``comm.Prefetch``)."""
    return Prefetch((fc1_weight, fc1_bias), _gather_fc1(fc1_weight, fc1_bias, tsp_group))


def _check_layout(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, gated: bool) -> None:
    ffn_rows = fc2_weight.shape[1] * (2 if gated else 1)
    if fc1_weight.shape != (ffn_rows, x.shape[-1]) or fc2_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shards {tuple(fc1_weight.shape)}, {tuple(fc2_weight.shape)} do not match "
                         f"Megatron's TP layout [{ffn_rows}, {x.shape[-1]}], [{x.shape[-1]}, ffn/D]"
                         f"{' (gated: fc1 = [gate ; up])' if gated else ''}")


def tsp_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
            tsp_group: dist.ProcessGroup, *, activation: Callable[[Tensor], Tensor] = F.silu,
            gated: bool = True, keep_weights: bool = False, schedule: str = "ring",
            prefetched_fc1: Prefetch | None = None) -> Tensor:
    """TSP MLP of rank p's tokens: x ``[S/D, B, h]`` -> ``[S/D, B, h]`` (fc2 bias not added).

    ``activation`` is elementwise; with ``gated`` the output is fc2(activation(gate) * up) (SwiGLU with
    ``F.silu``, GeGLU with ``F.gelu``), else fc2(activation(fc1(x))). ``keep_weights``: keep the D shards
    from forward to backward (D weight buffers instead of two) so that backward circulates only accumulators.
    ``schedule``: ``"ring"`` (TSP.md) or ``"gather"`` (the weights all-gathered, module docstring), whose fc1
    gathers may have been started by :func:`prefetch_gathered_fc1` (``prefetched_fc1``).
    """
    if schedule not in MLP_SCHEDULES:
        raise ValueError(f"TSP MLP schedule {schedule!r}: one of {', '.join(MLP_SCHEDULES)}")
    if prefetched_fc1 is not None and schedule != "gather":
        raise ValueError("prefetched fc1 weights are for the gathered MLP schedule (schedule='gather')")
    _check_layout(x, fc1_weight, fc2_weight, gated)
    own_shard = [t for t in (fc1_weight, fc1_bias, fc2_weight) if t is not None]
    spec = _MLPSpec(tsp_group=tsp_group, activation=activation, gated=gated, has_fc1_bias=fc1_bias is not None,
                    tokens_per_mlp=(x.shape[0],), keep_weights=keep_weights,
                    keep_fc1_outputs=needs_backward(x, *own_shard))
    if schedule == "gather":
        return TSPGatheredMLPFunction.apply(x, spec, fc1_weight, fc1_bias, fc2_weight, prefetched_fc1)
    return TSPMLPFunction.apply(x, spec, *own_shard)


def tsp_expert_mlps(x: Tensor, tokens_per_expert: Sequence[int],
                    experts: Sequence[tuple[Tensor, Tensor | None, Tensor]], tsp_group: dist.ProcessGroup, *,
                    activation: Callable[[Tensor], Tensor] = F.silu, gated: bool = True,
                    keep_weights: bool = False) -> Tensor:
    """A rank's local experts by the TSP ring: x ``[T, h]`` (its dispatched tokens, sorted by expert) ->
    ``[T, h]`` (fc2 biases not added).

    ``experts`` holds each local expert's (fc1_weight, fc1_bias or None, fc2_weight) shard of degree D;
    ``tokens_per_expert`` the rows of x for each (sums to T; may differ between ranks, zeros included).
    Every rank of ``tsp_group`` must call this with the same experts, in the same order. ``keep_weights``
    as in :func:`tsp_mlp`.
    """
    if len(tokens_per_expert) != len(experts) or sum(tokens_per_expert) != x.shape[0]:
        raise ValueError(f"tokens_per_expert {list(tokens_per_expert)} does not split {x.shape[0]} tokens "
                         f"over {len(experts)} experts")
    has_fc1_bias = experts[0][1] is not None
    for fc1_weight, fc1_bias, fc2_weight in experts:
        _check_layout(x, fc1_weight, fc2_weight, gated)
        if (fc1_bias is not None) != has_fc1_bias:
            raise ValueError("either every expert has an fc1 bias or none has")
    shard = [t for expert in experts for t in expert if t is not None]
    spec = _MLPSpec(tsp_group=tsp_group, activation=activation, gated=gated, has_fc1_bias=has_fc1_bias,
                    tokens_per_mlp=tuple(int(n) for n in tokens_per_expert), keep_weights=keep_weights,
                    keep_fc1_outputs=needs_backward(x, *shard))
    return TSPMLPFunction.apply(x, spec, *shard)
