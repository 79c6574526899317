"""Every patch megatron-tsp applies to Megatron, in one place.

Written against megatron-core 0.19.2 (``MEGATRON_VERSION``). A Megatron upgrade should only need this
package (and ``cpu.py`` beside it) to be re-checked.

- :data:`PATCHES`: replaced Megatron attributes, each with when it applies and why; :func:`install` applies
  them for a run, idempotently.
- ``patches/megatron-core-0.19.2.patch`` (repository root): source hooks for users of a Megatron-LM checkout,
  each a call into :mod:`megatron_tsp.megatron_compat.megatron_lm`, which lists them; applied by the user,
  never at runtime.
- Not patches, but leaning on megatron-core 0.19.2 behaviour, all in ``specs.py``: the expert-bias tag
  correction (``TSPMoELayer``, at build time); the expert ring's token dispatcher, rebuilt on a view of
  the process groups without an expert-tensor-parallel group (read as size 1 by ``utils.get_pg_size``);
  the vocabulary-ring loss, plugged in as GPTModel's ``output_processor`` (and, through the
  ``process_mtp_loss`` patch, for multi-token prediction's losses); RoPE's local cos/sin made once
  per angle table (``_local_rotary``), which pays off because ``RotaryEmbedding.forward`` is lru-cached per
  length, and under activation recompute hits through the detached alias Megatron's checkpoint passes (a
  cache miss only costs the recomputation, never a wrong value); ``TSPMultiTokenPredictionLayer``, which
  overrides the private ``MultiTokenPredictionLayer._concat_embeddings`` (norms, concatenation and
  ``eh_proj``) to run ``eh_proj`` on the rank's own tokens.
- ``cpu.py`` (torch-level, not Megatron): ``torch.cuda`` stand-ins and ``torch.compile`` disabled on CPU.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

MEGATRON_VERSION = "0.19.2"


@dataclass(frozen=True)
class Patch:
    """One replaced Megatron attribute: ``module.attribute`` becomes ``make(original)``."""

    module: str
    attribute: str
    cpu_only: bool
    reason: str
    make: Callable[[Any], Any]


def _with_tsp_group(original: classmethod) -> classmethod:
    @functools.wraps(original.__func__)
    def use_mpu_process_groups(cls, required_pgs=None):
        collection = original.__func__(cls, required_pgs)
        # The tsp axis occupies Megatron's tensor-parallel slot (see megatron_tsp.mesh).
        if "tp" in vars(collection):
            collection.tsp = collection.tp
        return collection

    return classmethod(use_mpu_process_groups)


def _allow_no_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _skip(original: Callable) -> Callable:
    @functools.wraps(original)
    def skipped(*args, **kwargs):
        return None

    return skipped


def _get_cpu_rng_state(original: Callable) -> Callable:
    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    return get_rng_state


def _set_cpu_rng_state(original: Callable) -> Callable:
    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state.cpu())

    return set_rng_state


def _int_split_sizes(original: staticmethod) -> staticmethod:
    def forward(ctx, group, input, output_split_sizes, input_split_sizes, use_nccl_stream=False):
        as_ints = lambda sizes: sizes if sizes is None else [int(size) for size in sizes]  # noqa: E731
        return original.__func__(ctx, group, input, as_ints(output_split_sizes), as_ints(input_split_sizes),
                                 use_nccl_stream)

    return staticmethod(forward)


def _uses_torch_adam_steps(optimizer: Any) -> bool:
    """Megatron's distributed optimizer runs torch's Adam, which keeps a per-parameter 'step' tensor, only when
    neither Apex nor Transformer Engine is importable (their fused Adam keeps the step in the param group)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE and not optimizer.ddp_config.use_megatron_fsdp


def _allocate_state_before_loading(original: Callable) -> Callable:
    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict={}, is_loading=False, sharding_type=None,  # noqa: B006
                           metadata=None):
        if is_loading and _uses_torch_adam_steps(self) and not self.optimizer.state:
            # Megatron builds the loading state dict from state_dict(), which reads the Adam step from the
            # per-parameter states, which do not exist before the first step. Allocate them (placeholders at
            # step 0, every value overwritten by the load) through Megatron's own allocating path.
            groups = [{**{key: value for key, value in group.items() if key != "params"}, "step": 0}
                      for group in self.optimizer.state_dict()["param_groups"]]
            self.load_state_dict({"optimizer": {"param_groups": groups}})
        return original(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    return sharded_state_dict


def _own_step_per_parameter(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        if _uses_torch_adam_steps(self):
            # Megatron puts one step tensor object into every parameter's state; torch's Adam increments each
            # parameter's step in place, so a shared tensor would advance once per parameter per iteration and
            # corrupt the bias correction of every step after a resume.
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()

    return load_state_dict


def _copy_loaded_state(original: Callable) -> Callable:
    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if _uses_torch_adam_steps(self):
            # Megatron has already set the step from the checkpoint's param groups. The per-parameter step
            # the formats hand over here is missing (fully reshardable: KeyError) or the placeholder the
            # loading state dict was built from (dp_reshardable: step 0). None is the copy loop's "leave as is".
            tensors = {**tensors, "step": None}
        # The default (dp_reshardable) loader copies without no_grad, which fails on fp32 main params: they
        # are views of the model params, leaves that require grad.
        with torch.no_grad():
            original(self, model_param, tensors)

    return _set_main_param_and_optimizer_states


def _no_fp8_without_te(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, fp8=False):
        original(self, fp8)
        from megatron.core.tensor_parallel import random

        if not random.HAVE_TE:  # no Transformer Engine, no fp8: Megatron's flag reads False as fp8 on
            self.fp8 = False

    return __init__


def _tsp_layers_size() -> int:
    """D when this run's TSP layers take samples in zigzag order (``args.tsp_size``), else 1."""
    from megatron.training import global_vars

    args = global_vars._GLOBAL_ARGS  # None outside Megatron's training entry points
    return getattr(args, "tsp_size", 1) if args is not None else 1


def _shift_in_natural_order(original: Callable) -> Callable:
    @functools.wraps(original)
    def roll_tensor(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        tsp_size = _tsp_layers_size()
        if tsp_size == 1 or tensor is None:
            return original(tensor, shifts, dims, cp_group, packed_seq_params)
        from megatron_tsp.zigzag import zigzag_shift

        shifted = zigzag_shift(tensor, shifts, dims, tsp_size)
        return shifted, shifted.sum()

    return roll_tensor


def _mtp_loss_by_vocab_ring(original: Callable) -> Callable:
    @functools.wraps(original)
    def process_mtp_loss(**kwargs):
        from megatron_tsp.specs import VOCAB_RING_OUTPUT, tsp_mtp_loss

        if getattr(kwargs.get("output_layer"), VOCAB_RING_OUTPUT, False):
            return tsp_mtp_loss(**kwargs)
        return original(**kwargs)

    return process_mtp_loss


PATCHES: tuple[Patch, ...] = (
    Patch("megatron.core.process_groups_config", "ProcessGroupCollection.use_mpu_process_groups", False,
          "expose the tsp axis as `pg_collection.tsp` on every collection Megatron builds from its "
          "global groups (ProcessGroupCollection rejects unknown constructor keys)", _with_tsp_group),
    Patch("megatron.training.training", "initialize_megatron", True,
          "pretrain() calls initialize_megatron() without allow_no_cuda, which asserts CUDA", _allow_no_cuda),
    Patch("megatron.training.training", "set_jit_fusion_options", True,
          "its JIT warm-up allocates on CUDA and draws random numbers whose count depends on the "
          "tensor-parallel size, which would make initial weights depend on the layout", _skip),
    Patch("megatron.core.datasets.utils", "compile_helpers", True,
          "the wheel ships the compiled dataset helper but no Makefile; running `make` exits rank 0", _skip),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", True,
          "the tensor-parallel RNG tracker must fork the CPU generator when there is no GPU",
          _get_cpu_rng_state),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", True,
          "Megatron defers the set through torch.cuda._lazy_call, which never runs without a GPU",
          _set_cpu_rng_state),
    Patch("megatron.core.tensor_parallel.mappings", "_AllToAll.forward", True,
          "MoE all-to-all split sizes stay torch tensors off CUDA; gloo's all_to_all_single needs Python ints",
          _int_split_sizes),
    Patch("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.sharded_state_dict", False,
          "with torch's Adam (no Apex/TE) loading a distributed-optimizer checkpoint asserts on the empty "
          "per-parameter states before the first step", _allocate_state_before_loading),
    Patch("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.load_state_dict", False,
          "with torch's Adam (no Apex/TE) the loaded step is one tensor shared by every parameter, which Adam "
          "then increments once per parameter", _own_step_per_parameter),
    Patch("megatron.core.optimizer.distrib_optimizer",
          "DistributedOptimizer._set_main_param_and_optimizer_states", False,
          "with torch's Adam (no Apex/TE) the loaders copy a per-parameter step that is missing (fully "
          "reshardable format: KeyError) or a stale placeholder (default format: resets the step to 0); with "
          "fp32 params the default format's loader copies into leaves that require grad outside no_grad",
          _copy_loaded_state),
    Patch("megatron.core.tensor_parallel.random", "CheckpointWithoutOutput.__init__", False,
          "it sets `self.fp8 = fp8 is not None`, True for its default fp8=False, so without Transformer Engine "
          "every output-discarding recompute (--recompute-modules layernorm, moe_act) calls TE's "
          "FP8GlobalStateManager, which was never imported: NameError at the first forward",
          _no_fp8_without_te),
    Patch("megatron.core.transformer.multi_token_prediction", "roll_tensor", False,
          "multi-token prediction shifts input ids, positions, labels and loss mask by one token along the "
          "sequence with torch.roll; under TSP every rank holds them whole in zigzag chunk order (packed "
          "sequences and CP are refused), so the shift must run in natural order",
          _shift_in_natural_order),
    Patch("megatron.core.models.gpt.gpt_model", "process_mtp_loss", False,
          "GPTModel computes the multi-token prediction losses with its output layer over all-gathered hidden "
          "states, [s, b, V/D] logits per depth, before (and apart from) the output processor that replaces "
          "the decoder's loss; with --tsp-output-layer vocab-ring (the output layer marked by "
          "pretrain_gpt.model_provider) the vocabulary ring computes them (specs.tsp_mtp_loss)",
          _mtp_loss_by_vocab_ring),
)


_APPLIED: set[tuple[str, str]] = set()


def install(cpu: bool) -> None:
    """Apply every patch that applies to this run (``cpu``: no GPU); safe to call more than once."""
    for patch in PATCHES:
        if (patch.cpu_only and not cpu) or (patch.module, patch.attribute) in _APPLIED:
            continue
        owner: Any = importlib.import_module(patch.module)
        *path, name = patch.attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, patch.make(original))
        _APPLIED.add((patch.module, patch.attribute))
