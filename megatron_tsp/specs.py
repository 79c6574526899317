"""Megatron layer specs and modules that run the TSP schedules.

:class:`TSPSelfAttention` and :class:`TSPMLP` subclass Megatron's ``SelfAttention`` and ``MLP`` and keep
their ``ColumnParallelLinear`` / ``RowParallelLinear`` submodules as parameter holders: each TSP rank's
parameters are exactly a tensor-parallel rank's shards, created, initialised, tagged and checkpointed by
Megatron (``--use-cpu-initialization`` gives the same full weights at every degree; a TSP=D checkpoint is a
TP=D checkpoint). Only ``forward`` changes: it runs the schedules of ``attention.py`` / ``mlp.py`` on the
rank's sequence shard instead of Megatron's gather/all-reduce linears.

Users of a Megatron-LM checkout patched with ``patches/`` select the TSP decoder block with
``--spec megatron_tsp.specs get_gpt_decoder_block_tsp_spec`` (see ``megatron_compat/megatron_lm.py``).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import replace
from functools import lru_cache, partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import multi_token_prediction
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_tsp.attention import QKNorm, apply_rotary_cos_sin, per_head_rotary, rotary_cos_sin, tsp_attention
from megatron_tsp.comm import Prefetch, group_rank, group_size
from megatron_tsp.kernels import select_core_attention
from megatron_tsp.linear import tsp_gathered_linear
from megatron_tsp.mlp import MLP_SCHEDULES, prefetch_gathered_fc1, tsp_expert_mlps, tsp_mlp
from megatron_tsp.norm import SequenceShardedNorm
from megatron_tsp.output import tsp_vocab_parallel_loss, tsp_vocab_parallel_loss_and_predictions
from megatron_tsp.zigzag import gathered_positions, local_positions


def _tsp_group(module: Any) -> dist.ProcessGroup:
    # The tsp axis occupies the tensor-parallel slot (mesh.py), so Megatron's tp group is the TSP group.
    return module.tp_group


@lru_cache(maxsize=16)
def _zigzag_positions(seq_len: int, tsp_size: int, tsp_rank: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global positions of rank p's local tokens ``[S/D]`` and of the chunk-major gathered ones ``[S]``, made
    once per shape: every layer and step passes the same tensors, which the zigzag kernel checks once."""
    return local_positions(seq_len, tsp_size, tsp_rank, device), gathered_positions(seq_len, tsp_size, device)


# Megatron's angle table, by where its data sits -> (a weak reference to it, its version, the local positions,
# dtype, as cos/sin, the local tokens' RoPE input)
_LOCAL_ROTARY: dict[tuple, tuple] = {}


def _local_rotary(angles: torch.Tensor, q_positions: torch.Tensor, dtype: torch.dtype,
                  cos_sin: bool) -> torch.Tensor:
    """The local tokens' RoPE input from Megatron's angle table ``[S, 1, 1, rot_dim]``: their angles
    ``[S/D, 1, 1, rot_dim]``, or with ``cos_sin`` :func:`rotary_cos_sin`'s ``[2, S/D, 1, 1, rot_dim]``.

    Made once per table: Megatron's ``RotaryEmbedding.forward`` is lru-cached per length, so every layer and
    step passes the same table, or under activation recompute a detached alias of it (the same data and
    version counter), hence the key by data address, valid while the table it was made from lives. An
    in-place change of the table (its version) makes it again.
    """
    where = (angles.data_ptr(), tuple(angles.shape), angles.stride(), angles.device)
    wanted = (angles._version, q_positions, dtype, cos_sin)
    known = _LOCAL_ROTARY.get(where)
    if (known is not None and known[0]() is not None and known[1] == wanted[0] and known[2] is q_positions
            and known[3:5] == wanted[2:]):
        return known[5]
    local = angles[q_positions]  # at the tokens' global positions
    if cos_sin:
        local = rotary_cos_sin(local, dtype)
    _LOCAL_ROTARY[where] = (weakref.ref(angles, lambda _: _LOCAL_ROTARY.pop(where, None)), *wanted, local)
    return local


class TSPSelfAttention(SelfAttention):
    """Causal self-attention by the TSP head-bucket schedule: ``[S/D, b, h]`` in, ``([S/D, b, h], bias)`` out.

    The rank's tokens are zigzag chunks p and 2D-1-p of the sample (the batch is permuted before the
    sequence split, see ``pretrain_gpt.get_batch``): RoPE angles and the causal mask use their global
    positions. The ``attention_mask`` argument is ignored: TSP attention is causal by construction.
    Selective recompute of core attention (``--recompute-granularity selective``) does not apply: like a fused
    attention kernel, the schedule keeps each head bucket's output and log-sum-exp and never reruns the
    attention forward. ``--recompute-modules mlp`` does apply to the TSP MLP.
    """

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, keep_weight_shards: bool = False,
                 buckets_per_call: int = 1, **kwargs: Any) -> None:
        unsupported = {
            "attention dropout (--attention-dropout > 0)": config.attention_dropout > 0,
            "--attention-output-gate": config.attention_output_gate,
            "--qk-l2-norm": config.qk_l2_norm,
            "--window-size (sliding window)": config.window_size is not None,
            "--multi-latent-attention": config.multi_latent_attention,
            "a non-causal attention mask": attn_mask_type != AttnMaskType.causal,
            "--softmax-type other than vanilla (attention sinks)": config.softmax_type != "vanilla",
            "--qk-clip or --log-max-attention-logit": config.qk_clip or config.log_max_attention_logit,
            "--experimental-attention-variant": config.experimental_attention_variant is not None,
            "--fp8-format or --fp4-format": config.fp8 is not None or config.fp4 is not None,
        }
        for feature, used in unsupported.items():
            if used:
                raise ValueError(f"TSP attention does not support {feature}; remove it or use --tsp-size 1")
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        self.keep_weight_shards = keep_weight_shards
        self.buckets_per_call = buckets_per_call
        # started behind this attention's own transfers in forward: the layer's next weights (TSPTransformerLayer)
        self.prefetch: Optional[Callable[[], None]] = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                key_value_states: Optional[torch.Tensor] = None, inference_context: Any = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, rotary_pos_cos: Any = None,
                rotary_pos_sin: Any = None, rotary_pos_cos_sin: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None, sequence_len_offset: Any = None, *,
                inference_params: Any = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if key_value_states is not None or inference_context is not None or inference_params is not None:
            raise ValueError("TSP attention is self-attention for training: no cross-attention or inference")
        if packed_seq_params is not None or attention_bias is not None or rotary_pos_cos is not None:
            raise ValueError("TSP attention does not support packed sequences, attention bias or fused "
                             "cos/sin RoPE")
        group = _tsp_group(self)
        tsp_size, tsp_rank = group_size(group), group_rank(group)
        seq_len, device = hidden_states.shape[0] * tsp_size, hidden_states.device
        q_positions, k_positions = _zigzag_positions(seq_len, tsp_size, tsp_rank, device)
        if self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None  # a layer without RoPE (--no-rope-freq), as in Megatron's attention
        rotary_freqs = None
        rotary_fn = per_head_rotary(partial(apply_rotary_pos_emb, config=self.config,
                                            cp_group=self.pg_collection.cp))
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):  # Megatron passes (q, k) angles; for self-attention equal
                rotary_pos_emb = rotary_pos_emb[0]
            # Megatron's unfused RoPE, with cos/sin made once instead of per head bucket, tensor and layer
            cos_sin = not self.config.apply_rope_fusion and not self.config.rotary_interleaved
            rotary_freqs = _local_rotary(rotary_pos_emb, q_positions, hidden_states.dtype, cos_sin)
            if cos_sin:
                rotary_fn = apply_rotary_cos_sin
        qk_norm = None
        if self.q_layernorm is not None:
            qk_norm = QKNorm(fn=self.q_layernorm.normalize, q_weight=self.q_layernorm.weight,
                             k_weight=self.k_layernorm.weight, q_bias=self.q_layernorm.bias,
                             k_bias=self.k_layernorm.bias)
        output = tsp_attention(
            hidden_states, self.linear_qkv.weight, self.linear_qkv.bias, self.linear_proj.weight,
            q_positions, k_positions, group,
            self.config.num_attention_heads, self.config.num_query_groups,
            softmax_scale=self.config.softmax_scale, rotary_freqs=rotary_freqs, rotary_fn=rotary_fn, qk_norm=qk_norm,
            core_attention=self.core_attention, keep_weights=self.keep_weight_shards,
            buckets_per_call=self.buckets_per_call, prefetch=self.prefetch)
        return output, self.linear_proj.bias


class TSPMLP(MLP):
    """Dense (gated or not) MLP by the TSP weight ring (or with gathered weights, ``--tsp-mlp-schedule
    gather``): ``[S/D, b, h]`` in, ``([S/D, b, h], fc2 bias)`` out."""

    keep_weight_shards = False  # set by as_mlp_submodule
    schedule = "ring"  # set by as_mlp_submodule

    @classmethod
    def as_mlp_submodule(cls, *args: Any, keep_weight_shards: bool = False, schedule: str = "ring",
                         **kwargs: Any) -> "TSPMLP":
        """Megatron's builder of a layer's MLP, plus ``--tsp-keep-weight-shards`` and ``--tsp-mlp-schedule``."""
        mlp = super().as_mlp_submodule(*args, **kwargs)
        mlp.keep_weight_shards = keep_weight_shards
        mlp.schedule = schedule
        return mlp

    def __init__(self, config, submodules: MLPSubmodules, is_expert: bool = False, **kwargs: Any) -> None:
        if is_expert:
            raise ValueError("TSP MLP is the dense MLP; experts use Megatron's expert-parallel MoE layer")
        if config.glu_linear_offset != 0 or config.activation_func_clamp_value is not None:
            raise ValueError("TSP MLP does not support --glu-linear-offset or --activation-func-clamp-value")
        super().__init__(config, submodules, is_expert=is_expert, **kwargs)
        self._prefetched_fc1: Optional[Prefetch] = None

    def prefetch_weights(self) -> None:
        """Start the gathered schedule's fc1 gathers for this MLP's next forward (the layer's attention calls
        it: they then travel during attention's compute instead of being waited for at once)."""
        self.drop_prefetch()
        self._prefetched_fc1 = prefetch_gathered_fc1(self.linear_fc1.weight, self.linear_fc1.bias, _tsp_group(self))

    def drop_prefetch(self) -> None:
        """Wait for and drop fc1 gathers no forward took (a layer forward that stopped before its MLP)."""
        if self._prefetched_fc1 is not None:
            self._prefetched_fc1.drain()
            self._prefetched_fc1 = None

    def forward(self, hidden_states: torch.Tensor, per_token_scale: Optional[torch.Tensor] = None,
                **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if per_token_scale is not None:
            raise ValueError("TSP MLP does not support per-token scaling (a MoE expert feature)")
        prefetched, self._prefetched_fc1 = self._prefetched_fc1, None  # each prefetch serves one forward
        output = tsp_mlp(hidden_states, self.linear_fc1.weight, self.linear_fc1.bias, self.linear_fc2.weight,
                         _tsp_group(self), activation=self.config.activation_func,
                         gated=self.config.gated_linear_unit, keep_weights=self.keep_weight_shards,
                         schedule=self.schedule, prefetched_fc1=prefetched)
        return output, self.linear_fc2.bias


class TSPTransformerLayer(TransformerLayer):
    """Megatron's transformer layer whose TSP attention starts the gathered MLP's fc1 gathers (``--tsp-mlp-schedule
    gather``) behind its own transfers, so that they travel during attention's compute: the MLP's forward, and
    a full recompute's, then finds them done (a selective recompute of the MLP alone gathers its own). The
    gathered fc1 weight is then alive from attention's last call on instead of from the MLP's start; the
    layer's peak stays its backward's, which holds all the gathered MLP weights anyway (CPU allocator: the
    same peaks with and without, docs/benchmarks.md). No prefetch outlives the layer's forward (an unused one
    is drained there), so none can carry weights from before an optimizer step. Otherwise Megatron's layer as
    it is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefetching = (isinstance(self.self_attention, TSPSelfAttention) and isinstance(self.mlp, TSPMLP)
                             and self.mlp.schedule == "gather")
        if self._prefetching:
            self.self_attention.prefetch = self.mlp.prefetch_weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*args, **kwargs)
        finally:
            if self._prefetching:
                self.mlp.drop_prefetch()


class TSPRingExperts(SequentialMLP):
    """A rank's local experts by the TSP ring (``--tsp-expert-ring``): Megatron's SequentialMLP with
    expert-tensor-parallel size D on the TSP group, so parameters, initialisation and checkpoints are Megatron's
    expert-TP ones, but each rank keeps its own dispatched tokens and the experts' shards circulate
    (``mlp.tsp_expert_mlps``) instead of Megatron gathering the tokens over the expert-TP group.

    ``[T, h]`` tokens sorted by local expert in, ``([T, h], None)`` out, routing probs applied. No biases:
    megatron-core 0.19.2 refuses them in MoE models with expert-TP > 1 (and ``args.py`` says so first).
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules: Any,
                 pg_collection: Optional[ProcessGroupCollection] = None, keep_weight_shards: bool = False,
                 **kwargs: Any) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        if dist.get_process_group_ranks(pg_collection.expt_tp) != dist.get_process_group_ranks(pg_collection.tp):
            raise ValueError("--tsp-expert-ring: the expert-tensor-parallel group is not the TSP group; keep tsp "
                             "first in --tsp-order")
        unsupported = {"--fp8/--fp4": config.fp8 or config.fp4, "--moe-latent-size": config.moe_latent_size,
                       "linear biases": config.add_bias_linear,
                       "--glu-linear-offset or --activation-func-clamp-value":
                           config.glu_linear_offset != 0 or config.activation_func_clamp_value is not None}
        for flag, used in unsupported.items():
            if used:
                raise ValueError(f"--tsp-expert-ring does not support {flag}; remove it or drop --tsp-expert-ring")
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs)
        self.keep_weight_shards = keep_weight_shards

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor) -> tuple[torch.Tensor, None]:
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            hidden, probs = (probs.unsqueeze(-1) * hidden).to(hidden.dtype), torch.ones_like(probs)
        output = tsp_expert_mlps(
            hidden, [int(n) for n in tokens_per_expert.tolist()],
            [(expert.linear_fc1.weight, None, expert.linear_fc2.weight) for expert in self.local_experts],
            self.tp_group, activation=self.config.activation_func, gated=self.config.gated_linear_unit,
            keep_weights=self.keep_weight_shards)
        # Megatron scales each token's activation by its routing prob before fc2; the scale is one number per
        # token, so scaling the expert's output is the same.
        return (output * probs.unsqueeze(-1)).to(hidden.dtype), None


def _tokens_stay_local(pg_collection: ProcessGroupCollection) -> ProcessGroupCollection:
    """The dispatcher's view for the expert ring: no expert-tensor-parallel group (megatron-core reads a
    missing group as size 1), so it neither gathers tokens over the TSP axis nor reduce-scatters outputs."""
    view = copy.copy(pg_collection)
    view.expt_tp, view.tp_ep = None, pg_collection.ep
    return view


class TSPMoELayer(MoELayer):
    """Megatron's MoE layer, routing each rank's local tokens, with expert params never summed over TSP.

    megatron-core 0.19.2 tags expert output biases ``sequence_parallel`` (its RowParallelLinear copies the
    layer's flag), so grad finalisation would sum their grads over the TSP group, whose ranks hold
    *different* experts under parallel folding. Experts are on the expert-parallel axis only: untag them.
    With :class:`TSPRingExperts` (no biases) the ring itself completes every expert grad at its owner.
    """

    def __init__(self, config: TransformerConfig, submodules: Any = None, layer_number: Optional[int] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, **kwargs: Any) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection=pg_collection, **kwargs)
        for param in self.experts.parameters():
            param.sequence_parallel = False
        if isinstance(self.experts, TSPRingExperts):  # rebuilt with the view that keeps tokens on their rank
            self.token_dispatcher = type(self.token_dispatcher)(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=_tokens_stay_local(pg_collection))
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)


def tsp_output_loss(*, hidden_states: torch.Tensor, output_layer: ColumnParallelLinear,
                    output_weight: Optional[torch.Tensor], labels: Optional[torch.Tensor], config: TransformerConfig,
                    runtime_gather_output: Optional[bool] = None, **unused: Any) -> torch.Tensor:
    """GPTModel's ``output_processor`` (megatron-core 0.19.2) for ``--tsp-output-layer vocab-ring``: the
    per-token language-model loss ``[b, s]`` by the vocabulary ring (``output.py``) from the rank's
    ``[s/D, b, h]`` final hidden states, instead of Megatron's output layer over gathered hidden states.
    Without labels (generation) the logits come from Megatron's output layer, as GPTModel returns them.
    """
    if labels is None:
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()
    if config.use_mup or output_layer.bias is not None:
        raise ValueError("--tsp-output-layer vocab-ring does not support MuP logit scaling or an output-layer "
                         "bias; use --tsp-output-layer megatron")
    weight = output_layer.weight if output_weight is None else output_weight
    return tsp_vocab_parallel_loss(hidden_states, weight, labels, output_layer.tp_group,
                                   shared_weight=output_weight is not None or bool(config.mtp_num_layers))


# Set on an output layer whose losses the vocabulary ring computes (--tsp-output-layer vocab-ring): Megatron's
# multi-token prediction losses then take the ring too (patches.py routes process_mtp_loss to tsp_mtp_loss).
VOCAB_RING_OUTPUT = "tsp_vocab_ring"


def tsp_mtp_loss(*, hidden_states: torch.Tensor, labels: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor],
                 output_layer: ColumnParallelLinear, output_weight: Optional[torch.Tensor], is_training: bool,
                 config: TransformerConfig, cp_group: Optional[dist.ProcessGroup] = None,
                 packed_seq_params: Any = None, scale_logits_fn: Any = None,
                 input_ids: Optional[torch.Tensor] = None, **unused: Any) -> torch.Tensor:
    """megatron-core 0.19.2's ``process_mtp_loss`` (same arguments and contract) for an output layer marked
    :data:`VOCAB_RING_OUTPUT`: each prediction depth's per-token loss by the vocabulary ring from the rank's
    ``[s/D, b, h]`` MTP hidden states (never ``[s, b, V/D]`` logits, nor the gathered hidden states). Takes
    ``hidden_states`` ``[(1 + depths) * s/D, b, h]`` (the decoder's, then each depth's); labels and loss mask are
    shifted one more token per depth (by Megatron's ``roll_tensor``, which patches.py makes shift in natural
    order), each depth's masked loss and prediction acceptance counts go to Megatron's MTP logging, and the
    losses are attached to the decoder's hidden states, which are returned, for backward
    (``MTPLossAutoScaler``), scaled as Megatron does.
    """
    if scale_logits_fn is not None:
        raise ValueError("--tsp-output-layer vocab-ring does not support MuP logit scaling; use "
                         "--tsp-output-layer megatron")
    depths = config.mtp_num_layers
    decoder_hidden, *depth_hidden = torch.chunk(hidden_states, 1 + depths, dim=0)

    def shift(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # one token left, and the shifted sum
        return multi_token_prediction.roll_tensor(t, shifts=-1, dims=-1, cp_group=cp_group,
                                                  packed_seq_params=packed_seq_params)

    if labels is None:  # as Megatron: the next input id; nothing to score without input ids either
        if input_ids is None:
            return decoder_hidden
        labels, _ = shift(input_ids)
        loss_mask = shift(loss_mask if loss_mask is not None else torch.ones_like(labels))[0]
    elif loss_mask is None:
        loss_mask = torch.ones_like(labels)
    weight = output_layer.weight if output_weight is None else output_weight
    if config.mtp_detach_heads:
        weight = weight.detach()
    unshifted_tokens = loss_mask.sum()
    depth_labels = labels
    for depth, hidden in enumerate(depth_hidden):
        depth_labels, _ = shift(depth_labels)
        loss_mask, tokens = shift(loss_mask)
        if is_training:
            losses, predicted = tsp_vocab_parallel_loss_and_predictions(hidden, weight, depth_labels,
                                                                        output_layer.tp_group, shared_weight=True)
        else:
            losses = tsp_vocab_parallel_loss(hidden, weight, depth_labels, output_layer.tp_group, shared_weight=True)
        masked = loss_mask * losses
        counted = tokens.clamp(min=1)
        if is_training:
            scored = loss_mask.bool()
            multi_token_prediction.MTPLossLoggingHelper.save_metrics_to_tracker(
                masked.sum() * (tokens > 0).to(masked.dtype) / counted,
                ((predicted == depth_labels) & scored).sum().float(), scored.sum().float(), depth, depths,
                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        scale = config.mtp_loss_scaling_factor / depths
        if config.calculate_per_token_loss:  # finalize_model_grads divides by the decoder's token count
            attached = scale * masked * (unshifted_tokens / counted)
        else:
            attached = scale * masked / counted
        decoder_hidden = multi_token_prediction.MTPLossAutoScaler.apply(decoder_hidden, attached)
    return decoder_hidden


def get_gpt_layer_tsp_spec(qk_layernorm: bool = False, num_experts: Optional[int] = None,
                           moe_grouped_gemm: bool = False, expert_ring: bool = False,
                           keep_weight_shards: bool = False, attention_buckets_per_call: int = 1,
                           mlp_schedule: str = "ring", **unused: Any) -> ModuleSpec:
    """Transformer layer with TSP attention, sequence-sharded norms and a TSP MLP, or with ``num_experts``
    Megatron's MoE layer (experts on their own expert-parallel view of the same ranks, routing each rank's
    local tokens; with ``expert_ring`` each expert sharded over the TSP axis and run by the ring).
    ``keep_weight_shards``: the schedules keep forward's weight shards for backward;
    ``attention_buckets_per_call``: head buckets per TSP attention call (``attention.py``); ``mlp_schedule``:
    the dense MLP's, ring or gather (``mlp.py``). Extra keyword
    arguments (Megatron's spec helpers pass backend flags) are ignored.
    """
    if not isinstance(attention_buckets_per_call, int) or mlp_schedule not in MLP_SCHEDULES:
        raise ValueError(f"TSP layer spec with head buckets per call {attention_buckets_per_call!r} and MLP "
                         f"schedule {mlp_schedule!r}: 'auto' is resolved by plan.resolve_auto_schedules before "
                         f"the model is built (the entry points do it once the process group exists)")
    if num_experts is None:
        mlp = partial(TSPMLP.as_mlp_submodule, keep_weight_shards=keep_weight_shards, schedule=mlp_schedule,
                      submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    else:
        megatron_moe = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts,
                                                       moe_grouped_gemm=moe_grouped_gemm)
        submodules = megatron_moe.keywords["submodules"]
        if expert_ring:
            submodules = replace(submodules, experts=partial(TSPRingExperts, keep_weight_shards=keep_weight_shards,
                                                             **submodules.experts.keywords))
        mlp = partial(TSPMoELayer, submodules=submodules)  # Megatron's submodules, our layer class
    return ModuleSpec(
        module=TSPTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceShardedNorm,
            self_attention=ModuleSpec(
                module=TSPSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal, "keep_weight_shards": keep_weight_shards,
                        "buckets_per_call": attention_buckets_per_call},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=select_core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=SequenceShardedNorm if qk_layernorm else IdentityOp,
                    k_layernorm=SequenceShardedNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceShardedNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as Megatron's local and TE specs, so checkpoints interchange with them.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Which layers are MoE layers, from ``--moe-layer-freq`` (N: every N-th layer from the first; or a
    per-layer list of 0/1). All False without experts."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    pattern = [layer % freq == 0 for layer in range(config.num_layers)] if isinstance(freq, int) else \
        [bool(flag) for flag in freq]
    if len(pattern) != config.num_layers:
        raise ValueError(f"--moe-layer-freq lists {len(pattern)} layers but --num-layers is {config.num_layers}")
    return pattern


def get_gpt_decoder_block_tsp_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                                   pp_rank: Optional[int] = None,
                                   keep_weight_shards: bool = False,
                                   attention_buckets_per_call: int = 1,
                                   mlp_schedule: str = "ring") -> TransformerBlockSubmodules:
    """The decoder block of this pipeline (and virtual pipeline) stage: dense or MoE TSP layers by
    ``--moe-layer-freq``, and a sequence-sharded final norm (Megatron's default final norm refuses sequence
    parallelism without Apex/TE). Experts sharded over the TSP axis (expert-tensor-parallel size > 1, which
    the TSP validation allows only with ``--tsp-expert-ring``) run by the expert ring.
    ``keep_weight_shards``: ``--tsp-keep-weight-shards``; ``attention_buckets_per_call``:
    ``--tsp-attention-buckets-per-call``; ``mlp_schedule``: ``--tsp-mlp-schedule``.
    """
    options = {"keep_weight_shards": keep_weight_shards, "attention_buckets_per_call": attention_buckets_per_call,
               "mlp_schedule": mlp_schedule}
    dense = get_gpt_layer_tsp_spec(qk_layernorm=config.qk_layernorm, **options)
    moe = get_gpt_layer_tsp_spec(qk_layernorm=config.qk_layernorm, num_experts=config.num_moe_experts,
                                 moe_grouped_gemm=config.moe_grouped_gemm,
                                 expert_ring=config.expert_tensor_parallel_size > 1,
                                 **options) if config.num_moe_experts else None
    layers = [moe if is_moe else dense for is_moe in moe_layer_pattern(config)]
    first = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[first:first + count], layer_norm=SequenceShardedNorm)


class _SequenceShardedNormBackend(LocalSpecProvider):
    """Megatron's local backend with TSP's sequence-sharded norm (Megatron's torch norm refuses sequence
    parallelism, and a multi-token prediction layer normalises the rank's ``[S/D]`` tokens)."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
        return SequenceShardedNorm


class TSPMultiTokenPredictionLayer(multi_token_prediction.MultiTokenPredictionLayer):
    """Megatron's multi-token prediction layer whose input projection ``eh_proj`` runs on the rank's own
    ``[S/D, B, 2h]`` tokens by gathered weights (``linear.py``), where Megatron's sequence-parallel linear
    gathers that input over the TSP ranks and its ``[S, B, h]`` output before scattering it again. ``eh_proj``
    stays Megatron's ``ColumnParallelLinear`` as the holder of its shard (same checkpoint)."""

    def _concat_embeddings(self, hidden_states: torch.Tensor, decoder_input: torch.Tensor) -> torch.Tensor:
        if self.eh_proj.bias is not None:
            raise ValueError("TSP multi-token prediction: eh_proj has a bias, which megatron-core 0.19.2 never "
                             "builds and tsp_gathered_linear does not apply")
        embedded_and_hidden = torch.cat((self.enorm(decoder_input), self.hnorm(hidden_states)), dim=-1)
        return tsp_gathered_linear(embedded_and_hidden, self.eh_proj.weight, self.tp_group)


def get_gpt_mtp_block_tsp_spec(config: TransformerConfig, decoder: TransformerBlockSubmodules,
                               vp_stage: Optional[int] = None) -> Any:
    """Megatron's multi-token prediction block (``--mtp-num-layers``) over the decoder's last TSP layer spec,
    with sequence-sharded norms and :class:`TSPMultiTokenPredictionLayer`; None on stages without MTP layers.
    Its inputs and labels are shifted in natural order although TSP holds them in zigzag order
    (``megatron_compat.patches``); its losses take the vocabulary ring with the decoder's (:func:`tsp_mtp_loss`)
    or Megatron's output layer (``--tsp-output-layer megatron``)."""
    block = get_gpt_mtp_block_spec_for_backend(config, decoder, _SequenceShardedNormBackend(), vp_stage=vp_stage)
    if block is None:
        return None
    return replace(block, layer_specs=[replace(spec, module=TSPMultiTokenPredictionLayer)
                                       for spec in block.layer_specs])
