"""Megatron integration details of specs.py that the end-to-end runs cannot single out."""

from __future__ import annotations

import pytest
import torch

from megatron_tsp.attention import rotary_cos_sin
from megatron_tsp.specs import _LOCAL_ROTARY, _local_rotary
from megatron_tsp.zigzag import local_positions
from tests.multiprocess import run_on_ranks


def test_local_rotary_is_made_once_per_angle_table() -> None:
    """The local tokens' RoPE input is the table at their positions (as cos/sin or as angles), reused while
    the table is unchanged (also for the detached alias activation recompute passes), and made again after
    an in-place change, for other positions, or once the table is gone."""
    angles = torch.randn(16, 1, 1, 8)
    positions = local_positions(16, 4, 1)
    cos_sin = _local_rotary(angles, positions, torch.bfloat16, cos_sin=True)
    assert torch.equal(cos_sin, rotary_cos_sin(angles[positions], torch.bfloat16))
    assert _local_rotary(angles, positions, torch.bfloat16, cos_sin=True) is cos_sin
    assert _local_rotary(angles.detach(), positions, torch.bfloat16, cos_sin=True) is cos_sin
    assert torch.equal(_local_rotary(angles, positions, torch.float32, cos_sin=False), angles[positions])
    angles.mul_(2)
    again = _local_rotary(angles, positions, torch.bfloat16, cos_sin=True)
    assert again is not cos_sin and torch.equal(again, rotary_cos_sin(angles[positions], torch.bfloat16))
    other_rank = local_positions(16, 4, 2)
    assert torch.equal(_local_rotary(angles, other_rank, torch.float32, cos_sin=False), angles[other_rank])
    address = angles.data_ptr()
    del angles  # its entry goes with it: a table made later at the same address is not mistaken for it
    assert not any(where[0] == address for where in _LOCAL_ROTARY)


def _layer_forwards(rank: int, tsp_size: int) -> None:
    """A TSP layer with the gathered MLP on gloo ranks (Megatron's modules): its attention's prefetch is
    what the MLP's forward takes, and a forward that stops before the MLP leaves no prefetch behind."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatron_tsp.megatron_compat import cuda_to_cpu
    from megatron_tsp.mesh import initialize_model_parallel
    from megatron_tsp.specs import TSPTransformerLayer, get_gpt_layer_tsp_spec

    initialize_model_parallel(tsp_size=tsp_size)
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               tensor_model_parallel_size=tsp_size, sequence_parallel=True, gated_linear_unit=True,
                               activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, bias_activation_fusion=False,
                               bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                               persist_layer_norm=False)
    with cuda_to_cpu():
        layer = build_module(get_gpt_layer_tsp_spec(mlp_schedule="gather"), config=config, layer_number=1)
        assert isinstance(layer, TSPTransformerLayer) and layer.self_attention.prefetch == layer.mlp.prefetch_weights
        x = torch.randn(16 // tsp_size, 1, 32, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        taken = []
        mlp_forward = layer.mlp.forward

        def recording_forward(*args, **kwargs):
            taken.append(layer.mlp._prefetched_fc1)
            return mlp_forward(*args, **kwargs)
        layer.mlp.forward = recording_forward
        out, _ = layer(x, attention_mask=None)
        out.sum().backward()
        assert taken[0] is not None and layer.mlp._prefetched_fc1 is None  # started by attention, taken once

        def failing_forward(*args, **kwargs):
            raise RuntimeError("stopped before the MLP")
        layer.mlp.forward = failing_forward
        with pytest.raises(RuntimeError, match="stopped before the MLP"):
            layer(x, attention_mask=None)
        assert layer.mlp._prefetched_fc1 is None  # drained with the layer's forward
    parallel_state.destroy_model_parallel()


@pytest.mark.multiprocess
def test_layer_prefetch_serves_one_forward_and_never_outlives_it() -> None:
    run_on_ranks(_layer_forwards, 2)
