"""A causal LM's forward with its vocabulary head fed chosen positions only: no ``N × T × V`` logits."""

from __future__ import annotations

from torch import Tensor, nn


def project_positions(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
                      project: bool = True) -> tuple[Tensor, Tensor]:
    """``lm``'s last hidden states and logits at the set entries of ``positions`` (``(N, T-1)`` bool: position t
    holds the state that predicts token t + 1), row-major, on ``lm``'s device: ``(R, H)``, ``(R, V)``.

    The head projects those rows alone; with ``project=False`` it projects none (the logits are ``(0, V)``).
    """
    device = next(lm.parameters()).device
    input_ids, attention_mask, positions = input_ids.to(device), attention_mask.to(device), positions.to(device)
    head = lm.get_output_embeddings()
    if head is None:  # a model without a separate head module: its full logits, then the rows
        out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][:, :-1][positions], out.logits[:, :-1][positions]
    kept = {}

    def project_chosen_rows_only(head, args):
        kept["hidden"] = args[0][:, :-1][positions]
        return (kept["hidden"] if project else kept["hidden"][:0],)

    # The model's own forward with its head fed the chosen rows: under FSDP2 the root's hooks gather the (tied)
    # embedding for the head, which calling decoder and head separately would bypass; logit soft-capping or scaling
    # that the model applies after its head still applies.
    hook = head.register_forward_pre_hook(project_chosen_rows_only)
    try:
        logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        hook.remove()
    return kept["hidden"], logits
