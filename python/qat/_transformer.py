"""Traceable equivalents of PyTorch's attention layers, put in place of
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoderLayer`` and ``nn.TransformerDecoder`` by ``qat.prepare`` before it
traces a model.

PyTorch's own versions cannot be traced (their forwards branch on tensor properties) and
run their projections through ``F.multi_head_attention_forward`` or one fused native kernel,
on weights that are not ``nn.Linear`` modules: left as they are, every weight of an encoder
stays in float. Here each projection is an ``nn.Linear`` (the query, key and value parts of
``in_proj_weight`` become three), which prepare swaps and convert puts on the integer
linear kernel like any other (and the layer norms, ``nn.LayerNorm`` modules, go to
``quantized::layer_norm``); the attention itself (scaled scores, masks, softmax, the
weighted sum of values) is two functions that ``torch.fx`` keeps as single calls and the
integer model runs in float, on the dequantized projections.

The arithmetic is PyTorch's slow path, so the float model's outputs are unchanged (to
float rounding): masks may be boolean (True = not attended) or additive, as PyTorch
takes them. Not taken apart (left to PyTorch, in float): attention with ``bias_k`` /
``bias_v`` or ``add_zero_attn``, and subclasses, whose forwards may differ.

torchvision's Swin window attention (``ShiftedWindowAttention``) is taken apart the same
way: its forward hands its ``qkv`` and ``proj`` Linears' weights to one wrapped function
(``F.linear`` inside), so without a stand-in a third of swin_t's weights stay float. The
stand-ins (V1 and V2) call the two Linears as modules and keep the window partition, the
attention and the window merge as wrapped functions (float in the integer model).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["make_traceable"]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def attention_probs(q: Tensor, k: Tensor, heads: int, attn_mask: Optional[Tensor],
                    key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + masks) per head, (batch, heads, target, source),
    from the projected queries (batch, target, embed) and keys (batch, source, embed)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError("qat: attention takes batched 3-D query, key and value")
    batch, target, embed = q.size(0), q.size(1), q.size(2)
    source = k.size(1)
    head_dim = embed // heads
    q = q.reshape(batch, target, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q * math.sqrt(1.0 / head_dim), k.transpose(-2, -1))
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype)
        if mask.dim() == 3:  # (batch * heads, target, source)
            mask = mask.reshape(batch, heads, target, source)
        scores = scores + mask
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype).reshape(batch, 1, 1, source)
    return torch.softmax(scores, -1)


def attend(probs: Tensor, v: Tensor) -> Tensor:
    """The heads' weighted sums of the projected values (batch, source, embed), joined:
    (batch, target, embed)."""
    batch, heads, target = probs.size(0), probs.size(1), probs.size(2)
    source, embed = v.size(1), v.size(2)
    v = v.reshape(batch, source, heads, embed // heads).transpose(1, 2)
    return torch.matmul(probs, v).transpose(1, 2).reshape(batch, target, embed)


def head_weights(probs: Tensor, average: bool) -> Tensor:
    return probs.mean(1) if average else probs


# Single calls in the traced graph (run in float by the integer model), not their insides.
fx.wrap("attention_probs")
fx.wrap("attend")
fx.wrap("head_weights")


def _linear_like(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            layer.bias.copy_(bias)
            layer.bias.requires_grad_(bias.requires_grad)
    return layer


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        embed = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(embed)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(embed)
        self.q_proj = _linear_like(weights[0], biases[0])
        self.k_proj = _linear_like(weights[1], biases[1])
        self.v_proj = _linear_like(weights[2], biases[2])
        self.out_proj = _linear_like(mha.out_proj.weight, mha.out_proj.bias)
        self.dropout = nn.Dropout(mha.dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        probs = self.dropout(attention_probs(self.q_proj(query), self.k_proj(key),
                                             self.num_heads, attn_mask, key_padding_mask,
                                             is_causal))
        out = self.out_proj(attend(probs, self.v_proj(value)))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, head_weights(probs, average_attn_weights) if need_weights else None


class TransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post- or pre-norm) over :class:`MultiheadAttention`,
    sharing the original's feed-forward, norm and dropout modules."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = MultiheadAttention(layer.self_attn)
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.activation = layer.activation

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _attention(self, x, mask, key_padding_mask, is_causal):
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask,
                                            key_padding_mask=key_padding_mask,
                                            need_weights=False, is_causal=is_causal)[0])

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` over :class:`TransformerEncoderLayer` s."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: Optional[bool] = None):
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask, bool(is_causal))
        return x if self.norm is None else self.norm(x)


class TransformerDecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer`` (post- or pre-norm): self-attention, attention over
    the memory and the feed-forward block, each a :class:`MultiheadAttention` or the
    original's linear, norm and dropout modules."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__()
        self.self_attn = MultiheadAttention(layer.self_attn)
        self.multihead_attn = MultiheadAttention(layer.multihead_attn)
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm_first = layer.norm_first
        self.norm1, self.norm2, self.norm3 = layer.norm1, layer.norm2, layer.norm3
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.dropout3 = layer.dropout3
        self.activation = layer.activation

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False):
        x = tgt

        def self_attention(x):
            return self.dropout1(self.self_attn(
                x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                need_weights=False, is_causal=tgt_is_causal)[0])

        def memory_attention(x):
            return self.dropout2(self.multihead_attn(
                x, memory, memory, attn_mask=memory_mask,
                key_padding_mask=memory_key_padding_mask, need_weights=False,
                is_causal=memory_is_causal)[0])

        def feed_forward(x):
            return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

        if self.norm_first:
            x = x + self_attention(self.norm1(x))
            x = x + memory_attention(self.norm2(x))
            return x + feed_forward(self.norm3(x))
        x = self.norm1(x + self_attention(x))
        x = self.norm2(x + memory_attention(x))
        return self.norm3(x + feed_forward(x))


class TransformerDecoder(nn.Module):
    """``nn.TransformerDecoder`` over :class:`TransformerDecoderLayer` s."""

    def __init__(self, decoder: nn.TransformerDecoder):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(layer) for layer in decoder.layers)
        self.norm = decoder.norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None,
                tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                      memory_key_padding_mask, bool(tgt_is_causal), memory_is_causal)
        return x if self.norm is None else self.norm(x)


# -- torchvision's Swin window attention --------------------------------------------------

def _window_geometry(shape: List[int], window_size: List[int],
                     shift_size: List[int]) -> Tuple[int, int, List[int]]:
    """(padded height, padded width, shift) of a (batch, height, width, channels) input:
    padded to whole windows, not shifted along a side that one window covers (as
    torchvision's ``shifted_window_attention``)."""
    pad_h = shape[1] + (window_size[0] - shape[1] % window_size[0]) % window_size[0]
    pad_w = shape[2] + (window_size[1] - shape[2] % window_size[1]) % window_size[1]
    shift = [0 if window_size[0] >= pad_h else shift_size[0],
             0 if window_size[1] >= pad_w else shift_size[1]]
    return pad_h, pad_w, shift


def window_partition(x: Tensor, window_size: List[int], shift_size: List[int]) -> Tensor:
    """(batch, height, width, channels) -> (batch * windows, window tokens, channels):
    padded to whole windows and cyclically shifted."""
    batch, height, width, channels = x.shape
    pad_h, pad_w, shift = _window_geometry(x.shape, window_size, shift_size)
    x = F.pad(x, (0, 0, 0, pad_w - width, 0, pad_h - height))
    if shift[0] + shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1],
               window_size[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size[0] * window_size[1], channels)


def window_merge(windows: Tensor, x: Tensor, window_size: List[int],
                 shift_size: List[int]) -> Tensor:
    """The inverse of :func:`window_partition` for windows of the input ``x``: the windows
    put back in place, the shift undone, the padding cut off."""
    batch, height, width, channels = x.shape
    pad_h, pad_w, shift = _window_geometry(x.shape, window_size, shift_size)
    out = windows.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0],
                       window_size[1], channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if shift[0] + shift[1] > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


def window_position_bias(table: Tensor, index: Tensor, window_size: List[int]) -> Tensor:
    """The learned relative position bias, (1, heads, tokens, tokens), of a window's token
    pairs from their ``index`` into the ``table`` of (relative positions, heads)."""
    tokens = window_size[0] * window_size[1]
    return table[index].view(tokens, tokens, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def window_mlp_position_bias(table: Tensor, index: Tensor, window_size: List[int]) -> Tensor:
    """Swin V2's position bias, 16 sigmoid(b), from the ``table`` of biases b that its MLP
    gives the relative positions (..., heads). One call, so that prepare puts no
    FakeQuantize on the bias (about 8 +- 0.1: a few steps of 8-bit grid) before the float
    attention that adds it."""
    return 16 * torch.sigmoid(window_position_bias(table.reshape(-1, table.size(-1)), index,
                                                   window_size))


def _qkv_heads(qkv: Tensor, heads: int) -> Tensor:
    """(windows, tokens, 3 * channels) -> (3, windows, heads, tokens, head channels)."""
    return qkv.reshape(qkv.size(0), qkv.size(1), 3, heads, qkv.size(2) // (3 * heads)).permute(
        2, 0, 3, 1, 4)


def _shift_mask(pad_h: int, pad_w: int, window_size: List[int], shift: List[int],
                like: Tensor) -> Tensor:
    """(windows, tokens, tokens): -100 between tokens that the cyclic shift brought from
    different regions of the image into one window, 0 elsewhere (torchvision's mask)."""
    regions = like.new_zeros((pad_h, pad_w))
    # Without a shift along a side, that side is one region.
    row_bounds = [0, pad_h - window_size[0], pad_h - shift[0], pad_h] if shift[0] > 0 else [
        0, 0, 0, pad_h]
    column_bounds = [0, pad_w - window_size[1], pad_w - shift[1], pad_w] if shift[1] > 0 else [
        0, 0, 0, pad_w]
    for row in range(3):
        for column in range(3):
            regions[row_bounds[row]:row_bounds[row + 1],
                    column_bounds[column]:column_bounds[column + 1]] = 3 * row + column
    regions = regions.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1],
                           window_size[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window_size[0] * window_size[1])
    differs = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differs.masked_fill(differs != 0, -100.0).masked_fill(differs == 0, 0.0)


def window_scores(qkv: Tensor, position_bias: Tensor, x: Tensor, window_size: List[int],
                  shift_size: List[int], heads: int,
                  logit_scale: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T / sqrt(head channels) + position bias + shift mask) per window and
    head, (windows, heads, tokens, tokens), from the projected windows of the input ``x``;
    with a ``logit_scale`` (Swin V2), the cosine of q and k times exp(min(logit_scale,
    log 100)) instead of the scaled product."""
    split = _qkv_heads(qkv, heads)
    if logit_scale is None:
        scores = (split[0] * (qkv.size(2) // (3 * heads)) ** -0.5).matmul(
            split[1].transpose(-2, -1))
    else:
        scores = F.normalize(split[0], dim=-1).matmul(F.normalize(split[1], dim=-1).transpose(
            -2, -1))
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    scores = scores + position_bias
    pad_h, pad_w, shift = _window_geometry(x.shape, window_size, shift_size)
    if shift[0] + shift[1] > 0:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, scores)
        tokens = scores.size(-1)
        scores = scores.view(-1, mask.size(0), heads, tokens, tokens) + mask.unsqueeze(
            1).unsqueeze(0)
        scores = scores.view(-1, heads, tokens, tokens)
    return F.softmax(scores, dim=-1)


def window_query_value_bias(qkv: Tensor, bias: Tensor) -> Tensor:
    """``qkv`` plus the query and value parts of ``bias``: Swin V2 leaves the keys without
    one, whatever the key part holds."""
    length = bias.numel() // 3
    return qkv + torch.cat([bias[:length], torch.zeros_like(bias[length:2 * length]),
                            bias[2 * length:]])


def window_values(probs: Tensor, qkv: Tensor, heads: int) -> Tensor:
    """The heads' weighted sums of the projected values, joined: (windows, tokens,
    channels)."""
    values = probs.matmul(_qkv_heads(qkv, heads)[2])
    return values.transpose(1, 2).reshape(qkv.size(0), qkv.size(1), qkv.size(2) // 3)


fx.wrap("window_partition")
fx.wrap("window_merge")
fx.wrap("window_position_bias")
fx.wrap("window_mlp_position_bias")
fx.wrap("window_scores")
fx.wrap("window_query_value_bias")
fx.wrap("window_values")


class ShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1) calling its ``qkv`` and ``proj``
    Linears as modules. It holds the original's Linears, position-bias table and index
    under the original's names, so the state dict keeps its keys."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.qkv, self.proj = attention.qkv, attention.proj
        if hasattr(attention, "relative_position_bias_table"):  # V2 has an MLP instead
            self.relative_position_bias_table = attention.relative_position_bias_table
        self.register_buffer("relative_position_index", attention.relative_position_index)
        self.window_size, self.shift_size = list(attention.window_size), list(attention.shift_size)
        self.num_heads = attention.num_heads
        self.attention_dropout = nn.Dropout(attention.attention_dropout)
        self.dropout = nn.Dropout(attention.dropout)

    def position_bias(self) -> Tensor:
        return window_position_bias(self.relative_position_bias_table,
                                    self.relative_position_index, self.window_size)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(window_partition(x, self.window_size, self.shift_size))
        # V2's cosine attention scale and query / value bias; V1 has neither.
        logit_scale = getattr(self, "logit_scale", None)
        if getattr(self, "qkv_bias", None) is not None:
            qkv = window_query_value_bias(qkv, self.qkv_bias)
        probs = self.attention_dropout(window_scores(qkv, self.position_bias(), x,
                                                     self.window_size, self.shift_size,
                                                     self.num_heads, logit_scale))
        out = self.dropout(self.proj(window_values(probs, qkv, self.num_heads)))
        return window_merge(out, x, self.window_size, self.shift_size)


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttentionV2``: cosine attention with a learned logit
    scale, the position bias from a small MLP (``cpb_mlp``, its Linears swapped too), and no
    key bias. The ``qkv`` Linear loses its bias to ``qkv_bias``, added after it in float
    with the key part left out, as torchvision's forward does each call (a Linear module
    adds all of its bias): the state dict has ``qkv_bias`` for ``qkv.bias``."""

    def __init__(self, attention: nn.Module):
        super().__init__(attention)
        self.logit_scale, self.cpb_mlp = attention.logit_scale, attention.cpb_mlp
        self.register_buffer("relative_coords_table", attention.relative_coords_table)
        bias = attention.qkv.bias
        if bias is not None:
            weight = attention.qkv.weight
            self.qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                 device=weight.device, dtype=weight.dtype)
            self.qkv.weight = weight
        self.qkv_bias = bias

    def position_bias(self) -> Tensor:
        return window_mlp_position_bias(self.cpb_mlp(self.relative_coords_table),
                                        self.relative_position_index, self.window_size)


def _swin_attention(module: nn.Module) -> Optional[nn.Module]:
    """The stand-in for torchvision's Swin window attention (V1 or V2 itself, not another
    subclass, whose forward may differ), or None for any other module."""
    kind = type(module)
    if kind.__module__ != "torchvision.models.swin_transformer":
        return None
    stand_in = {"ShiftedWindowAttention": ShiftedWindowAttention,
                "ShiftedWindowAttentionV2": ShiftedWindowAttentionV2}.get(kind.__name__)
    return None if stand_in is None else stand_in(module).train(module.training)


def _supported(attention: nn.Module) -> bool:
    """Whether ``attention`` is PyTorch's own attention without the options taken here in
    no stand-in (extra key / value biases, a zero attention row)."""
    return (type(attention) is nn.MultiheadAttention and attention.bias_k is None
            and not attention.add_zero_attn)


def _attention_traceable(layer: nn.Module) -> bool:
    """Whether every attention of an encoder or decoder layer has a stand-in."""
    attentions = [layer.self_attn, getattr(layer, "multihead_attn", layer.self_attn)]
    return all(_supported(a) for a in attentions)


# PyTorch's encoder / decoder layers and stacks -> (stand-in, the layer type of a stack).
_STAND_INS = {
    nn.TransformerEncoderLayer: (TransformerEncoderLayer, None),
    nn.TransformerEncoder: (TransformerEncoder, nn.TransformerEncoderLayer),
    nn.TransformerDecoderLayer: (TransformerDecoderLayer, None),
    nn.TransformerDecoder: (TransformerDecoder, nn.TransformerDecoderLayer),
}


def _traceable(module: nn.Module) -> Optional[nn.Module]:
    """The traceable equivalent of ``module``, or None where it has none."""
    kind = type(module)
    if kind is nn.MultiheadAttention and _supported(module):
        return MultiheadAttention(module).train(module.training)
    swin = _swin_attention(module)
    if swin is not None:
        return swin
    if kind not in _STAND_INS:
        return None
    stand_in, layer_kind = _STAND_INS[kind]
    layers = module.layers if layer_kind is not None else [module]
    if not all(type(layer) is (layer_kind or kind) and _attention_traceable(layer)
               for layer in layers):
        return None
    return stand_in(module).train(module.training)


def make_traceable(model: nn.Module) -> nn.Module:
    """``model`` with its attention layers replaced by their traceable equivalents (in
    place below the root; the root itself is returned replaced when it is one)."""
    new = _traceable(model)
    if new is not None:
        return new
    for name, child in model.named_children():
        replaced = make_traceable(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
