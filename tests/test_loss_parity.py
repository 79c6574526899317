"""TSP inside Megatron's real training loop: 10-iteration loss curves equal the TSP=1 run (fp32, gloo).

The TSP=1 reference runs Megatron's own local layer spec; TSP>1 runs the TSP layers, zigzag data path and
sequence-sharded norms. Pipeline runs are compared with a TSP=1 run at the same pipeline size, because
Megatron seeds each pipeline stage differently (seed + 100 * stage); MoE runs with a TSP=1 run at the same
expert-parallel size, because expert initial weights depend on it.

The runs are cached (:func:`tsp_run`, :func:`reference`) and shared with the tests that read other things
off the same training: the byte counters (test_comm_measured), and the checkpoints some of them save and
the uninterrupted runs those must continue like (test_checkpoints). Every TSP run counts its collectives (``--tsp-report-comm-bytes`` does not
change the numbers, which these curves also prove).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest

from tests.pretrain_runs import MOE, PRINTED_NORM_TOLERANCE, TINY_CONFIG, PretrainRun, pretrain

pytestmark = [pytest.mark.e2e, pytest.mark.multiprocess]

ITERS = ("--train-iters", "10", "--log-params-norm")
COUNT_BYTES = ("--tsp-report-comm-bytes",)
# These runs also save a checkpoint after this iteration, which test_checkpoints continues from.
SAVED_AT = 5
SAVING_RUNS = ("tsp2", "tsp4", "tsp2_dp2_distopt_overlap_megatron_output")
CHECKPOINTS = Path(tempfile.mkdtemp(prefix="tsp_ckpt_"))


@functools.cache
def biased_config() -> Path:
    """The tiny config with linear-layer biases on (it disables them), for the expert-bias cases."""
    path = Path(tempfile.mkdtemp()) / "tiny_gpt_cpu_biases.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("disable-bias-linear: true", "disable-bias-linear: false"))
    return path


@functools.cache
def reference(ranks: int, config: Path, *flags: str) -> PretrainRun:
    """The TSP=1 run on ``ranks`` ranks with ``flags`` (10 iterations)."""
    run = pretrain(ranks, *ITERS, *flags, config=config)
    assert run.returncode == 0 and len(run.losses) == 10, run.output[-3000:]
    return run


@functools.cache
def tsp_run(name: str) -> PretrainRun:
    """The TSP run of case ``name`` (10 iterations, collectives counted; :data:`SAVING_RUNS` also save into
    ``CHECKPOINTS / name`` every :data:`SAVED_AT` iterations)."""
    ranks, tsp_flags, shared, _ = CASES[name]
    save = ("--save", str(CHECKPOINTS / name), "--save-interval", str(SAVED_AT)) if name in SAVING_RUNS else ()
    return pretrain(ranks, *ITERS, *shared, *tsp_flags, *COUNT_BYTES, *save, config=case_config(name))


@functools.cache
def tied_config() -> Path:
    """The tiny config with the output layer tied to the input embedding (it unties them)."""
    path = Path(tempfile.mkdtemp()) / "tiny_gpt_cpu_tied.yaml"
    path.write_text(TINY_CONFIG.read_text().replace("untie-embeddings-and-output-weights: true\n", ""))
    return path


def case_config(name: str) -> Path:
    return biased_config() if "biases" in name else tied_config() if "tied" in name else TINY_CONFIG


def assert_same_curve(run: PretrainRun, ref: PretrainRun, params_norm: bool = True) -> None:
    assert run.returncode == 0, run.output[-4000:]
    assert len(run.losses) == 10, run.output[-4000:]
    assert run.losses == pytest.approx(ref.losses, rel=1e-5)
    assert run.grad_norms == pytest.approx(ref.grad_norms, abs=PRINTED_NORM_TOLERANCE)
    assert run.mtp_losses == pytest.approx(ref.mtp_losses, rel=1e-5)
    if params_norm:
        assert len(run.params_norms) == 10
        assert run.params_norms == pytest.approx(ref.params_norms, abs=PRINTED_NORM_TOLERANCE)
    assert ref.losses[-1] < ref.losses[0] - 0.5  # the model learns: a curve, not a constant


# With biases (biased_config): Megatron 0.19.2's fused weighted SwiGLU refuses them, at TSP=1 as well.
EXPERT_BIASES = ("--no-bias-swiglu-fusion",)
PP2 = ("--pipeline-model-parallel-size", "2")
# Interleaved pipeline schedule: 4 layers, 2 virtual stages of 1 layer per pipeline rank.
VPP = (*PP2, "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1")
SHARED_EXPERT = ("--moe-shared-expert-intermediate-size", "128")
EXPERT_RING = ("--tsp-size", "2", "--tsp-expert-ring")

# Each case adds what no other case covers (the suite runs on 2 cores, every launch counts): plain 1F1B
# pipelining is in the MoE pipeline case, plain data parallelism in the distributed-optimizer case.
CASES = {  # name: (ranks, flags of the TSP run, flags shared with the TSP=1 reference, reference ranks)
    "tsp2": (2, ("--tsp-size", "2"), (), 1),
    "tsp4": (4, ("--tsp-size", "4"), (), 1),
    # Also a layer without RoPE (--no-rope-freq 2: the second of the two).
    "tsp2_gqa_recompute_full": (2, ("--tsp-size", "2", "--recompute-granularity", "full", "--recompute-method",
                                    "uniform", "--recompute-num-layers", "1"),
                                ("--group-query-attention", "--num-query-groups", "2", "--no-rope-freq", "2"), 1),
    # Partial recompute (first layer recomputed, the other keeping its activations): the memory/time knob
    # between full and none. With the schedules the cost model picks (AUTO_CHOICES: the fast ones, attention
    # as one call over both head buckets and the MLP by gathered weights).
    "tsp2_recompute_block_auto_schedules": (
        2, ("--tsp-size", "2", "--recompute-granularity", "full", "--recompute-method", "block",
            "--recompute-num-layers", "1", "--tsp-attention-buckets-per-call", "auto", "--tsp-mlp-schedule", "auto"),
        (), 1),
    # Megatron's selective recompute of the MLP: the TSP MLP's first forward (no grad) keeps nothing, its
    # recompute keeps the fc1 outputs for backward. And of the norms: Megatron frees their outputs, which the
    # TSP schedules saved, after the forward and refills them before the schedules' backward.
    "tsp2_recompute_selective_mlp_layernorm": (2, ("--tsp-size", "2", "--recompute-granularity", "selective",
                                                   "--recompute-modules", "core_attn", "mlp", "layernorm"), (), 1),
    # Weight shards kept from forward to backward instead of fetched again (--tsp-keep-weight-shards).
    "tsp2_recompute_selective_keep_weight_shards": (2, ("--tsp-size", "2", "--recompute-granularity", "selective",
                                                        "--tsp-keep-weight-shards"), (), 1),
    # The output weight is the embedding's, on the other pipeline stage (grads summed between the two).
    "tsp2_pp2_virtual_tied_embeddings": (4, ("--tsp-size", "2"), VPP, 2),
    # Multi-token prediction: a TSP layer behind the decoder, its inputs and labels shifted in natural order
    # although TSP holds them in zigzag order, its loss by the vocabulary ring too (the decoder's and its
    # grads of the shared output weight summed). Attention as one call over both head buckets (the flag reaches the MTP
    # layer too: it reuses the decoder's layer spec).
    "tsp2_mtp_one_attention_call": (2, ("--tsp-size", "2", "--tsp-attention-buckets-per-call", "2"),
                                    ("--mtp-num-layers", "1"), 1),
    # Two prediction depths, each recomputed (Megatron checkpoints an MTP layer with eh_proj under full
    # recompute), the output weight tied to the embedding: three users of it, their grads summed.
    "tsp2_mtp2_recompute_full_tied_embeddings": (2, ("--tsp-size", "2"),
                                                 ("--mtp-num-layers", "2", "--recompute-granularity", "full",
                                                  "--recompute-method", "uniform", "--recompute-num-layers", "1"),
                                                 1),
    # Megatron's output layer over gathered hidden states instead of the vocabulary ring.
    "tsp2_dp2_distopt_overlap_megatron_output": (4, ("--tsp-size", "2", "--use-distributed-optimizer",
                                                     "--overlap-grad-reduce", "--overlap-param-gather",
                                                     "--tsp-output-layer", "megatron"), (), 1),

    "moe_tsp2_ep2_dp2_shared_expert": (4, ("--tsp-size", "2"), (*MOE, *SHARED_EXPERT), 2),
    # Experts sharded over the TSP axis and run by the ring (expert-TP 2, expert-DP 1), same reference.
    "moe_tsp2_ep2_expert_ring_shared_expert": (4, EXPERT_RING, (*MOE, *SHARED_EXPERT), 2),
    # The same with the MoE layers (router, dispatch, expert ring, shared expert) and the norms recomputed.
    "moe_tsp2_ep2_expert_ring_recompute_moe_layernorm": (4, (*EXPERT_RING, "--recompute-granularity", "selective",
                                                             "--recompute-modules", "moe", "layernorm"),
                                                         (*MOE, *SHARED_EXPERT), 2),
    "moe_tsp2_pp2_ep2": (4, ("--tsp-size", "2"), (*MOE, *PP2), 4),
    # Dense and MoE layers mixed, linear biases everywhere, expert biases included (Megatron 0.19.2 refuses
    # biases in a shared expert, so that one has its own case).
    "moe_tsp2_ep2_mixed_layers_biases": (2, ("--tsp-size", "2"), (*MOE, *EXPERT_BIASES, "--moe-layer-freq", "2"), 2),
}


# What `auto` resolves to in a case (printed by rank 0): on CPU ranks the cost model costs an H100, where the
# tiny model's step is host-bound, so the fewest operators win.
AUTO_CHOICES = {"tsp2_recompute_block_auto_schedules": "--tsp-attention-buckets-per-call 2 --tsp-mlp-schedule gather"}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_curve_matches_tsp1(name: str) -> None:
    ranks, tsp_flags, shared, reference_ranks = CASES[name]
    if name in AUTO_CHOICES:
        run = tsp_run(name)
        assert f"> megatron-tsp auto schedules: {AUTO_CHOICES[name]} (cost model on H100 SXM" in run.output, \
            run.output[-4000:]
    if "--mtp-num-layers" in shared:
        assert len(reference(reference_ranks, case_config(name), *shared).mtp_losses) == 10
    # With --overlap-param-gather Megatron logs the params norm before the next forward gathers the updated
    # params, so it lags one step behind a run without it (at any TSP degree); losses and grad norms do not.
    assert_same_curve(tsp_run(name), reference(reference_ranks, case_config(name), *shared),
                      params_norm="--overlap-param-gather" not in tsp_flags)


def test_bf16_with_fp32_main_grads_tracks_tsp1() -> None:
    """bf16 compute (fp32 main grads and optimizer state): the TSP curve stays within bf16 noise of TSP=1."""
    bf16 = ("--bf16",)
    run, ref = pretrain(2, *ITERS, *bf16, "--tsp-size", "2"), reference(1, TINY_CONFIG, *bf16)
    assert run.returncode == 0 and len(run.losses) == 10, run.output[-4000:]
    assert run.losses == pytest.approx(ref.losses, rel=2e-2)
    assert run.losses[-1] < run.losses[0] - 0.5
