"""FSDP2 through Lightning's ``ModelParallelStrategy`` (``configs/strategy/fsdp.yaml``).

Every model the module holds (student, critic, frozen reference) is sharded with ``fully_shard`` per
transformer block and then as a whole over the data-parallel mesh. The teacher is never sharded: it
stays outside the module (frozen, possibly quantized), one copy per rank.

Sharded models need every rank to run the same number of forward passes, since each forward gathers
parameters collectively: generation keeps ranks in step (``synced_gpus``), and the data module and
the held-out metrics give every rank the same number of batches.
"""

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules of the classes its Hugging Face models name in
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); empty for a plain head."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` each transformer block, then the model (its embeddings, norms and heads)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    # Resharded after every forward, also as a root: these models often run forward-only (rewards, references,
    # generation), and a root left unsharded would leave the optimizer's sharded parameters off the module.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict of a sharded model, on CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def same_count_on_every_rank(count: int, device) -> int:
    """The largest ``count`` over ranks: what every rank pads its number of forward passes to."""
    if not torch.distributed.is_initialized():
        return count
    value = torch.tensor(count, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)
