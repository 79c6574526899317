"""GPT pretraining with TSP on Megatron's own ``pretrain()`` loop.

    torchrun --nproc-per-node N -m megatron_tsp.pretrain_gpt <Megatron GPT flags> --tsp-size D
    torchrun --nproc-per-node N -m megatron_tsp.pretrain_gpt --config configs/<model>.yaml [overrides]

Without a GPU the same command runs on CPU ranks over gloo (see ``megatron_compat.cpu``). Megatron's
repository script ``pretrain_gpt.py`` is not in the megatron-core wheel, so the model provider, batch
function, loss and dataset provider are written here against megatron-core 0.19's APIs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from functools import partial
from typing import Any, Iterator, Optional, Sequence

from megatron_tsp.megatron_compat import CPU_MEGATRON_FLAGS, cuda_to_cpu, prepare_megatron, running_on_cpu

prepare_megatron()  # before Megatron's model modules are imported: see megatron_compat.patches

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0  # noqa: E402
from megatron.training.argument_utils import (  # noqa: E402
    core_transformer_config_from_args,
    pretrain_cfg_container_from_args,
)
from megatron.training.arguments import parse_args, validate_args  # noqa: E402
from megatron.training.global_vars import set_global_variables  # noqa: E402
from megatron.training.utils import get_blend_and_blend_per_split  # noqa: E402

from megatron_tsp.args import TSPConfigError, add_tsp_args, configure_tsp, expand_config  # noqa: E402
from megatron_tsp.comm import comm_bytes  # noqa: E402
from megatron_tsp.mesh import initialize_model_parallel  # noqa: E402
from megatron_tsp.plan import resolve_auto_schedules  # noqa: E402
from megatron_tsp.specs import (  # noqa: E402
    VOCAB_RING_OUTPUT,
    get_gpt_decoder_block_tsp_spec,
    get_gpt_mtp_block_tsp_spec,
    tsp_output_loss,
)
from megatron_tsp.zigzag import zigzag_batch  # noqa: E402

# Transformer Engine is optional: Megatron's TE layer spec is used automatically (on GPUs) when installed.
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def layer_spec(args: Any, config: Any, vp_stage: Optional[int]):
    """The decoder spec: TSP layers when --tsp-size > 1, else Megatron's own TE or local decoder-block spec
    (the block spec, so that --moe-layer-freq mixes dense and MoE layers as in Megatron's pretrain_gpt)."""
    if args.tsp_size > 1:
        return get_gpt_decoder_block_tsp_spec(config, vp_stage=vp_stage,
                                              keep_weight_shards=args.tsp_keep_weight_shards,
                                              attention_buckets_per_call=args.tsp_attention_buckets_per_call,
                                              mlp_schedule=args.tsp_mlp_schedule)
    return get_gpt_decoder_block_spec(config, use_transformer_engine=HAVE_TE and not running_on_cpu(),
                                      normalization=args.normalization, vp_stage=vp_stage)


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config: Any = None, pg_collection: Optional[ProcessGroupCollection] = None) -> GPTModel:
    """Megatron model provider: one GPT model chunk for this pipeline (and virtual pipeline) stage."""
    args = get_args()
    config = config or core_transformer_config_from_args(args)
    decoder = layer_spec(args, config, vp_stage)
    mtp = None  # multi-token prediction (--mtp-num-layers), as Megatron's pretrain_gpt.py builds it
    if args.mtp_num_layers and args.tsp_size > 1:
        mtp = get_gpt_mtp_block_tsp_spec(config, decoder, vp_stage=vp_stage)
    elif args.mtp_num_layers:
        mtp = get_gpt_mtp_block_spec(config, decoder, use_transformer_engine=HAVE_TE and not running_on_cpu(),
                                     vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder,
        mtp_block_spec=mtp,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if post_process and _vocab_ring(args):  # multi-token prediction's losses by the ring too (patches.py)
        setattr(model.output_layer, VOCAB_RING_OUTPUT, True)
    return model


def _vocab_ring(args: Any) -> bool:
    """Whether the output layer's losses are the vocabulary ring's (``--tsp-output-layer vocab-ring``)."""
    return args.tsp_size > 1 and args.tsp_output_layer == "vocab-ring"


def _batch_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator: Iterator[dict]) -> tuple[torch.Tensor, ...]:
    """Next micro-batch: tokens, labels, loss_mask, attention_mask, position_ids, each ``[b, s]``.

    Every rank reads its own iterator (the dataset provider is marked ``is_distributed``, so Megatron builds
    the data loader on every rank): all ranks of a TSP group see the same samples without a broadcast. Under
    TSP the sample is put in zigzag chunk order, so the sequence split after the embedding hands TSP rank p
    chunks p and 2D-1-p (plain tensor parallelism at --tsp-size 1 keeps the natural order).
    """
    fields = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
    device = _batch_device()
    batch = {name: value.to(device, non_blocking=True) for name, value in next(data_iterator).items()
             if name in fields and value is not None}
    tsp_size = get_args().tsp_size
    if tsp_size > 1:
        batch = zigzag_batch(batch, tsp_size)
    return tuple(batch.get(name) for name in fields)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token-loss sum, token count, and the ``lm loss`` report (sum, count) Megatron averages."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict], model: GPTModel):
    """Megatron forward step: run the model on the next micro-batch and hand back the loss function."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    args = get_args()
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels,
                          output_processor=tsp_output_loss if _vocab_ring(args) else None)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int], vp_stage: Optional[int] = None):
    """Megatron dataset provider: GPT datasets from --data-path, else mock data.

    With virtual pipeline stages Megatron builds one iterator per model chunk (``vp_stage``); every chunk
    gets the same samples, in the same order, which each chunk's forward step consumes in lockstep.
    """
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset_cls = MockGPTDataset if config.mock else GPTDataset
    print_rank_0(f"> building {dataset_cls.__name__} train, validation and test datasets ...")
    return BlendedMegatronDatasetBuilder(dataset_cls, train_val_test_num_samples, lambda: True, config).build()


train_valid_test_datasets_provider.is_distributed = True  # build on every rank: see get_batch


def parse_tsp_args(argv: Sequence[str]) -> Any:
    """Parse Megatron + TSP flags (after ``--config`` expansion), validate them for TSP, then for Megatron.

    TSP validation runs before Megatron's and before any process group exists, on every rank.
    """
    argv = expand_config(argv)
    if running_on_cpu():
        argv = [*argv, *CPU_MEGATRON_FLAGS]
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # asserted by Megatron's TP validation
    sys.argv = [sys.argv[0], *argv]
    args = parse_args(extra_args_provider=add_tsp_args)
    configure_tsp(args)
    validate_args(args, {})
    return args


def initialize_distributed(args: Any) -> None:
    """Init torch.distributed, build the mesh with the tsp axis, and seed the tensor-parallel RNG on CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=args.distributed_backend, rank=args.rank, world_size=args.world_size)
    initialize_model_parallel(
        # The tensor-parallel slot: the TSP degree (configure_tsp), or plain TP when --tsp-size is 1.
        tsp_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        order=args.tsp_order,
        create_gloo_process_groups=args.use_gloo_process_groups,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    if running_on_cpu():
        # Megatron seeds the tensor-parallel RNG tracker only when it sees a GPU.
        pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed + 100 * pipeline_rank)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse and validate, build the TSP mesh, then run ``megatron.training.pretrain``."""
    try:
        args = parse_tsp_args(sys.argv[1:] if argv is None else argv)
    except TSPConfigError as error:
        # Every rank reaches this before any process group exists, so all of them exit instead of hanging.
        sys.exit(f"[rank {os.environ.get('RANK', '0')}] megatron-tsp configuration error: {error}")
    set_global_variables(args)
    if running_on_cpu():
        print_rank_0(f"> megatron-tsp: no GPU found, running on {args.world_size} CPU rank(s) over gloo")
    initialize_distributed(args)
    try:
        resolve_auto_schedules(args)  # needs the process group and the padded vocabulary (set_global_variables)
    except TSPConfigError as error:  # the same on every rank (checked by a collective every rank made)
        sys.exit(f"[rank {args.rank}] megatron-tsp configuration error: {error}")
    config = pretrain_cfg_container_from_args(args)
    with contextlib.ExitStack() as stack:
        if running_on_cpu():
            stack.enter_context(cuda_to_cpu())
        counter = stack.enter_context(comm_bytes()) if args.tsp_report_comm_bytes else None
        # Megatron builds its process-group collections from the global groups; the patch in
        # megatron_compat.patches adds `.tsp` to each of them.
        pretrain(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step,
                 model_provider=model_provider)
    if counter is not None:
        totals = {op: float(nbytes) for op, nbytes in sorted(counter.bytes_by_op.items())}
        print_rank_0(f"> megatron-tsp comm bytes per rank over {args.train_iters} iterations: {json.dumps(totals)}")
        messages = dict(sorted(counter.messages_by_op.items()))
        print_rank_0(f"> megatron-tsp comm messages per rank over {args.train_iters} iterations: "
                     f"{json.dumps(messages)}")


if __name__ == "__main__":
    main()
