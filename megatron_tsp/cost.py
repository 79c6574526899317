"""Cost model: communication bytes, peak memory and step time per GPU for TSP and Megatron's layouts.

Sources: TSP.md (formulas), BASELINES.md (measured Megatron TP+SP memory and step times on one H200), and
the docstrings of ``attention.py`` / ``mlp.py`` (the bytes our TSP schedules move, counted by
:func:`megatron_tsp.comm.comm_bytes`). Everything is per GPU, per micro-batch unless a name says "step".

Conventions
- Bytes follow ``comm.py``: broadcast, reduce, all_gather and reduce_scatter move (n-1)/n of the full
  tensor per rank; all_reduce is a reduce_scatter plus an all_gather, 2(n-1)/n; all_to_all moves the
  (n-1)/n of its input that leaves the rank; ring_send and send move the bytes sent. Communication is kept
  as exact fractions so the TSP terms can be compared with the implementation's counters for equality.
- Symbols: h hidden, nq/nkv query heads/kv groups, hd head dim (nq*hd = h in the usual shapes, then the
  attention weights are TSP.md's (2 + 2/g)*h^2), ffn, B micro-batch, S sequence, t tensor degree (TP and
  TSP's D), c context degree, e/a/e_acc bytes per parameter/activation/gradient-accumulator element
  (e_acc = fp32 for 16-bit params: Megatron's main grads and our TSP accumulators).
- Layout kinds: ``TP`` (Megatron tensor parallelism without sequence parallelism; t = 1 is plain data
  parallelism), ``TP+SP`` (Megatron's one-axis sequence parallelism), ``CP`` (context parallelism, Transformer
  Engine's p2p ring), ``TPxCP`` (TP+SP inside CP), ``TSP``. PP, DP and EP combine with each; experts use
  expert-tensor-parallel size 1 (assumed for the others too), except TSP with ``expert_ring``
  (``--tsp-expert-ring``: each expert sharded over the D TSP ranks and run by the MLP ring).

Assumptions (stated once, used throughout)
- Megatron's local layer spec with a fused SDPA kernel (no S^2 score matrix kept), dropout 0, RMSNorm.
- Selective recompute (Megatron's default module, core attention) saves no memory with a fused kernel: the
  kernel keeps only q, k, v, output and the log-sum-exp either way. It re-runs the core attention forward.
  Megatron's ``--recompute-modules`` pick what selective recompute covers (``Workload.recompute_modules``;
  ``RECOMPUTE_MODULES`` are modelled): layernorm drops the norm outputs (local spec: the norms are modules
  of their own), mlp / moe make a layer's MLP keep only its input and re-run its forward in backward (for
  TSP too: Megatron checkpoints the TSP MLP, MoE layer and expert ring like its own), moe_act and
  shared_experts drop part of a MoE layer's (:func:`layer_recomputed_bytes`).
- TSP layers keep from forward what their backward needs (attention.py, mlp.py: each head bucket's qkv
  projection, core-attention output and LSE; each MLP shard's fc1 output) and recompute only elementwise
  work (norms, RoPE, the activation), so their backward costs two forwards, like Megatron's. Megatron's
  full recompute adds a forward; its selective recompute of core attention does not reach into TSP layers.
- Skipped (each < 1% of the totals it belongs to): biases and norms in FLOPs, the log-sum-exp, router
  logits and the RoPE angles TSP attention keeps in activations, the per-token scalar all-reduces of the
  vocab-parallel cross entropy (and of multi-token prediction's vocab-parallel argmax), the TSP norm-weight
  grad sums, the tied-embedding grad all-reduce between
  pipeline ends, the optimizer step time.

Peak memory model (``Memory``)
- Model state: weights e + main grads e_acc per parameter, Adam 12 bytes (fp32 master copy + 2 moments; 8
  for fp32 params), divided over data-parallel ranks with the distributed optimizer (dense params over
  DP x CP, experts over the expert-data-parallel ranks).
- Stored activations: each layer keeps :func:`layer_saved_bytes` (no or selective recompute, less
  :func:`layer_recomputed_bytes`) or its input (full recompute; with block recompute only some layers do,
  :func:`layer_groups`; with uniform chunks of N layers one in N), times the micro-batches
  in flight on the stage (1F1B: PP on the first stage); with no full recompute also
  :func:`layer_kept_attention_bytes`, :func:`layer_kept_fc1_bytes` and, with ``tsp_keep_weights``,
  :func:`layer_kept_weight_bytes`. Multi-token prediction depths sit on the last stage, each a layer of the
  decoder's last kind (recomputed as :func:`mtp_layer_work` says) plus :func:`mtp_extra_saved_bytes`.
- Working set, the larger of: one layer's backward, ``BACKWARD_FACTOR`` x its saved activations (the
  recomputed activations and their gradients) plus :func:`layer_transient_bytes` (which under full
  recompute holds what the TSP schedules keep from the recomputed forward) plus the layer's kept weights
  under full recompute, plus, with uniform chunks of N layers, the other N-1 layers' saved and kept
  activations (re-made together before the chunk's backward); and the output layer's :func:`logits_bytes`.
  Plus a constant ``OFFSET_BYTES``.

Calibration against BASELINES.md (one H200, fake process group, D = 8, full recompute, micro-batch 1, no
vocab padding; the peaks exclude Adam state) and against this project's H100 measurements (docs/benchmarks.md,
same method, scripts/bench_gpu.py, every recompute mode the planner weighs). ``BACKWARD_FACTOR`` = 1.2 and
``OFFSET_BYTES`` = 0.08 GiB fit the "7B" TP+SP peaks of both GPUs; every other row is a prediction. What
Megatron's layers keep without recompute (:func:`_megatron_attention_elements`,
:func:`_megatron_mlp_activation_elements`) was read off its autograd graph on CPU and confirmed on the H100
(the no-recompute and selective rows; before, the model missed 18% and 24% there). Residual = model /
measured - 1.

| case (D = 8)                          | measured GiB | model GiB | residual | + Adam: measured / model |
|---------------------------------------|-------------:|----------:|---------:|-------------------------:|
| 7B TP+SP 16K (H200)                   |          7.6 |      7.60 |   -0.1%  |            20.0 / 19.97 |
| 7B TP+SP 32K (H200)                   |          8.9 |      8.93 |   +0.3%  |            21.3 / 21.30 |
| 7B TP+SP 64K (H200)                   |         11.6 |     11.59 |   -0.1%  |            23.9 / 23.96 |
| 7B TP+SP 128K (H200)                  |         16.9 |     16.91 |   +0.1%  |            29.3 / 29.28 |
| 7B TP (no SP) 16K (H200)              |         12.5 |     11.37 |   -9.0%  |            24.9 / 23.74 |
| 7B TP (no SP) 32K (H200)              |         17.7 |     16.48 |   -6.9%  |            30.1 / 28.85 |
| 7B TP (no SP) 64K (H200)              |         28.1 |     26.69 |   -5.0%  |            40.5 / 39.06 |
| 7B TP (no SP) 128K (H200)             |         48.9 |     47.11 |   -3.7%  |            61.2 / 59.48 |
| Llama-3-8B TP+SP 32K (H200)           |          9.9 |     10.13 |   +2.3%  |            21.2 / 21.35 |
| Llama-3-8B TP+SP 128K (H200)          |         22.8 |     23.43 |   +2.8%  |            34.0 / 34.65 |
| 7B TP+SP 128K (H100)                  |        17.01 |     16.91 |   -0.5%  |          29.38 / 29.28 |
| 7B TP+SP 32K, no recompute (H100)     |        38.34 |     38.50 |   +0.4%  |          50.71 / 50.87 |
| 7B TP+SP 128K, sel. norms+MLP (H100)  |        47.83 |     47.79 |   -0.1%  |          60.20 / 60.16 |
| 7B TSP 16K (H100)                     |         7.41 |      7.42 |   +0.1%  |          19.78 / 19.79 |
| 7B TSP 128K (H100)                    |        13.89 |     13.19 |   -5.0%  |          26.26 / 25.56 |
| 7B TSP 32K, no recompute (H100)       |        22.84 |     22.76 |   -0.3%  |          35.21 / 35.13 |
| 7B TSP 128K, sel. norms+MLP (H100)    |        32.83 |     32.51 |   -1.0%  |          45.20 / 44.87 |

Without SP the model misses 1.1-1.8 GiB (not identified; the factor fitted to TP+SP underweights the backward
of full-sequence norms). TSP under full recompute is low by 0.7-5.0% from 32K to 128K: a transient of its
backward the model does not hold and the CPU run does not show (on CPU, D = 4, one bucket per call, the model
is within 1% of the allocator once the CPU-only intermediates of torch's composite rms_norm are added,
docs/benchmarks.md).
The TSP rows' measurements predate the zigzag backward writing its grads in the input dtype and the MLP
writing a gated activation's grad into one buffer, which the model already follows (the latter takes
0.13 GiB off the model at 128K: -4.1% before it). The norm's intermediate is taken to be CPU-only (torch
runs rms_norm as one fused CUDA kernel, whose backward needs its input and rstd), so the model counts a norm's
input and output only. The Llama rows test the output layer's working set (its peak is the fp32 logits,
V/D = 16032), overestimated by 2-3%.

Step time: ``COMPUTE_EFFICIENCY`` = 0.73 is the fitted fraction of the measured matmul rate (787 TFLOP/s,
BASELINES.md) that the 7B TP+SP step reaches with communication faked (4/3 of model FLOPs with full
recompute). Compute time, model / measured - 1: 16K -3.4% (0.309 s vs 0.32), 32K +0.1%, 64K +2.1%,
128K +3.2% (5.90 s vs 5.72). TSP's layers (measured on an H100, the same 7B): ``TSP_DEVICE_FACTOR`` x that
time, and no less than ``TSP_HOST_SECONDS`` per layer, head bucket and forward-equivalent pass (the eager
schedule's kernel launches); model / measured - 1 under full recompute: 16K +5.1%, 32K +1.2%, 64K -13.4%
(host and device overlap only in part there), 128K +3.2%; 128K with the norms and MLPs recomputed +6.9%,
32K without recompute +2.5%. Communication time is bandwidth + latency per message with the overlap rules
of each :class:`Transfer`; it has not been measured against a real multi-GPU run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Literal

__all__ = [
    "BACKWARD_FACTOR",
    "COMPUTE_EFFICIENCY",
    "KINDS",
    "OFFSET_BYTES",
    "RECOMPUTE_MODULES",
    "TSP_DEVICE_FACTOR",
    "TSP_HOST_SECONDS",
    "Hardware",
    "LayerComm",
    "LayerFlops",
    "Layout",
    "Memory",
    "ModelShape",
    "Stage",
    "StepBytes",
    "StepCost",
    "Transfer",
    "Workload",
    "bytes_by_op",
    "edge_comm",
    "grad_sync_comm",
    "layer_comm",
    "layer_flops",
    "layer_groups",
    "layer_input_bytes",
    "layer_kept_attention_bytes",
    "layer_kept_fc1_bytes",
    "layer_kept_weight_bytes",
    "layer_recomputed_bytes",
    "layer_saved_bytes",
    "layer_transient_bytes",
    "logits_bytes",
    "memory",
    "mtp_comm",
    "mtp_extra_saved_bytes",
    "mtp_head_comm",
    "mtp_head_flops",
    "mtp_layer_work",
    "output_layer_flops",
    "pipeline_stages",
    "stage_memory",
    "stage_params",
    "step_cost",
    "tsp_attention_calls",
    "tsp_attention_comm",
    "tsp_host_steps",
    "tsp_layer_operators",
    "tsp_mlp_comm",
]

Recompute = Literal["none", "selective", "full"]
# Megatron's --recompute-modules the model knows (Workload.recompute_modules); mla_up_proj and gdn_norm_out
# belong to attention variants it does not model.
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts")
Kind = Literal["TP", "TP+SP", "CP", "TPxCP", "TSP"]
KINDS: tuple[Kind, ...] = ("TP", "TP+SP", "CP", "TPxCP", "TSP")

# Fitted to BASELINES.md's H200 runs and docs/benchmarks.md's H100 runs (the module docstring's table).
BACKWARD_FACTOR = 1.2
OFFSET_BYTES = 0.08 * 2**30
COMPUTE_EFFICIENCY = 0.73
# Measured on one H100 (docs/benchmarks.md): a TSP layer's device time is this times the FLOP-rate time
# (its GEMMs and attention kernels run at TP+SP's rate; the fp32 accumulation of bucket and shard partials,
# K/V packing and LSE merges add memory-bound work: 1.26x TP+SP's step at 128K), and its eager schedule
# launches about 10x TP+SP's kernels (per head bucket and ring step), so that the host sets the pace below
# ~64K tokens: TSP_HOST_SECONDS per layer, head bucket and forward-equivalent pass (fitted at 16K and 32K).
TSP_DEVICE_FACTOR = 1.26
TSP_HOST_SECONDS = 1.85e-3
# Operators (each at least one kernel launch on a GPU) a TSP layer dispatches in a training step under full
# recompute, norms, RoPE, attention, MLP and grads included (scripts/count_step_ops.py, D = 2, 4, 8, every G, both
# MLP schedules, rank 0 and rank D-1; CPU, 2026-11-29), on every rank but the first: with several attention calls
# 89 per call (+ 6 with G > 1 head buckets per call: their weights' concatenated copies, three passes) + 4 per head
# bucket (its weight broadcasts and grad reduce) + 74; with one call over all D buckets (each weight tensor
# gathered whole, its grads reduce-scattered as the GEMMs write them) 164 at every D; plus 27 per MLP ring step or
# 26 for the gathered MLP; rank 0 16 fewer per call (its first query chunk has no prefix part: one attention part
# call, LSE merge and their grads fewer per pass). Every count exact. They scale TSP_HOST_SECONDS, fitted on rank 0
# with one bucket per call and the ring, to other schedules and to the busiest rank (tsp_host_steps); without
# recompute the ratio of G = 8 to G = 1 (ring, D = 8) is within 4% of it on either rank. Counted, not timed on a
# GPU. (Rank 0's G = 1 count at D = 8 was 1455 when TSP_HOST_SECONDS was measured; RoPE's cos/sin made once per
# angle table, sums started by their first term, each GEMM after it adding into the sum, the gated activation's
# grad written without a concatenation, q and k rotated in one RoPE call with the sign in the table, and the LSE
# merge in six kernels took it to 906, which the model does not credit until a GPU measures it.)
_OPS_PER_CALL, _OPS_PER_CALL_CONCATENATED, _OPS_PER_BUCKET, _OPS_PER_LAYER = 89, 6, 4, 74
_OPS_ONE_CALL_LAYER, _OPS_PER_RING_STEP, _OPS_GATHERED_MLP = 164, 27, 26
_OPS_FIRST_RANK_FEWER_PER_CALL = 16


@dataclass(frozen=True)
class ModelShape:
    """A GPT's shape as Megatron builds it. ``vocab`` is unpadded; Megatron pads it to a multiple of
    ``vocab_divisor`` x the tensor degree (``--make-vocab-size-divisible-by``; 1 = no padding)."""

    hidden: int
    layers: int
    heads: int
    kv_groups: int
    head_dim: int
    ffn: int
    vocab: int
    gated: bool = True
    qkv_bias: bool = False
    linear_bias: bool = False  # fc1 bias moves with TSP's MLP shards; proj and fc2 biases are replicated
    tied_embeddings: bool = False
    vocab_divisor: int = 1
    experts: int = 0
    topk: int = 0
    expert_ffn: int = 0
    shared_expert_ffn: int = 0
    moe_layer_freq: int = 1  # every N-th layer from the first is MoE (Megatron's --moe-layer-freq N)
    rotary_dim: int | None = None  # RoPE channels per head: None = head_dim (--rotary-percent 1), 0 = no RoPE
    mtp_layers: int = 0  # multi-token prediction depths (--mtp-num-layers), on the last pipeline stage

    @property
    def rope_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def moe_layers(self) -> int:
        return math.ceil(self.layers / self.moe_layer_freq) if self.experts else 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def mtp_moe(self) -> bool:
        """Whether a multi-token prediction layer is MoE: it is built from the decoder's last layer's spec."""
        return bool(self.experts) and (self.layers - 1) % self.moe_layer_freq == 0

    @property
    def kv_width(self) -> int:
        """K and V elements per token: 2*nkv*hd (TSP.md's 2h/g)."""
        return 2 * self.kv_groups * self.head_dim

    def padded_vocab(self, tensor: int) -> int:
        multiple = self.vocab_divisor * tensor
        return math.ceil(self.vocab / multiple) * multiple

    def attention_weights(self, with_bias: bool = True) -> int:
        """Elements of the sharded attention weights: qkv (nq + 2nkv)*hd x h and proj h x nq*hd, plus the qkv
        bias. With nq*hd = h this is TSP.md's (2 + 2/g)*h^2."""
        qkv_rows = (self.heads + 2 * self.kv_groups) * self.head_dim
        weights = qkv_rows * self.hidden + self.hidden * self.heads * self.head_dim
        return weights + (qkv_rows if with_bias and self.qkv_bias else 0)

    def mlp_weights(self, ffn: int, with_bias: bool = True) -> int:
        """Elements of an MLP's sharded weights: fc1 (2 if gated) x ffn x h, fc2 h x ffn, plus the fc1 bias."""
        fc1_rows = (2 if self.gated else 1) * ffn
        weights = fc1_rows * self.hidden + self.hidden * ffn
        return weights + (fc1_rows if with_bias and self.linear_bias else 0)

    def replicated_layer_params(self, moe: bool) -> int:
        """Per-layer params every tensor rank holds whole: two norms, proj/fc2 biases, the router."""
        biases = 2 * self.hidden if self.linear_bias else 0
        return 2 * self.hidden + biases + (self.hidden * self.experts if moe else 0)


@dataclass(frozen=True)
class Workload:
    """What one micro-batch is and how it is trained."""

    micro_batch: int
    seq_len: int
    param_bytes: int = 2
    act_bytes: int = 2
    recompute: Recompute = "none"
    # --recompute-modules (with --recompute-granularity selective), as megatron-core 0.19.2 reads them (one of
    # RECOMPUTE_MODULES): core_attn re-runs core attention (not TSP's); layernorm drops both norms' outputs
    # and re-runs the norms in backward; mlp (dense layers) and moe (MoE layers: router, dispatch, experts,
    # combine, shared expert) keep only the MLP's input and run its forward again in backward; moe_act drops
    # Megatron's experts' activation outputs (its grouped-GEMM experts; the expert ring keeps none);
    # shared_experts re-runs the shared expert. moe covers what moe_act and shared_experts would drop.
    recompute_modules: tuple[str, ...] = ("core_attn",)
    # With full recompute, --recompute-method block --recompute-num-layers N: the first N layers of each
    # pipeline stage recompute, the others keep their activations. None: every layer recomputes (uniform).
    recompute_layers: int | None = None
    # With full recompute, --recompute-method uniform --recompute-num-layers N: each stage's layers are
    # checkpointed in chunks of N; a chunk keeps its input, and its backward first re-runs all N layers'
    # forward, holding their activations until each layer's backward has used them.
    recompute_chunk: int = 1
    distributed_optimizer: bool = False
    # TSP's default kernel (kernels/zigzag.py) splits each zigzag chunk into a non-causal prefix and a causal
    # diagonal: no mask, no work on future keys. True models the reference kernel (kernels/local.py), which
    # builds a boolean [S/D, S] mask per head bucket (SDPA turns it into an additive mask of the activation
    # dtype) and forgoes causal skipping.
    tsp_dense_mask: bool = False
    # --tsp-attention-buckets-per-call G: TSP attention runs D/G calls of G head buckets (attention.py): G
    # times the K/V, q/k and weight transients (plus a copy of a call's weights), fewer operators.
    tsp_buckets_per_call: int = 1
    # --tsp-mlp-schedule gather: the dense TSP MLP all-gathers its weights (mlp.py) instead of the ring: the
    # ring's bytes in 2-3 messages, the whole layer's MLP weights (and in backward fc2's grads) held at once.
    tsp_mlp_gather: bool = False
    # --tsp-keep-weight-shards: TSP layers keep the D weight shards forward fetched until their backward
    # (W_layer*e per layer, see layer_kept_weight_bytes), so backward moves no weights.
    tsp_keep_weights: bool = False
    # --tsp-output-layer: TSP's output layer and loss by the vocabulary ring (output.py; True, the default)
    # or Megatron's output layer over gathered hidden states (False).
    tsp_vocab_ring: bool = True
    # The TSP rank costed: the busiest (False: every rank but the first, which a step waits for) or rank 0
    # (True: what a one-GPU benchmark of rank 0 measures; its attention runs fewer part calls).
    tsp_first_rank: bool = False

    def __post_init__(self) -> None:
        if self.recompute_chunk < 1 or (self.recompute_chunk > 1 and self.recompute_layers is not None):
            raise ValueError(f"recompute_chunk {self.recompute_chunk}: a positive count of layers, and 1 with "
                             f"block recompute (recompute_layers)")
        if self.tsp_buckets_per_call < 1:
            raise ValueError(f"--tsp-attention-buckets-per-call {self.tsp_buckets_per_call}: a positive count")
        unknown = set(self.recompute_modules) - set(RECOMPUTE_MODULES)
        if unknown:
            raise ValueError(f"--recompute-modules {' '.join(sorted(unknown))}: not modelled; the cost model "
                             f"knows {', '.join(RECOMPUTE_MODULES)}")

    def _selective(self, module: str) -> bool:
        return self.recompute == "selective" and module in self.recompute_modules

    def mlp_selectively_recomputed(self, moe: bool) -> bool:
        """Whether selective recompute re-runs this layer's whole MLP (module mlp, or moe in MoE layers)."""
        return self._selective("moe" if moe else "mlp")

    def core_attention_recomputed(self) -> bool:
        """Whether selective recompute re-runs Megatron's core attention (TSP attention keeps its outputs)."""
        return self._selective("core_attn")

    def norms_recomputed(self) -> bool:
        """Whether selective recompute drops the norms' outputs (module layernorm)."""
        return self._selective("layernorm")

    def expert_activation_recomputed(self, moe: bool) -> bool:
        """Whether selective recompute drops this MoE layer's expert activation outputs (module moe_act)."""
        return moe and self._selective("moe_act") and not self.mlp_selectively_recomputed(moe)

    def shared_expert_recomputed(self, moe: bool) -> bool:
        """Whether selective recompute re-runs this MoE layer's shared expert alone (module shared_experts)."""
        return moe and self._selective("shared_experts") and not self.mlp_selectively_recomputed(moe)

    @property
    def recompute_label(self) -> str:
        """The recompute mode as the planner prints it."""
        if self.recompute == "full" and self.recompute_layers is not None:
            return f"block {self.recompute_layers}"
        if self.recompute == "full" and self.recompute_chunk > 1:
            return f"uniform {self.recompute_chunk}"
        if self.recompute == "selective":
            return "sel:" + "+".join(self.recompute_modules)
        return self.recompute

    @property
    def grad_bytes(self) -> int:
        """Gradient accumulation element size: fp32 for 16-bit params, else the param dtype."""
        return max(self.param_bytes, 4)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``tensor`` is the TP degree (TSP's D), ``context`` the CP degree."""

    kind: Kind
    tensor: int = 1
    context: int = 1
    pipeline: int = 1
    data: int = 1
    expert: int = 1
    expert_ring: bool = False  # TSP only: experts sharded over the tensor (TSP) axis, run by the ring

    def __post_init__(self) -> None:
        if self.kind in ("TP", "TP+SP", "TSP") and self.context != 1:
            raise ValueError(f"{self.kind} has no context axis; use TPxCP")
        if self.kind == "CP" and self.tensor != 1:
            raise ValueError("CP has no tensor axis; use TPxCP")
        if self.expert_ring and (self.kind != "TSP" or self.tensor == 1):
            raise ValueError("expert_ring is TSP's (--tsp-expert-ring) and needs a TSP degree > 1")

    @property
    def expert_tensor(self) -> int:
        """Ranks each expert is sharded over: D with the expert ring, else 1."""
        return self.tensor if self.expert_ring else 1

    @property
    def gpus(self) -> int:
        return self.tensor * self.context * self.pipeline * self.data

    @property
    def sequence_shard(self) -> int:
        """Ranks the tokens of a sample are split over in the norm/residual region."""
        return self.context if self.kind == "TP" else self.tensor * self.context

    @property
    def expert_data(self) -> int:
        """Data-parallel ranks of an expert."""
        return self.gpus // (self.pipeline * self.expert * self.expert_tensor)

    @property
    def name(self) -> str:
        if self.kind == "TP":
            axes = [f"TP{self.tensor}"] if self.tensor > 1 else []
        elif self.kind == "CP":
            axes = [f"CP{self.context}"]
        elif self.kind == "TPxCP":
            axes = [f"TP{self.tensor}xCP{self.context}"]
        else:
            axes = [f"{self.kind}{self.tensor}"]
        axes += [f"{axis}{n}" for axis, n in (("PP", self.pipeline), ("DP", self.data), ("EP", self.expert))
                 if n > 1]
        axes += ["expert-ring"] * self.expert_ring
        return " ".join(axes) or "DP1"


# ---------------------------------------------------------------------------------------------- comm


@dataclass(frozen=True)
class Transfer:
    """One collective or send as one GPU sees it.

    ``op`` is comm.py's op name (or all_reduce, all_to_all, send); ``group`` the ranks it involves; ``span``
    how many consecutive ranks the group covers (it leaves the node when span > GPUs per node); ``hidden``
    whether the schedule overlaps it with compute of the same phase; ``messages`` how many calls carry
    ``nbytes`` in total (each pays the link latency).
    """

    what: str
    op: str
    nbytes: Fraction
    group: int
    span: int
    hidden: bool
    messages: int = 1

    @property
    def point_to_point(self) -> bool:
        return self.op in ("ring_send", "send")


@dataclass(frozen=True)
class LayerComm:
    """A layer's (or the model edges') transfers in forward, backward and recompute."""

    forward: tuple[Transfer, ...] = ()
    backward: tuple[Transfer, ...] = ()
    recompute: tuple[Transfer, ...] = ()

    def __add__(self, other: LayerComm) -> LayerComm:
        return LayerComm(self.forward + other.forward, self.backward + other.backward,
                         self.recompute + other.recompute)

    @property
    def transfers(self) -> tuple[Transfer, ...]:
        return self.forward + self.backward + self.recompute

    def total(self) -> Fraction:
        return sum((t.nbytes for t in self.transfers), Fraction(0))


def bytes_by_op(transfers: tuple[Transfer, ...]) -> dict[str, Fraction]:
    """Bytes per op name, the shape of :class:`megatron_tsp.comm.CommCounter`'s ``bytes_by_op``."""
    out: dict[str, Fraction] = {}
    for transfer in transfers:
        out[transfer.op] = out.get(transfer.op, Fraction(0)) + transfer.nbytes
    return out


def _share(n: int) -> Fraction:
    return Fraction(n - 1, n)


def _transfers(*specs: tuple) -> tuple[Transfer, ...]:
    """Transfers from (what, op, bytes, group, span, hidden[, messages]), dropping empty ones (degree-1
    groups)."""
    return tuple(Transfer(*spec) for spec in specs if spec[2])


def tsp_attention_calls(work: Workload, d: int) -> int:
    """How many attention calls a TSP layer of degree D runs: D/G (``--tsp-attention-buckets-per-call`` G)."""
    if d % work.tsp_buckets_per_call:
        raise ValueError(f"--tsp-attention-buckets-per-call {work.tsp_buckets_per_call} must divide the TSP "
                         f"size {d}")
    return d // work.tsp_buckets_per_call


def tsp_layer_operators(work: Workload, d: int) -> int:
    """Operators a TSP layer of degree D dispatches in a training step under full recompute (the ``_OPS_*``
    fit of scripts/count_step_ops.py's counts) with the workload's attention calls and MLP schedule, on the
    busiest rank (every rank but the first; a step waits for it), or with ``work.tsp_first_rank`` on rank 0,
    whose first query chunk has no keys before it: one attention part call, its merge and its grads fewer."""
    calls = tsp_attention_calls(work, d)
    mlp = _OPS_GATHERED_MLP if work.tsp_mlp_gather else _OPS_PER_RING_STEP * d
    first_rank_fewer = _OPS_FIRST_RANK_FEWER_PER_CALL * calls if work.tsp_first_rank or d == 1 else 0
    if calls == 1:
        return _OPS_ONE_CALL_LAYER + mlp - first_rank_fewer
    per_call = _OPS_PER_CALL + (_OPS_PER_CALL_CONCATENATED if calls < d else 0)
    return per_call * calls + _OPS_PER_BUCKET * d + _OPS_PER_LAYER + mlp - first_rank_fewer


def tsp_host_steps(work: Workload, d: int) -> float:
    """A TSP layer's host cost in units of :data:`TSP_HOST_SECONDS` per forward-equivalent pass, on its
    busiest rank (rank 0 with ``work.tsp_first_rank``): D (its head buckets) on rank 0 with one bucket per
    attention call and the MLP ring, where it was fitted; otherwise scaled by :func:`tsp_layer_operators`
    against that rank and schedule's."""
    fitted = replace(work, tsp_buckets_per_call=1, tsp_mlp_gather=False, tsp_first_rank=True)
    return d * tsp_layer_operators(work, d) / tsp_layer_operators(fitted, d)


def tsp_attention_comm(model: ModelShape, work: Workload, d: int) -> LayerComm:
    """TSP attention per layer (attention.py): W = attention weights, KV = 2*B*S*nkv*hd elements.

    forward: broadcast W*e and all_gather KV*a, each times (D-1)/D. backward: the same two again (weights
    re-fetched unless kept, K/V re-gathered from the kept projection), reduce_scatter KV*a (dK/dV) and
    reduce W*e_acc (weight grads into their owners). TSP.md's forward row. The K/V gather and dK/dV
    reduce-scatter are two half-size calls per attention call of G head buckets (chunk-major, comm.py);
    weights and their grads one message per bucket, or with one call over all D buckets an all_gather and a
    reduce_scatter per weight tensor (qkv, its bias, proj).

    Overlap (hidden: compute runs between a transfer's issue and its wait, ``comm.track_overlap``, which the
    tests hold this to). With D/G > 1 calls: call r+1's K/V and call r+2's weights travel during call r's
    attention, so only the first call's weights are exposed (1/(D/G) of them; two calls ahead in a third
    slot), and the K/V none; call r's dK/dV travel during call r+1's attention backward (the last call's
    during the one before it finishes), so none is exposed. With one call: the qkv weights and the K/V are
    waited for at once (exposed) and proj's gather runs during the attention kernel (hidden); in backward
    proj's is exposed (needed first) and qkv's hidden, and dK/dV exposed. Backward's K/V re-gather always
    runs during the output projection's grad GEMMs, and a call's weight-grad reduces during its input
    grad's GEMM (and the next call).
    """
    share, calls = _share(d), tsp_attention_calls(work, d)
    kv = work.tokens * model.kv_width * work.act_bytes * share
    gather = ("K/V", "all_gather", kv, d, d, calls > 1, 2 * calls)
    regather = ("K/V", "all_gather", kv, d, d, True, 2 * calls)  # behind the output projection's grad GEMMs
    dkv = ("dK/dV", "reduce_scatter", kv, d, d, calls > 1, 2 * calls)  # behind the next call's (or last's)
    if calls == 1:  # each weight tensor gathered whole, its grad reduce-scattered
        proj = model.hidden * model.heads * model.head_dim * share
        qkv, qkv_tensors = model.attention_weights() * share - proj, 2 if model.qkv_bias else 1

        def weights(what: str, op: str, element_bytes: int, qkv_hidden: bool, proj_hidden: bool) -> tuple:
            return ((f"attention {what} (qkv)", op, qkv * element_bytes, d, d, qkv_hidden, qkv_tensors),
                    (f"attention {what} (proj)", op, proj * element_bytes, d, d, proj_hidden, 1))
        refetch = () if work.tsp_keep_weights else weights("weights", "all_gather", work.param_bytes, True, False)
        return LayerComm(
            forward=_transfers(*weights("weights", "all_gather", work.param_bytes, False, True), gather),
            backward=_transfers(*refetch, regather, dkv,
                                *weights("weight grads", "reduce_scatter", work.grad_bytes, True, True)))
    attention, g = model.attention_weights() * share, work.tsp_buckets_per_call  # a message per bucket
    first, rest = Fraction(1, calls), 1 - Fraction(1, calls)
    fetch = (("attention weights (first call)", "broadcast", attention * work.param_bytes * first, d, d, False, g),
             ("attention weights", "broadcast", attention * work.param_bytes * rest, d, d, True, g * (calls - 1)))
    refetch = () if work.tsp_keep_weights else fetch
    return LayerComm(
        forward=_transfers(*fetch, gather),
        backward=_transfers(*refetch, regather, dkv, ("attention weight grads", "reduce",
                                                      attention * work.grad_bytes, d, d, True, g * calls)))


def _weight_ring_comm(what: str, weights: int, work: Workload, d: int, kept: bool) -> LayerComm:
    """A weight ring (weight_ring.py) over ``weights`` elements, D-1 hops of W/D each.

    forward: ring_send W*e*(D-1)/D, hidden (a rank starts on its own shard while the next one travels).
    backward: ring_send W*e*(D-1)/D (weights re-circulated, unless ``kept``) plus W*e_acc*(D-1)/D (grad
    accumulators). The re-circulated weights' first hop is exposed (backward starts on another rank's shard
    and waits for it; its own comes last), the other hops and every accumulator hop are hidden behind the
    shards' GEMMs (double buffering; the last accumulator hop behind the own shard's).
    """
    elements = weights * _share(d)
    hop = elements / (d - 1) if d > 1 else Fraction(0)  # W/D
    circulate = (f"{what} weights", "ring_send", elements * work.param_bytes, 2, d, True, d - 1)
    accumulate = (f"{what} weight grads", "ring_send", elements * work.grad_bytes, 2, d, True, d - 1)
    recirculate = () if kept else (
        (f"{what} weights (first hop)", "ring_send", hop * work.param_bytes, 2, d, False, 1),
        (f"{what} weights", "ring_send", (elements - hop) * work.param_bytes, 2, d, True, d - 2))
    return LayerComm(forward=_transfers(circulate), backward=_transfers(*recirculate, accumulate))


def tsp_mlp_comm(model: ModelShape, work: Workload, d: int, ffn: int, prefetched: bool = True) -> LayerComm:
    """TSP MLP per layer (mlp.py): the ring, :func:`_weight_ring_comm` with W = MLP weights incl. the fc1
    bias; or with gathered weights (``tsp_mlp_gather``) forward all_gather W*e, backward all_gather W*e
    without the fc1 bias (unless kept) and reduce_scatter W*e_acc, each times (D-1)/D, one message per
    tensor. Overlap (as :func:`tsp_attention_comm`'s): in forward fc1's gather travels during the layer's
    attention (``prefetched``: specs.TSPTransformerLayer starts it there; a forward of the MLP alone, as
    selective recompute of the MLP runs it, waits for it at once) and fc2's during fc1's GEMM; in backward
    both gathers and fc2's grad reduce-scatter run during GEMMs, fc1's grad reduce-scatter during the input
    grad's GEMM."""
    if not work.tsp_mlp_gather:
        return _weight_ring_comm("MLP", model.mlp_weights(ffn), work, d, work.tsp_keep_weights)
    share, fc1_tensors = _share(d), 2 if model.linear_bias else 1
    fc2 = model.hidden * ffn * share
    fc1, fc1_unbiased = model.mlp_weights(ffn) * share - fc2, model.mlp_weights(ffn, with_bias=False) * share - fc2
    refetch = () if work.tsp_keep_weights else (("MLP weights (fc1)", "all_gather", fc1_unbiased * work.param_bytes,
                                                 d, d, True, 1),
                                                ("MLP weights (fc2)", "all_gather", fc2 * work.param_bytes, d, d,
                                                 True, 1))
    return LayerComm(
        forward=_transfers(("MLP weights (fc1)", "all_gather", fc1 * work.param_bytes, d, d, prefetched, fc1_tensors),
                           ("MLP weights (fc2)", "all_gather", fc2 * work.param_bytes, d, d, True, 1)),
        backward=_transfers(*refetch,
                            ("MLP weight grads (fc1)", "reduce_scatter", fc1 * work.grad_bytes, d, d, True,
                             fc1_tensors),
                            ("MLP weight grads (fc2)", "reduce_scatter", fc2 * work.grad_bytes, d, d, True, 1)))


def _local_expert_weights(model: ModelShape, layout: Layout) -> int:
    """Elements of a rank's E/EP local experts (whole), the weights the expert ring circulates in one message."""
    return model.experts // layout.expert * model.mlp_weights(model.expert_ffn)


def _tensor_parallel_block(x: Fraction, t: int, sequence_parallel: bool, what: str) -> LayerComm:
    """Megatron's column- then row-parallel pair (attention or MLP) on an activation of x bytes [s, b, h].

    With SP: forward all_gather + reduce_scatter (exposed: no TE comm overlap); backward all_gather of the
    output grad (exposed), re-gather of the input for the weight grad (overlaps the data-grad GEMM) and
    reduce_scatter of the input grad (overlaps the weight-grad GEMM): 3 x instead of TSP.md's 2 x, because
    Megatron keeps the sharded input and re-gathers it. Without SP: an all_reduce each way, the backward
    one overlapping the weight-grad GEMM.
    """
    x = x * _share(t)
    if not sequence_parallel:
        return LayerComm(forward=_transfers((what, "all_reduce", 2 * x, t, t, False)),
                         backward=_transfers((what, "all_reduce", 2 * x, t, t, True)))
    return LayerComm(
        forward=_transfers((what, "all_gather", x, t, t, False), (what, "reduce_scatter", x, t, t, False)),
        backward=_transfers((what, "all_gather", x, t, t, False), (what, "all_gather", x, t, t, True),
                            (what, "reduce_scatter", x, t, t, True)))


def _context_ring(model: ModelShape, work: Workload, layout: Layout) -> LayerComm:
    """Transformer Engine's p2p CP ring: (c-1)/c of the rank's full-sequence K/V (its nkv/t heads) passes
    each rank in forward, again in backward with dK/dV, all overlapping the attention chunks."""
    c, span = layout.context, layout.tensor * layout.context
    kv = work.tokens * Fraction(model.kv_width, layout.tensor) * work.act_bytes * _share(c)
    ring = ("K/V", "ring_send", kv, 2, span, True, c - 1)
    grad_ring = ("dK/dV", "ring_send", kv, 2, span, True, c - 1)
    return LayerComm(forward=_transfers(ring), backward=_transfers(ring, grad_ring))


def _moe_comm(model: ModelShape, work: Workload, layout: Layout, x: Fraction) -> LayerComm:
    """Megatron's MoE layer: all_to_all dispatch and combine of each local token's top-k copies over EP
    (exposed), and a shared expert run as a tensor-parallel (SP) MLP on the tensor axis. With the expert
    ring, the rank's E/EP local experts circulate over the TSP axis (:func:`_weight_ring_comm`)."""
    routed = work.tokens * Fraction(model.topk, layout.sequence_shard) * model.hidden * work.act_bytes
    ep = layout.expert
    dispatch = ("MoE dispatch/combine", "all_to_all", 2 * routed * _share(ep), ep, ep, False, 2)
    moe = LayerComm(forward=_transfers(dispatch), backward=_transfers(dispatch))
    if layout.expert_ring:
        moe += _weight_ring_comm("expert", _local_expert_weights(model, layout), work, layout.tensor,
                                 work.tsp_keep_weights)
    return moe + _shared_expert_comm(model, layout, x)


def _shared_expert_comm(model: ModelShape, layout: Layout, x: Fraction) -> LayerComm:
    """A MoE layer's shared expert, Megatron's SP MLP on the tensor axis (none without one)."""
    return _tensor_parallel_block(x, layout.tensor, True, "shared expert") if model.shared_expert_ffn else LayerComm()


def layer_comm(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> LayerComm:
    """One transformer layer's transfers on one GPU for one micro-batch; ``moe`` picks the MoE variant.

    Full recompute re-runs the layer forward (its transfers again); selective recompute re-runs core
    attention (module core_attn), which only CP's ring makes communicate, a dense layer's MLP (mlp), a MoE
    layer's dispatch, experts and shared expert (moe) or its shared expert alone (shared_experts).
    """
    t = layout.tensor
    x = work.tokens * Fraction(model.hidden * work.act_bytes, layout.context)  # one [S/c, B, h] activation
    if layout.kind == "TSP":
        attention = tsp_attention_comm(model, work, t)
        mlp = _moe_comm(model, work, layout, x) if moe else tsp_mlp_comm(model, work, t, model.ffn)
    else:
        sequence_parallel = layout.kind != "TP"
        attention = _tensor_parallel_block(x, t, sequence_parallel, "attention")
        if layout.context > 1:
            attention += _context_ring(model, work, layout)
        mlp = _moe_comm(model, work, layout, x) if moe else _tensor_parallel_block(x, t, sequence_parallel, "MLP")
    layer = attention + mlp
    if work.recompute == "full":
        return replace(layer, recompute=layer.forward)
    recompute: tuple[Transfer, ...] = ()
    if work.core_attention_recomputed() and layout.context > 1:
        recompute += _context_ring(model, work, layout).forward
    if work.mlp_selectively_recomputed(moe):  # the MLP's forward alone: a gathered fc1 is not prefetched
        recompute += (tsp_mlp_comm(model, work, t, model.ffn, prefetched=False) if layout.kind == "TSP" and not moe
                      else mlp).forward
    elif work.shared_expert_recomputed(moe):
        recompute += _shared_expert_comm(model, layout, x).forward
    return replace(layer, recompute=recompute)


def _embedding_comm(x: Fraction, layout: Layout) -> LayerComm:
    """Megatron's vocab-parallel embedding of one [S/c, B, h] activation ``x`` (bytes): reduce_scatter to the
    sequence shard (SP kinds and TSP; its backward all_gathers the grad) or all_reduce (TP)."""
    t, share = layout.tensor, _share(layout.tensor)
    if layout.kind == "TP":
        return LayerComm(forward=_transfers(("embedding", "all_reduce", 2 * x * share, t, t, False)))
    return LayerComm(forward=_transfers(("embedding", "reduce_scatter", x * share, t, t, False)),
                     backward=_transfers(("embedding", "all_gather", x * share, t, t, False)))


def _output_comm(model: ModelShape, work: Workload, layout: Layout, x: Fraction, predictions: bool) -> LayerComm:
    """The output layer and loss: all_gather of the final norm output, re-gathered in backward with a
    reduce_scatter of its grad (SP kinds), or one backward all_reduce (TP); TSP's vocabulary ring (output.py)
    instead circulates the output weight (:func:`_weight_ring_comm` with W = V*h, never kept) and all_gathers
    the fp32 per-token losses, and with ``predictions`` (multi-token prediction's acceptance counts) each
    token's predicted id (int64)."""
    t, share = layout.tensor, _share(layout.tensor)
    if layout.kind == "TSP" and work.tsp_vocab_ring:
        gathers = (("losses", "all_gather", work.tokens * 4 * share, t, t, False),
                   ("predictions", "all_gather", work.tokens * 8 * share * predictions, t, t, False))
        return (_weight_ring_comm("output", model.padded_vocab(t) * model.hidden, work, t, kept=False)
                + LayerComm(forward=_transfers(*gathers)))
    if layout.kind == "TP":
        return LayerComm(backward=_transfers(("output layer", "all_reduce", 2 * x * share, t, t, True)))
    return LayerComm(forward=_transfers(("output layer", "all_gather", x * share, t, t, False)),
                     backward=_transfers(("output layer", "all_gather", x * share, t, t, True),
                                         ("output layer", "reduce_scatter", x * share, t, t, True)))


def edge_comm(model: ModelShape, work: Workload, layout: Layout, stage: Stage) -> LayerComm:
    """Embedding (:func:`_embedding_comm`), output layer and loss (:func:`_output_comm`) and pipeline sends
    of one stage for one micro-batch. PP: each stage sends its output activation forward and its input grad
    backward ([S/shard, B, h], exposed)."""
    x = work.tokens * Fraction(model.hidden * work.act_bytes, layout.context)
    edges = LayerComm()
    if stage.embedding:
        edges += _embedding_comm(x, layout)
    if stage.output:
        edges += _output_comm(model, work, layout, x, predictions=False)
    if layout.pipeline > 1:
        boundary = x / (layout.sequence_shard // layout.context)
        edges += LayerComm(
            forward=_transfers(("pipeline activation", "send", boundary * (not stage.output), 2, layout.gpus, False)),
            backward=_transfers(("pipeline grad", "send", boundary * (not stage.embedding), 2, layout.gpus, False)))
    return edges


def mtp_layer_work(work: Workload) -> Workload:
    """What a multi-token prediction layer runs: megatron-core 0.19.2 checkpoints each MTP layer (its
    ``eh_proj``, transformer layer and final norm) under uniform full recompute, and none under block
    recompute (it warns and runs them plainly); selective recompute applies to its transformer layer."""
    if work.recompute == "full" and work.recompute_layers is not None:
        return replace(work, recompute="none", recompute_layers=None)
    return replace(work, recompute_chunk=1)


def _eh_proj_comm(model: ModelShape, work: Workload, layout: Layout, x: Fraction) -> LayerComm:
    """Multi-token prediction's input projection ``eh_proj`` ([2h] -> [h], column-parallel, no bias) of one
    depth. TSP (linear.py): the W = 2h^2-element weight all_gathered (forward, waited for at once), again in
    backward (during the weight grad's GEMM) with its grad reduce_scattered (during the input grad's), each
    (D-1)/D of W*e (W*e_acc). Megatron's column-parallel linear (SP kinds): the [S/c, B, 2h] input
    all_gathered and the [S/c, B, h/t] output all_gathered over the tensor axis (then split to the sequence
    shard), both exposed; backward the split's all_gather of the grad (exposed), the input re-gathered and its
    grad reduce_scattered (both overlapping GEMMs); TP: the output all_gathered, the input grad all_reduced."""
    t, share = layout.tensor, _share(layout.tensor)
    if layout.kind == "TSP":
        weights = 2 * model.hidden * model.hidden * share
        return LayerComm(
            forward=_transfers(("eh_proj weights", "all_gather", weights * work.param_bytes, t, t, False)),
            backward=_transfers(("eh_proj weights", "all_gather", weights * work.param_bytes, t, t, True),
                                ("eh_proj weight grads", "reduce_scatter", weights * work.grad_bytes, t, t, True)))
    output = ("eh_proj output", "all_gather", x * share, t, t, False)
    if layout.kind == "TP":
        return LayerComm(forward=_transfers(output),
                         backward=_transfers(("eh_proj", "all_reduce", 2 * 2 * x * share, t, t, True)))
    return LayerComm(forward=_transfers(("eh_proj", "all_gather", 2 * x * share, t, t, False), output),
                     backward=_transfers(("eh_proj output", "all_gather", x * share, t, t, False),
                                         ("eh_proj", "all_gather", 2 * x * share, t, t, True),
                                         ("eh_proj", "reduce_scatter", 2 * x * share, t, t, True)))


def mtp_head_comm(model: ModelShape, work: Workload, layout: Layout) -> LayerComm:
    """One multi-token prediction depth's transfers besides its transformer layer, for one micro-batch:
    Megatron's embedding of the shifted tokens, ``eh_proj`` (:func:`_eh_proj_comm`, recomputed with the
    layer as :func:`mtp_layer_work` says) and the output layer and loss again, which in training also finds
    each token's predicted id (the MTP acceptance counts)."""
    x = work.tokens * Fraction(model.hidden * work.act_bytes, layout.context)
    projection = _eh_proj_comm(model, work, layout, x)
    if mtp_layer_work(work).recompute == "full":
        projection = replace(projection, recompute=projection.forward)
    return _embedding_comm(x, layout) + projection + _output_comm(model, work, layout, x, predictions=True)


def mtp_comm(model: ModelShape, work: Workload, layout: Layout) -> LayerComm:
    """One multi-token prediction depth for one micro-batch: :func:`mtp_head_comm` and its transformer layer
    (:func:`layer_comm`, dense or MoE as the decoder's last layer, run as :func:`mtp_layer_work` says)."""
    return mtp_head_comm(model, work, layout) + layer_comm(model, mtp_layer_work(work), layout, model.mtp_moe)


def grad_sync_comm(model: ModelShape, work: Workload, layout: Layout, stage: Stage) -> tuple[Transfer, ...]:
    """Once per step: data-parallel grad reduction in e_acc (dense over DP x CP, experts over expert DP), in
    buckets of 40M params (Megatron DDP's default); with the distributed optimizer a reduce_scatter of grads
    plus an all_gather of the updated params."""
    dense, expert = stage_params(model, layout, stage)
    span = layout.gpus // layout.pipeline
    transfers: tuple[Transfer, ...] = ()
    for what, params, ranks in (("dense grads", dense, layout.data * layout.context),
                                ("expert grads", expert, layout.expert_data)):
        share, buckets = _share(ranks), math.ceil(params / 40_000_000)
        if work.distributed_optimizer:
            transfers += _transfers(
                (what, "reduce_scatter", params * work.grad_bytes * share, ranks, span, True, buckets),
                (what, "all_gather", params * work.param_bytes * share, ranks, span, True, buckets))
        else:
            transfers += _transfers((what, "all_reduce", 2 * params * work.grad_bytes * share, ranks, span, True,
                                     buckets))
    return transfers


# -------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Stage:
    """The layers a pipeline stage holds and the micro-batches it keeps in flight (1F1B)."""

    dense_layers: Fraction
    moe_layers: Fraction
    embedding: bool
    output: bool
    in_flight: int
    mtp_layers: int = 0  # multi-token prediction depths, on the output stage


def pipeline_stages(model: ModelShape, layout: Layout) -> tuple[Stage, ...]:
    """The first and last stage (the only candidates for the peak); one stage without PP. MoE layers are
    spread evenly over the stages."""
    p, mtp = layout.pipeline, model.mtp_layers
    dense, moe = Fraction(model.dense_layers, p), Fraction(model.moe_layers, p)
    if p == 1:
        return (Stage(dense, moe, embedding=True, output=True, in_flight=1, mtp_layers=mtp),)
    return (Stage(dense, moe, embedding=True, output=False, in_flight=p),
            Stage(dense, moe, embedding=False, output=True, in_flight=1, mtp_layers=mtp))


def stage_params(model: ModelShape, layout: Layout, stage: Stage) -> tuple[Fraction, Fraction]:
    """(dense, expert) parameters per GPU on a stage. Sharded weights divide by t (CP: replicated);
    experts divide by EP, and by D too with the expert ring. A multi-token prediction depth holds a layer
    like the decoder's last, ``eh_proj`` (2h^2/t) and three norms (its embedding and output weight are the
    model's)."""
    t = layout.tensor
    vocab_rows = Fraction(model.padded_vocab(t), t) * model.hidden
    ends = int(stage.embedding) + int(stage.output)
    if model.tied_embeddings and stage.embedding and stage.output:
        ends = 1  # one matrix serves both
    attention = Fraction(model.attention_weights(), t)
    dense_layer = attention + Fraction(model.mlp_weights(model.ffn), t) + model.replicated_layer_params(False)
    moe_layer = (attention + Fraction(model.mlp_weights(model.shared_expert_ffn), t)
                 + model.replicated_layer_params(True))
    mtp_layer = (moe_layer if model.mtp_moe else dense_layer) + Fraction(2 * model.hidden**2, t) + 3 * model.hidden
    dense = (stage.dense_layers * dense_layer + stage.moe_layers * moe_layer + stage.mtp_layers * mtp_layer
             + ends * vocab_rows + model.hidden)
    moe_layers = stage.moe_layers + stage.mtp_layers * model.mtp_moe
    expert = moe_layers * Fraction(model.experts * model.mlp_weights(model.expert_ffn),
                                   layout.expert * layout.expert_tensor)
    return dense, expert


def _mlp_activation_elements(model: ModelShape, ffn: int) -> int:
    """Elements an MLP keeps per token: fc1 output, activation output and gated product (4*ffn gated), or
    fc1 output and activation output (2*ffn)."""
    return (4 if model.gated else 2) * ffn


def _megatron_mlp_activation_elements(model: ModelShape, ffn: int) -> int:
    """Elements Megatron's MLP (megatron-core 0.19, unfused: no TE, no bias-activation fusion) keeps per
    token: :func:`_mlp_activation_elements` plus, gated, the linear half plus ``glu_linear_offset`` (a new
    ffn-wide tensor its product saves). Measured on an H100 (docs/benchmarks.md)."""
    return _mlp_activation_elements(model, ffn) + (ffn if model.gated else 0)


def _megatron_attention_elements(model: ModelShape, tensor: int) -> Fraction:
    """Elements Megatron's self-attention (unfused RoPE, SDPA core attention) keeps per token of the context
    shard: the rotated q and k, the qkv projection output (kept whole, its v being a view of it), the core
    attention's output, (3nq + 3nkv)*hd/t; and RoPE's cos and sin for q and for k, [s, 1, 1, rot] each, in
    the activation dtype, per layer (not sharded by t). Measured on an H100 (docs/benchmarks.md)."""
    return (Fraction(3 * (model.heads + model.kv_groups) * model.head_dim, tensor) + 4 * model.rope_dim)


def _saved_elements(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> dict[str, Fraction]:
    """What one layer keeps for backward without recompute, in activation elements, by part (one GPU, one
    micro-batch); :func:`layer_saved_bytes` sums them, :func:`layer_recomputed_bytes` picks the parts
    selective recompute drops.

    Norms: input norm and pre-MLP norm, their inputs and their outputs, h each per local token (under SP
    Megatron's column-parallel linears keep the sharded norm output and re-gather it). Megatron attention:
    :func:`_megatron_attention_elements` per token of the context shard; Megatron's dense MLP (and its
    experts and shared expert): :func:`_megatron_mlp_activation_elements`/t. TSP attention and MLP keep their
    input, the norm output already counted, and what :func:`layer_kept_attention_bytes` and
    :func:`layer_kept_fc1_bytes` count. MoE (all kinds): per local token, top-k copies of the dispatched input
    and of the expert output ("routed"), the experts' fc1 outputs and the rest of their activations (not with
    the expert ring: its fc1 outputs are :func:`layer_kept_fc1_bytes`), plus a shared expert kept like a
    Megatron MLP of the tensor axis over the gathered tokens.
    """
    t = layout.tensor
    local_tokens = Fraction(work.tokens, layout.sequence_shard)
    context_tokens = Fraction(work.tokens, layout.context)  # tokens of a tensor-sharded (head/ffn) region
    parts = {"norm inputs": 2 * model.hidden * local_tokens, "norm outputs": 2 * model.hidden * local_tokens}
    if layout.kind != "TSP":
        parts["attention"] = _megatron_attention_elements(model, t) * context_tokens
    if moe:
        copies = model.topk * local_tokens
        parts["routed"] = 2 * model.hidden * copies
        if not layout.expert_ring:
            fc1 = _fc1_rows(model) * model.expert_ffn
            parts["expert fc1"] = fc1 * copies
            parts["expert activation"] = (_megatron_mlp_activation_elements(model, model.expert_ffn) - fc1) * copies
        parts["shared expert"] = (_megatron_mlp_activation_elements(model, model.shared_expert_ffn)
                                  * context_tokens / t)
    elif layout.kind != "TSP":
        parts["mlp"] = _megatron_mlp_activation_elements(model, model.ffn) * context_tokens / t
    return parts


def layer_saved_bytes(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> Fraction:
    """Bytes one layer keeps for backward (no recompute), one GPU, one micro-batch: :func:`_saved_elements`."""
    return sum(_saved_elements(model, work, layout, moe).values(), Fraction(0)) * work.act_bytes


def layer_recomputed_bytes(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> Fraction:
    """The part of :func:`layer_saved_bytes` that selective recompute does not store but makes again in the
    layer's backward: the norm outputs (layernorm), a dense Megatron MLP's activations (mlp), a MoE layer's
    (moe), its experts' activations beyond fc1 (moe_act), its shared expert's (shared_experts). TSP's kept
    fc1 outputs are apart (:func:`layer_kept_fc1_bytes`)."""
    dropped: set[str] = set()
    if work.norms_recomputed():
        dropped.add("norm outputs")
    if work.mlp_selectively_recomputed(moe):
        dropped |= {"mlp", "routed", "expert fc1", "expert activation", "shared expert"}
    if work.expert_activation_recomputed(moe):
        dropped.add("expert activation")
    if work.shared_expert_recomputed(moe):
        dropped.add("shared expert")
    parts = _saved_elements(model, work, layout, moe)
    return sum((parts[part] for part in dropped if part in parts), Fraction(0)) * work.act_bytes


def layer_kept_weight_bytes(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> Fraction:
    """``--tsp-keep-weight-shards``: the D weight buffers of each TSP schedule of a layer (attention; dense
    MLP or, with the expert ring, the local experts), W_layer*e, alive from the layer's forward (or its
    recompute) to its backward. Zero otherwise."""
    if layout.kind != "TSP" or not work.tsp_keep_weights:
        return Fraction(0)
    weights = model.attention_weights()
    if not moe:
        weights += model.mlp_weights(model.ffn)
    elif layout.expert_ring:
        weights += _local_expert_weights(model, layout)
    return Fraction(weights * work.param_bytes)


def layer_kept_attention_bytes(model: ModelShape, work: Workload, layout: Layout) -> Fraction:
    """TSP attention's every head bucket's qkv projection and core-attention output, (2nq + 2nkv)*hd
    elements in a, plus its LSE, nq in >= fp32, per local token, alive from the layer's forward (or its
    recompute) to its backward, which then needs no GEMM and no attention forward again (attention.py).
    Zero for other layouts (their q, k, v and outputs are activations)."""
    if layout.kind != "TSP":
        return Fraction(0)
    per_token = (2 * model.heads + 2 * model.kv_groups) * model.head_dim * work.act_bytes
    return Fraction(work.tokens, layout.sequence_shard) * (per_token + model.heads * max(work.act_bytes, 4))


def _fc1_rows(model: ModelShape) -> int:
    """fc1 outputs per ffn column: gate and up when gated."""
    return 2 if model.gated else 1


def layer_kept_fc1_bytes(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> Fraction:
    """The TSP MLP ring's fc1 outputs of every shard (mlp.py), fc1_rows*ffn elements per local token (with
    the expert ring: per dispatched copy, top-k per local token, of the expert ffn), alive from the layer's
    forward (or its recompute) until backward has used each shard's. Zero for other layouts and for MoE
    layers without the expert ring (their activations are in :func:`layer_saved_bytes`)."""
    if layout.kind != "TSP" or (moe and not layout.expert_ring):
        return Fraction(0)
    per_token = model.topk * model.expert_ffn if moe else model.ffn
    return Fraction(work.tokens, layout.sequence_shard) * _fc1_rows(model) * per_token * work.act_bytes


def layer_input_bytes(model: ModelShape, work: Workload, layout: Layout) -> Fraction:
    """What full recompute keeps per layer: its input [S/shard, B, h]."""
    return Fraction(work.tokens, layout.sequence_shard) * model.hidden * work.act_bytes


def mtp_extra_saved_bytes(model: ModelShape, work: Workload, layout: Layout) -> Fraction:
    """What a multi-token prediction depth keeps for backward besides its transformer layer (``work`` from
    :func:`mtp_layer_work`), per micro-batch and local token: without recompute the embedding (its norm's
    input), ``eh_proj``'s [2h] input, the final norm's input and the loss's input, 5h; under its full
    recompute the checkpoint's second input (the embedding; the first is the layer input full recompute
    keeps) and the loss's input, 2h. (Its hidden-state input is the decoder's output, kept anyway.)"""
    per_token = 2 if work.recompute == "full" else 5
    return per_token * Fraction(work.tokens, layout.sequence_shard) * model.hidden * work.act_bytes


def _ring_buffer_bytes(work: Workload, shard_elements: Fraction) -> Fraction:
    """What a TSP weight ring (MLP, experts, vocabulary; weight_ring.py) holds per W/D-element shard while its
    backward runs: two weight slots (e), two grad buffers in the accumulation dtype (e_acc), the one being
    filled and the one on its way to its owner (the owner adds its own term last, into the arriving one), and
    the grads autograd has just returned for the shard being processed (e)."""
    return (3 * work.param_bytes + 2 * work.grad_bytes) * shard_elements


def _attention_weight_buffers(work: Workload, shard_elements: Fraction, calls: int) -> Fraction:
    """What TSP attention (attention.py) holds per W/D-element shard while its backward runs, with G head
    buckets per call: min(D/G, 3) weight slots of G shards (e: the call differentiated, the next and the one
    after it in flight), with G > 1 the differentiated call's weights laid out as one call's (a copy, e), the
    call's grads just computed, G shards (e); their grad buffer being reduced (e_acc; the previous call's
    reduces end before it is made) and the rank's own summed grads, one shard. With one call over all D
    buckets no slot: the gathered weights, the grads just computed (e) and their reduce-scatter inputs
    (e_acc), D shards each, and the rank's own summed grads."""
    g = work.tsp_buckets_per_call
    weight_buffers = 1 if calls == 1 else min(calls, 3) + (g > 1)  # slots, and a call's copy
    return (g * (weight_buffers + 1) * work.param_bytes + (g + 1) * work.grad_bytes) * shard_elements


def layer_transient_bytes(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> Fraction:
    """Buffers alive during one layer's backward besides its activations and their gradients.

    TP+SP/TPxCP: the gathered input and the gathered output grad, 2 x [S/c, B, h]. CP: the K/V chunk in
    flight and the next one, with their dK/dV (4 x the rank's local K/V). TSP (derived from attention.py and
    mlp.py, checked against the allocator in docs/benchmarks.md) the larger of
    - attention, with G head buckets per call (D/G calls, ``underway`` = min(D/G, 3) of them: the call
      differentiated, the next, whose K/V are in flight, and the previous, whose dK/dV are; two calls have
      only one of those at a time): with several calls an fp32 [S/D, B, h] accumulator (output in forward,
      input grad in backward); per element of one call's full-sequence K/V (2BS*nkv*hd*G/D), (underway + 2)
      x a bytes: those calls' K/V or dK/dV, and inside the zigzag kernel's backward (kernels/zigzag.py,
      which reads the gathered K/V in place) its packed dK/dV and one part's dK/dV, in a; per local token,
      those calls' rotated q and k, (nq + nkv)*hd*G/D each, in a; the differentiated call's
      attention-output grad and the kernel's dQ, and with several calls the previous call's dQ, nq*hd*G/D
      each, in a; the weight and grad buffers (:func:`_attention_weight_buffers`) of W_attn/D;
      with the local kernel's dense mask S*S/D bytes as bool plus S*S/D*a additive;
    - MLP (dense layers): the ring's fp32 [S/D, B, h] accumulator, one shard's fc1 output grad, its activation
      output's grad and, gated, act(gate) (2 x its fc1 outputs; mlp.py writes a gated grad's halves into one
      buffer), for the local tokens, and the ring buffers of W_mlp/D;
      with gathered weights (``tsp_mlp_gather``, no accumulator: one fc2 GEMM) the same for the whole ffn,
      beside the gathered W_mlp (e) and fc2's grads on their way to their
      owners (h*ffn, e_acc), which is when the activation's backward runs (``scripts/bench_layer.py --tsp 4
      --seq 8192 --hidden 512 --heads 8 --ffn 2048``, CPU allocator, the schedule alone: 117 MiB gathered and
      70 with the ring, each also holding the call's output, its grad and the input grad, 3 x 4 MiB; modelled
      112 and 67 without them); with the
      expert ring, the ring's terms for the top-k copies of the local tokens and the local experts' W (MoE
      layers), beside the accumulator.
    Under full recompute also what the schedules keep from the recomputed forward: attention's
    (:func:`layer_kept_attention_bytes`) in both, the fc1 outputs (:func:`layer_kept_fc1_bytes`) in the MLP's
    (also when selective recompute re-runs the MLP); otherwise the fc1 outputs are saved activations, which
    the layer's MLP backward has freed when its attention's runs, so attention's term is less by them (the
    CPU allocator: without recompute G = 2 and 4 went from +13% and +10% to -2%, G = 1 from -5% to -7%).
    """
    a, t, c = work.act_bytes, layout.tensor, layout.context
    if layout.kind != "TSP":
        gathers = 2 * Fraction(work.tokens, c) * model.hidden * a if layout.kind in ("TP+SP", "TPxCP") else 0
        return gathers + 4 * Fraction(work.tokens, c) * Fraction(model.kv_width, t) * a * (c > 1)
    local_tokens = Fraction(work.tokens, t)
    calls = tsp_attention_calls(work, t)
    underway = min(calls, 3)  # the call differentiated, the next in flight, the previous finishing
    call_kv = work.tokens * Fraction(model.kv_width, calls)
    head = local_tokens * Fraction(model.head_dim, calls)  # x nq: a call's local q (its G*nq/D heads)
    rotated = underway * head * (model.heads + model.kv_groups) * a
    differentiated = head * model.heads * (2 + (calls > 1)) * a
    accumulator = 4 * local_tokens * model.hidden
    attention = (call_kv * (underway + 2) * a + rotated + differentiated + accumulator * (calls > 1)
                 + _attention_weight_buffers(work, Fraction(model.attention_weights(), t), calls))
    if work.tsp_dense_mask:
        attention += Fraction(work.seq_len * work.seq_len, t) * (1 + a)

    def shard_backward(ffn: int, tokens: Fraction) -> Fraction:  # one shard's, beside its kept fc1 output
        return 2 * _fc1_rows(model) * ffn * tokens * a / t

    mlp = accumulator
    if not moe and work.tsp_mlp_gather:  # the whole ffn at once, beside the gathered weights and fc2's grads
        mlp = (t * shard_backward(model.ffn, local_tokens) + work.param_bytes * model.mlp_weights(model.ffn)
               + work.grad_bytes * model.hidden * model.ffn)
    elif not moe:
        mlp += (shard_backward(model.ffn, local_tokens)
                + _ring_buffer_bytes(work, Fraction(model.mlp_weights(model.ffn), t)))
    elif layout.expert_ring:
        mlp += (shard_backward(model.expert_ffn, model.topk * local_tokens)
                + _ring_buffer_bytes(work, Fraction(_local_expert_weights(model, layout), t)))
    if work.recompute == "full":
        kept_attention = layer_kept_attention_bytes(model, work, layout)
        attention += kept_attention
        mlp += kept_attention
    if work.recompute == "full" or work.mlp_selectively_recomputed(moe):
        mlp += layer_kept_fc1_bytes(model, work, layout, moe)
    else:  # saved activations then, which the layer's MLP backward, before its attention's, has freed
        attention -= layer_kept_fc1_bytes(model, work, layout, moe)
    return max(attention, mlp)


def logits_bytes(model: ModelShape, work: Workload, layout: Layout) -> Fraction:
    """The output layer's working set: logits [S/c, B, V/t] in fp32 (vocab-parallel cross entropy) plus
    their bf16 grad, the gathered final-norm output (SP kinds) and the input grad [S/c, B, h] (BASELINES.md:
    s x V/D fp32 logits are what Megatron materialises). TSP's vocabulary ring holds one shard's logits of
    the local tokens, [S/D, B, V/D] fp32 plus their grad, the ring buffers (:func:`_ring_buffer_bytes`) of
    V/D x h, and the fp32 input-grad accumulator [S/D, B, h]."""
    tokens = Fraction(work.tokens, layout.context)
    vocab = Fraction(model.padded_vocab(layout.tensor), layout.tensor)
    if layout.kind == "TSP" and work.tsp_vocab_ring:
        local = tokens / layout.tensor
        return (local * (vocab * (4 + work.act_bytes) + model.hidden * (4 + work.act_bytes))
                + _ring_buffer_bytes(work, vocab * model.hidden))
    gathered = 1 if layout.sequence_shard > layout.context else 0
    return tokens * (vocab * (4 + work.act_bytes) + (1 + gathered) * model.hidden * work.act_bytes)


@dataclass(frozen=True)
class Memory:
    """Peak bytes per GPU by kind."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # stored for backward over layers and micro-batches in flight
    working: float  # the largest transient working set plus OFFSET_BYTES

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.working


def layer_groups(work: Workload, stage: Stage) -> list[tuple[Fraction, bool, Workload]]:
    """A stage's layers as (count, moe, the workload they run): with block recompute (``recompute_layers``
    N) N of them recompute in full and the others keep their activations, dense and MoE layers in
    proportion (Megatron takes the stage's first N, whichever kind they are)."""
    total = stage.dense_layers + stage.moe_layers
    share = Fraction(1)
    if work.recompute == "full" and work.recompute_layers is not None:
        share = min(share, work.recompute_layers / total)
    kept = replace(work, recompute="none", recompute_layers=None)
    groups = []
    for count, moe in ((stage.dense_layers, False), (stage.moe_layers, True)):
        groups += [(part, moe, w) for part, w in ((count * share, work), (count * (1 - share), kept)) if part]
    return groups


def stage_memory(model: ModelShape, work: Workload, layout: Layout, stage: Stage) -> Memory:
    """Peak memory of one pipeline stage (module docstring)."""
    dense, expert = stage_params(model, layout, stage)
    optimizer_bytes = 8 + (4 if work.param_bytes < 4 else 0)
    dense_shards = layout.data * layout.context if work.distributed_optimizer else 1
    expert_shards = layout.expert_data if work.distributed_optimizer else 1
    stored = Fraction(0)
    working = Fraction(0)
    groups = layer_groups(work, stage)
    if stage.mtp_layers:
        mtp = mtp_layer_work(work)
        groups.append((Fraction(stage.mtp_layers), model.mtp_moe, mtp))
        stored += stage.in_flight * stage.mtp_layers * mtp_extra_saved_bytes(model, mtp, layout)
    for count, moe, layer_work in groups:
        full = layer_work.recompute == "full"
        saved = layer_saved_bytes(model, layer_work, layout, moe)
        kept_weights = layer_kept_weight_bytes(model, layer_work, layout, moe)  # every layer's, or one's (full)
        kept_fc1 = layer_kept_fc1_bytes(model, layer_work, layout, moe)
        kept = kept_weights + layer_kept_attention_bytes(model, layer_work, layout) + kept_fc1
        # Selective recompute: what it drops is not stored but made again in the layer's backward (Megatron's
        # activations, with their grads, in the factor's term; TSP's kept fc1 outputs in the transient one)
        recomputed = layer_recomputed_bytes(model, layer_work, layout, moe)
        not_stored = recomputed + (kept_fc1 if layer_work.mlp_selectively_recomputed(moe) else 0)
        if full:  # one input per chunk of layers; the chunk's other layers' activations are back in its backward
            chunks = count / layer_work.recompute_chunk
            stored += stage.in_flight * chunks * layer_input_bytes(model, layer_work, layout)
            rest_of_chunk = (layer_work.recompute_chunk - 1) * (saved + kept)
        else:
            stored += stage.in_flight * count * (saved + kept - not_stored)
            rest_of_chunk = Fraction(0)
        backward = Fraction(BACKWARD_FACTOR) * saved - (0 if full else saved - recomputed)
        transient = layer_transient_bytes(model, layer_work, layout, moe)
        working = max(working, backward + transient + kept_weights * full + rest_of_chunk)
    if stage.output:
        working = max(working, logits_bytes(model, work, layout))
    return Memory(weights=float((dense + expert) * work.param_bytes),
                  grads=float((dense + expert) * work.grad_bytes),
                  optimizer=float(optimizer_bytes * (dense / dense_shards + expert / expert_shards)),
                  activations=float(stored), working=float(working) + OFFSET_BYTES)


def memory(model: ModelShape, work: Workload, layout: Layout) -> Memory:
    """Peak memory per GPU: the largest over the pipeline stages."""
    return max((stage_memory(model, work, layout, stage) for stage in pipeline_stages(model, layout)),
               key=lambda m: m.total)


# ---------------------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Hardware:
    """A GPU and its links. ``peer_bandwidth`` is one link to one peer, ``node_bandwidth`` all of a GPU's
    intra-node links together (equal on NVSwitch machines), ``network_bandwidth`` per GPU across nodes;
    bytes/s per direction. ``matmul_flops`` is a dense bf16 matmul rate (peak or measured); ``latency_s``
    the fixed cost of one collective or send. ``tsp_device_factor`` and ``tsp_host_seconds``: a TSP layer's
    compute time on this GPU (:func:`_compute_seconds`; measured on an H100, and refitted from a
    ``scripts/device_checks.sh`` call by ``scripts/device_report.py``)."""

    name: str
    memory_bytes: float
    matmul_flops: float
    node_bandwidth: float
    peer_bandwidth: float
    network_bandwidth: float
    latency_s: float = 10e-6
    gpus_per_node: int = 8
    tsp_device_factor: float = TSP_DEVICE_FACTOR
    tsp_host_seconds: float = TSP_HOST_SECONDS

    def bandwidth(self, transfer: Transfer) -> float:
        """Sends use one link; a collective over n ranks of a node uses up to n-1 links (all on NVSwitch)."""
        if transfer.span > self.gpus_per_node:
            return self.network_bandwidth
        if transfer.point_to_point:
            return self.peer_bandwidth
        return min(self.node_bandwidth, self.peer_bandwidth * (transfer.group - 1))

    def seconds(self, transfer: Transfer) -> float:
        return transfer.messages * self.latency_s + float(transfer.nbytes) / self.bandwidth(transfer)

    def compute_seconds(self, flops: float) -> float:
        return flops / (self.matmul_flops * COMPUTE_EFFICIENCY)


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs one GPU executes for one layer (or the output layer) and one micro-batch, by phase."""

    forward: float
    backward: float
    recompute: float = 0.0


def layer_flops(model: ModelShape, work: Workload, layout: Layout, moe: bool) -> LayerFlops:
    """2 FLOPs per weight per token for the GEMMs, 2*B*S^2*nq*hd for causal core attention (half of QK^T and
    AV), split evenly over t*c ranks (TSP: D ranks, the zigzag split balances causal work).

    Backward is 2 forwards, TSP's too (its schedules keep their GEMM outputs, attention.py and mlp.py); TSP
    core attention with the dense mask computes the full S/D x S rectangle (2x the causal FLOPs; BASELINES.md
    measured 1.71x TP's time even for a bottom-right causal mask, 0.91x for a split prefix/diagonal kernel).
    Full recompute adds a forward; selective adds Megatron's core attention forward (not TSP's; module
    core_attn), a dense layer's MLP forward (module mlp), a MoE layer's experts and shared expert (moe) or
    its shared expert alone (shared_experts). Norms and activations (layernorm, moe_act) are not counted.
    """
    ranks = layout.tensor * layout.context
    core = 2.0 * work.micro_batch * work.seq_len**2 * model.heads * model.head_dim / ranks
    if layout.kind == "TSP" and work.tsp_dense_mask:
        core *= 2
    attention = 2.0 * work.tokens * model.attention_weights(with_bias=False) / ranks + core
    if moe:
        mlp_weights = (model.topk * model.mlp_weights(model.expert_ffn, with_bias=False)
                       + model.mlp_weights(model.shared_expert_ffn, with_bias=False))
    else:
        mlp_weights = model.mlp_weights(model.ffn, with_bias=False)
    forward = attention + 2.0 * work.tokens * mlp_weights / ranks
    recompute = forward if work.recompute == "full" else 0.0
    if work.core_attention_recomputed() and layout.kind != "TSP":
        recompute += core
    if work.mlp_selectively_recomputed(moe):
        recompute += 2.0 * work.tokens * mlp_weights / ranks
    elif work.shared_expert_recomputed(moe):
        recompute += 2.0 * work.tokens * model.mlp_weights(model.shared_expert_ffn, with_bias=False) / ranks
    return LayerFlops(forward, 2 * forward, recompute)


def output_layer_flops(model: ModelShape, work: Workload, layout: Layout) -> LayerFlops:
    """The output GEMM: 2*B*S*h*V/(t*c) forward, twice that backward (three times for TSP's vocabulary
    ring, which recomputes each shard's logits)."""
    forward = 2.0 * work.tokens * model.hidden * model.padded_vocab(layout.tensor) / (layout.tensor * layout.context)
    recomputes = layout.kind == "TSP" and work.tsp_vocab_ring
    return LayerFlops(forward, (3 if recomputes else 2) * forward)


def mtp_head_flops(model: ModelShape, work: Workload, layout: Layout) -> LayerFlops:
    """One multi-token prediction depth's FLOPs besides its transformer layer: ``eh_proj``'s GEMM,
    2*B*S*2h*h/(t*c) forward, twice that backward and once more when recomputed (:func:`mtp_layer_work`),
    and the output layer's (:func:`output_layer_flops`)."""
    projection = 2.0 * work.tokens * 2 * model.hidden * model.hidden / (layout.tensor * layout.context)
    recomputed = projection if mtp_layer_work(work).recompute == "full" else 0.0
    output = output_layer_flops(model, work, layout)
    return LayerFlops(projection + output.forward, 2 * projection + output.backward, recomputed)


def _compute_seconds(flops: LayerFlops, phase: str, tsp_host_steps: float, hw: Hardware) -> float:
    """Compute time of one phase ("forward", "recompute", "backward") of a layer: its FLOPs at the fitted
    rate; for a TSP layer (``tsp_host_steps`` from :func:`tsp_host_steps`, else 0) the GPU's
    ``tsp_device_factor`` (:data:`TSP_DEVICE_FACTOR`) times that, and no less than its host time,
    ``tsp_host_seconds`` (:data:`TSP_HOST_SECONDS`) per host step and forward-equivalent pass (backward: 2, a
    recompute: its share of a forward)."""
    phase_flops = getattr(flops, phase)
    seconds = hw.compute_seconds(phase_flops)
    if not tsp_host_steps or not phase_flops:
        return seconds
    passes = {"forward": 1.0, "recompute": phase_flops / flops.forward, "backward": 2.0}[phase]
    return max(hw.tsp_device_factor * seconds, passes * tsp_host_steps * hw.tsp_host_seconds)


def _layer_host_steps(work: Workload, layout: Layout, moe: bool) -> float:
    """:func:`tsp_host_steps` of a TSP layer (0 for other layouts, whose host time is not modelled). A MoE
    layer's MLP is its experts, not the dense MLP that ``--tsp-mlp-schedule`` picks: it is costed as the
    ring's host time, where the fit was made."""
    if layout.kind != "TSP":
        return 0
    return tsp_host_steps(replace(work, tsp_mlp_gather=False) if moe else work, layout.tensor)


def _seconds(flops: LayerFlops, comm: LayerComm, tsp_host_steps: float, hw: Hardware) -> float:
    """Each phase takes max(compute, hidden transfers) + exposed transfers."""
    total = 0.0
    for phase in ("forward", "recompute", "backward"):
        transfers = getattr(comm, phase)
        hidden = sum(hw.seconds(t) for t in transfers if t.hidden)
        exposed = sum(hw.seconds(t) for t in transfers if not t.hidden)
        total += max(_compute_seconds(flops, phase, tsp_host_steps, hw), hidden) + exposed
    return total


@dataclass(frozen=True)
class StepBytes:
    """Bytes one GPU sends in a step, by phase (forward, backward and recompute summed over micro-batches)."""

    forward: float
    backward: float
    recompute: float
    grad_sync: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute + self.grad_sync


@dataclass(frozen=True)
class StepCost:
    """One training step of ``microbatches`` micro-batches per data-parallel rank, on the busiest GPU."""

    memory: Memory
    sent: StepBytes  # of the stage that sends most
    compute_s: float  # pure compute time of the step
    step_s: float  # estimated step time with overlap and the pipeline bubble

    @property
    def comm_bytes(self) -> float:
        return self.sent.total

    @property
    def exposed_comm_s(self) -> float:
        """Step time beyond pure compute: exposed transfers and the pipeline bubble."""
        return self.step_s - self.compute_s


def step_cost(model: ModelShape, work: Workload, layout: Layout, hw: Hardware, microbatches: int) -> StepCost:
    """Memory, bytes and time of a step on the busiest stage. A micro-batch's stage time sums its layers'
    and edges' phase times (:func:`_seconds`); the pipeline runs microbatches + PP - 1 slots of the slowest
    stage; the data-parallel grad sync overlaps the last micro-batch's backward (``--overlap-grad-reduce``)."""
    stage_s, compute_s, sent, sync_exposed_s = [], [], [], []
    for stage in pipeline_stages(model, layout):
        parts = [(1, output_layer_flops(model, work, layout) if stage.output else LayerFlops(0.0, 0.0),
                  edge_comm(model, work, layout, stage), 0)]
        groups = layer_groups(work, stage)
        if stage.mtp_layers:  # each depth: its transformer layer, then the rest of it
            groups.append((Fraction(stage.mtp_layers), model.mtp_moe, mtp_layer_work(work)))
            parts.append((stage.mtp_layers, mtp_head_flops(model, work, layout), mtp_head_comm(model, work, layout), 0))
        parts += [(count, layer_flops(model, group_work, layout, moe), layer_comm(model, group_work, layout, moe),
                   _layer_host_steps(group_work, layout, moe)) for count, moe, group_work in groups]
        stage_s.append(sum(float(count) * _seconds(flops, comm, steps, hw) for count, flops, comm, steps in parts))

        def phases_seconds(*phases: str) -> float:
            return sum(float(count) * _compute_seconds(f, phase, steps, hw)
                       for count, f, _, steps in parts for phase in phases)

        compute_s.append(phases_seconds("forward", "recompute", "backward"))
        backward_s = phases_seconds("recompute", "backward")
        sync = grad_sync_comm(model, work, layout, stage)
        sync_exposed_s.append(max(0.0, sum(hw.seconds(t) for t in sync) - backward_s))

        def phase_bytes(phase: str) -> float:
            return float(microbatches * sum(count * sum(t.nbytes for t in getattr(comm, phase))
                                            for count, _, comm, _ in parts))

        sent.append(StepBytes(forward=phase_bytes("forward"), backward=phase_bytes("backward"),
                              recompute=phase_bytes("recompute"), grad_sync=float(sum(t.nbytes for t in sync))))
    slowest = max(range(len(stage_s)), key=stage_s.__getitem__)
    return StepCost(memory=memory(model, work, layout), sent=max(sent, key=lambda b: b.total),
                    compute_s=microbatches * max(compute_s),
                    step_s=(microbatches + layout.pipeline - 1) * stage_s[slowest] + sync_exposed_s[slowest])
