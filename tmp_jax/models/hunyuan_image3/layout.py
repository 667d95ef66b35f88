"""Where each token of a HunyuanImage-3.0 sequence sits: 2D RoPE positions, attention masks, the T2I check.

One T2I row is ``[template] prompt <boi> <img_size> <img_ratio> <timestep> <img> * (h*w) <eoi>``. This module
computes, from where the image spans start, what the decoder needs besides the embeddings: the (y, x) positions
of every token (the official ``build_2d_rope`` grid), the text-only causal mask and the joint T2I mask (causal
text, bidirectional image block, padded keys off) packed with its span in a :class:`T2IMask` (what the cuDNN
attention split of :mod:`.kernels` reads). :func:`check_t2i_layout` checks a batch's token ids on the host,
where a bad layout can still raise (the jitted forward cannot). The TI2I (Instruct) layout of several image
blocks per row is built in :mod:`.instruct` from :func:`block_positions` and :class:`T2IMask`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config


@partial(jax.tree_util.register_dataclass, data_fields=["dense", "image_start"], meta_fields=["num_image"])
@dataclasses.dataclass(frozen=True)
class T2IMask:
    """The joint T2I attention mask with the layout it encodes (what the cuDNN path needs).

    ``dense`` [B, 1, S, S] bool (:func:`joint_attention_mask`), ``image_start`` [B] first image token per row,
    ``num_image`` the (static) image span length. Image queries attend to exactly the keys before
    ``image_start + num_image``; every other query row is given by ``dense``.
    """

    dense: jax.Array
    image_start: jax.Array
    num_image: int


# ----------------------------------------------------------------------------------------------------------
# 2D RoPE positions
# ----------------------------------------------------------------------------------------------------------
def text_positions(seq_len: int) -> jax.Array:
    """``[1, S, 2]`` (y, x) positions of a text-only sequence: y = x = index (reduces to 1D RoPE)."""
    index = jnp.arange(seq_len, dtype=jnp.int32)
    return jnp.stack([index, index], axis=-1)[None]


def block_positions(seq_len: int, blocks: Sequence[tuple[jax.Array, int, int]]) -> jax.Array:
    """``[B, S, 2]`` (y, x) positions: each ``(start [B], h, w)`` block on its centred grid, the rest 1D.

    Block token (row, col) starting at ``L`` sits at ``y = L + floor((h*w - h)/2) + row``,
    ``x = L + floor((h*w - w)/2) + col``; tokens outside every block keep ``y = x = index``. Blocks must not
    overlap. With one block this is :func:`t2i_positions`.
    """
    index = jnp.arange(seq_len, dtype=jnp.int32)[None]  # [1, S]
    batch = blocks[0][0].shape[0] if blocks else 1
    y = jnp.broadcast_to(index, (batch, seq_len))
    x = y
    for start, h, w in blocks:
        n = h * w
        start = start.astype(jnp.int32)[:, None]  # [B, 1]
        offset = index - start
        inside = (offset >= 0) & (offset < n)
        offset = jnp.clip(offset, 0, n - 1)
        row, col = offset // w, offset % w
        # (n - h) // 2 == floor((n - h) / 2) because n >= h; adding integers keeps the floor exact.
        y = jnp.where(inside, start + (n - h) // 2 + row, y)
        x = jnp.where(inside, start + (n - w) // 2 + col, x)
    return jnp.stack([y, x], axis=-1)  # [B, S, 2]


def t2i_positions(seq_len: int, image_starts: jax.Array, token_h: int, token_w: int) -> jax.Array:
    """``[B, S, 2]`` (y, x) positions, one ``token_h x token_w`` image per row from ``image_starts[b]``.

    Image token (row, col) of a block starting at L sits at ``y = L + floor((h*w - h) / 2) + row``,
    ``x = L + floor((h*w - w) / 2) + col`` (the official grid is centred in the span, truncated to
    integers); every other token keeps its sequence index, so text after the block resumes at ``L + h*w``.
    """
    return block_positions(seq_len, [(image_starts, token_h, token_w)])


# ----------------------------------------------------------------------------------------------------------
# Attention masks and the host-side check of a T2I row
# ----------------------------------------------------------------------------------------------------------
def causal_mask(seq_len: int) -> jax.Array:
    """``[1, 1, S, S]`` boolean causal mask (query, key), true where attention is allowed."""
    index = jnp.arange(seq_len)
    return (index[None, :] <= index[:, None])[None, None]


def joint_attention_mask(
    seq_len: int, image_starts: jax.Array, num_image_tokens: int, valid_lengths: jax.Array
) -> jax.Array:
    """``[B, 1, S, S]`` boolean mask: causal text, bidirectional image block, padded keys masked out.

    Padded queries would otherwise see no key at all; they attend to themselves so the softmax stays finite
    (their outputs are never read).
    """
    index = jnp.arange(seq_len)
    causal = index[None, :] <= index[:, None]  # [q, k]
    start = image_starts[:, None]
    in_image = (index[None, :] >= start) & (index[None, :] < start + num_image_tokens)  # [B, S]
    image_block = in_image[:, :, None] & in_image[:, None, :]  # [B, q, k]
    key_valid = index[None, :] < valid_lengths[:, None]  # [B, k]
    mask = (causal[None] | image_block) & key_valid[:, None, :]
    mask = mask | jnp.eye(seq_len, dtype=bool)[None]
    return mask[:, None]


def check_t2i_layout(input_ids: np.ndarray, num_image_tokens: int, config: HunyuanImage3Config) -> None:
    """Raise ValueError unless every row holds one contiguous span of ``num_image_tokens`` image tokens
    preceded by the ``<timestep>`` token (host-side; the jitted forward cannot raise on traced values)."""
    ids = np.asarray(input_ids)
    bad = []
    for b, row in enumerate(ids):
        where = np.flatnonzero(row == config.image_token_id)
        ok = (
            where.size == num_image_tokens
            and where.size > 0
            and where[-1] - where[0] + 1 == num_image_tokens
            and where[0] >= 1
            and row[where[0] - 1] == config.timestep_token_id
        )
        if not ok:
            bad.append(b)
    if bad:
        raise ValueError(
            f"rows {bad}: every row needs one contiguous span of {num_image_tokens} image tokens "
            f"(id {config.image_token_id}) directly after the <timestep> token "
            f"(id {config.timestep_token_id})"
        )
