"""The KV cache of the built-in engines (plain sampling and Jacobi decoding share it).

transformers' ``DynamicCache`` concatenates every step (O(N^2) copying over N steps, measured 17% of a decode
step). Here each full-attention layer writes into one ``[rows, kv_heads, capacity, head_dim]`` buffer allocated for
the whole call and hands out growing views; rows can be dropped or reordered (``select_rows``), the valid length
cut back (``crop``) and, per row, a run of columns moved left (``compact``: Jacobi's ragged progress).
"""

from __future__ import annotations

import torch


def preallocated_cache(config, capacity: int, strict: bool = False):
    """A DynamicCache whose full-attention layers write into buffers of ``capacity`` columns.

    config: the decoder's (text) config. strict: raise when a layer is not plain full attention (sliding window or
    other special layers); otherwise such layers are left as transformers built them.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class _Layer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h = key_states.shape[:2]
            self.buf_k = key_states.new_empty(b, h, capacity, key_states.shape[-1])
            self.buf_v = value_states.new_empty(b, h, capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache capacity {capacity} exceeded")
            self.buf_k[:, :, self.length : end] = key_states
            self.buf_v[:, :, self.length : end] = value_states
            self.set_length(end)
            return self.keys, self.values

        def set_length(self, n: int) -> None:
            self.length = n
            self.keys, self.values = self.buf_k[:, :, :n], self.buf_v[:, :, :n]

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
                self.set_length(self.length)

    cache = DynamicCache(config=config)
    if strict:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"this decoding needs plain full-attention KV cache layers; the model has {type(layer).__name__}"
                )
    cache.layers = [_Layer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def compact(cache, start: int, width: int, dst: torch.Tensor, new_len: int) -> None:
    """Per row r, move cache columns [start, start + width) to [dst_r, dst_r + width) (dst_r <= start); then
    the cache holds ``new_len`` columns."""
    moved = bool((dst != start).any())
    for layer in cache.layers:
        if moved:
            idx = dst[:, None] + torch.arange(width, device=dst.device)  # [R, width]
            for buf in (layer.buf_k, layer.buf_v):
                src = buf[:, :, start : start + width].clone()
                buf.scatter_(2, idx[:, None, :, None].expand_as(src), src)
        layer.set_length(new_len)


def crop(cache, n: int) -> None:
    """Keep the first ``n`` columns of every row."""
    for layer in cache.layers:
        layer.set_length(n)


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep (and reorder to) the cache rows ``rows`` [R'] (int64)."""
    cache.batch_select_indices(rows)
