"""Decoding K samples of each prompt with the prompt's keys and values held once, for Llama and Qwen2 models.

``generate`` — and a cache expanded to the K samples — holds the prompt's keys and values K times, so every step
reads them K times. Here the K queries of a prompt attend to its one copy of the prompt together, and each sample to
its own new tokens; the two softmax parts are merged exactly (log-sum-exp). With the default student (K = 4, ~70
prompt tokens) the attention is bound by per-call cost more than by that reading: make bench's sampler ratio to
``generate`` went from 1.41× to 1.55× and 1.91× (two runs) with it; the saving grows with the prompt and with K. The step calls the model's own
embedding, norms, projections, rotary embedding and MLPs, so only the attention's arithmetic order differs from the
model's forward (~1e-7 relative in float32; tested against it). With K = 1 (on-policy GKD, greedy validation)
there is nothing to share: each row's prompt and new keys and values sit in one preallocated buffer, one softmax.
"""

import sys

import torch

from pbkd_lightning.parallel import is_sharded

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper: its modules


def supports(model) -> bool:
    """A model this decoder runs: a Llama or Qwen2 causal LM with full attention in every layer, in eval mode and not
    sharded (a sharded model gathers its weights in its own forward)."""
    lm = _causal_lm(model)
    if type(lm).__name__ not in SUPPORTED or lm.training or is_sharded(model):
        return False
    config = lm.config
    if getattr(config, "use_sliding_window", False) or any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    attention = lm.model.layers[0].self_attn
    return all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


class SharedPrefixDecoder:
    """Steps of ``num_samples`` samples per prompt after a prefill of the prompts alone.

    Args:
        model: a model :func:`supports` accepts.
        cache: the prefill's transformers cache (each layer's ``keys``/``values``: ``(B, kv heads, P, head dim)``).
        prompt_mask: ``(B, P)`` the prompts' attention mask (left padding is 0).
        num_samples: K; rows of every step are the K samples of prompt 0, then of prompt 1, ...
        steps: how many tokens will be decoded (the samples' own keys and values are preallocated for them).
    """

    def __init__(self, model, cache, prompt_mask: torch.Tensor, num_samples: int, steps: int):
        lm = _causal_lm(model)
        self.lm, self.k = lm, num_samples
        self.rotate = sys.modules[type(lm.model.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        # -inf where a prompt is padding: added to the prefix scores of all K samples and query heads of that prompt
        self.prefix_bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device).masked_fill(
            prompt_mask == 0, float("-inf"))[:, None, None, :]
        rows = prompt_mask.shape[0] * num_samples
        if num_samples == 1:
            # nothing to share: each row's prompt and own keys and values in one buffer, attended in one softmax
            # (a fifth of the attention's operations: the default student's K = 1 decode ~1.2x faster)
            self.whole = [tuple(torch.cat([states, states.new_zeros(*states.shape[:2], steps, states.shape[3])], 2) for states in pair)
                          for pair in self.prefix]
            self.whole_bias = torch.cat([self.prefix_bias, self.prefix_bias.new_zeros(*self.prefix_bias.shape[:3], steps)], -1)
            self.prompt_length = prompt_mask.shape[1]
            self.prefix = None  # copied into `whole`: not held twice (the caller drops the prefill's cache too)
        else:
            self.own = [(keys.new_empty(rows, keys.shape[1], steps, keys.shape[3]), values.new_empty(rows, values.shape[1], steps, values.shape[3]))
                        for keys, values in self.prefix]
        self.length = 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next-token logits ``(B·K, vocab)`` after ``tokens`` ``(B·K,)`` at ``positions`` ``(B·K,)``."""
        lm, rows = self.lm, tokens.shape[0]
        hidden = lm.model.embed_tokens(tokens[:, None])
        cos, sin = lm.model.rotary_emb(hidden, positions[:, None])
        at = self.length
        for index, layer in enumerate(lm.model.layers):
            attention = layer.self_attn
            residual, x = hidden, layer.input_layernorm(hidden)
            query = attention.q_proj(x).view(rows, 1, -1, attention.head_dim).transpose(1, 2)
            key = attention.k_proj(x).view(rows, 1, -1, attention.head_dim).transpose(1, 2)
            value = attention.v_proj(x).view(rows, 1, -1, attention.head_dim).transpose(1, 2)
            query, key = self.rotate(query, key, cos, sin)
            if self.k == 1:
                keys, values = self.whole[index]
                end = self.prompt_length + at + 1
                keys[:, :, end - 1], values[:, :, end - 1] = key[:, :, 0], value[:, :, 0]
                out = self._attend_whole(query[:, :, 0], keys[:, :, :end], values[:, :, :end], self.whole_bias[..., :end], attention.scaling)
            else:
                (prefix_keys, prefix_values), (own_keys, own_values) = self.prefix[index], self.own[index]
                own_keys[:, :, at] = key[:, :, 0]
                own_values[:, :, at] = value[:, :, 0]
                out = self._attend(query[:, :, 0], prefix_keys, prefix_values, own_keys[:, :, : at + 1], own_values[:, :, : at + 1],
                                   attention.scaling)
            hidden = residual + attention.o_proj(out.reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length += 1
        return lm.lm_head(lm.model.norm(hidden))[:, 0]

    @staticmethod
    def _attend_whole(query, keys, values, bias, scaling: float) -> torch.Tensor:
        """softmax over each row's whole sequence (K = 1) of ``query`` ``(B, heads, D)``, as ``(B, heads, D)``; a query
        head ``h`` reads kv head ``h // groups``."""
        rows, heads, dim = query.shape
        per_head = query.view(rows, keys.shape[1], -1, dim)  # (B, kv heads, groups, D)
        scores = torch.matmul(per_head, keys.transpose(-1, -2)).float() * scaling + bias
        return torch.matmul(scores.softmax(-1).to(values.dtype), values).to(query.dtype).view(rows, heads, dim)

    def _attend(self, query, prefix_keys, prefix_values, own_keys, own_values, scaling: float) -> torch.Tensor:
        """softmax over [prompt; own tokens] of ``query`` ``(B·K, heads, D)``, as ``(B·K, heads, D)``; a query head
        ``h`` reads kv head ``h // groups`` (transformers' ``repeat_kv``)."""
        rows, heads, dim = query.shape
        prompts, kv_heads = prefix_keys.shape[:2]
        layout = (prompts, self.k, kv_heads, heads // kv_heads)
        per_row = query.view(rows, kv_heads, heads // kv_heads, dim)
        # the prompt: per prompt and kv head, the query heads of its K samples as one block of queries
        prefix_scores = torch.matmul(_per_prompt(per_row, layout), prefix_keys.transpose(-1, -2)).float() * scaling + self.prefix_bias
        own_scores = torch.matmul(per_row, own_keys.transpose(-1, -2)).float() * scaling  # each sample's own tokens
        top = torch.maximum(_per_row(prefix_scores.amax(-1, keepdim=True), layout), own_scores.amax(-1, keepdim=True))
        prefix_weights, own_weights = torch.exp(prefix_scores - _per_prompt(top, layout)), torch.exp(own_scores - top)
        total = _per_row(prefix_weights.sum(-1, keepdim=True), layout) + own_weights.sum(-1, keepdim=True)
        out = (_per_row(torch.matmul(prefix_weights.to(prefix_values.dtype), prefix_values), layout).float()
               + torch.matmul(own_weights.to(own_values.dtype), own_values).float()) / total
        return out.to(query.dtype).view(rows, heads, dim)


def _per_prompt(tensor, layout):
    """``(B·K, kv heads, groups, X)`` → ``(B, kv heads, K·groups, X)``."""
    prompts, k, kv_heads, groups = layout
    return tensor.reshape(prompts, k, kv_heads, groups, -1).permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, k * groups, -1)


def _per_row(tensor, layout):
    """``(B, kv heads, K·groups, X)`` → ``(B·K, kv heads, groups, X)``."""
    prompts, k, kv_heads, groups = layout
    return tensor.reshape(prompts, kv_heads, k, groups, -1).permute(0, 2, 1, 3, 4).reshape(prompts * k, kv_heads, groups, -1)
