"""Reference core attention: torch SDPA with a dense boolean causal mask built from global positions.

Any position order works, at the cost of an ``[sq, sk]`` mask and no causal skipping; the zigzag backend
(``zigzag.py``) is tested against it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def causal_attention(q: Tensor, k: Tensor, v: Tensor, q_positions: Tensor, k_positions: Tensor,
                     softmax_scale: float) -> Tensor:
    """Causal attention by global position.

    q ``[sq, b, nq, hd]``, k/v ``[sk, b, nkv, hd]`` with nq a multiple of nkv (query head i uses kv head
    i // (nq/nkv), Megatron's grouping), q_positions ``[sq]``, k_positions ``[sk]``. Returns
    ``[sq, b, nq*hd]``. Every query must see at least one key (its own position), else its row is NaN.
    """
    sq, batch, num_heads, head_dim = q.shape
    if num_heads % k.shape[2] != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({k.shape[2]})")
    allowed = k_positions.view(1, -1) <= q_positions.view(-1, 1)  # [sq, sk], True = attend
    # SDPA wants [b, heads, seq, hd]
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         attn_mask=allowed, scale=softmax_scale,
                                         enable_gqa=num_heads != k.shape[2])
    return out.permute(2, 0, 1, 3).reshape(sq, batch, num_heads * head_dim)
