"""A teacher-logit cache: the teacher's top-k log-probabilities per response token, on disk.

One pass of the teacher writes, for every scored token of every sequence, the k most likely
tokens' log-probabilities (float16), their ids (int32) and the leftover mass ``1 − Σ p`` (float32):
``6k + 4`` bytes a token, 388 at k = 64. Later runs read :class:`SparseTeacher` batches from it
with no teacher in memory. Shards are safetensors files written atomically (temporary file, then
rename) and listed in ``index.json`` (rewritten atomically after each shard), so an interrupted
pass resumes at the first missing shard.

Layout of a shard: ``logprobs (R, k)``, ``indices (R, k)``, ``leftover (R,)`` for its R scored
tokens, and ``offsets (S + 1,)``: sequence i of the shard owns rows ``offsets[i]:offsets[i+1]``.
"""

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pbkd_lightning.data.records import atomic_output, remove_partial_outputs
from pbkd_lightning.losses import SparseTeacher
from pbkd_lightning.models.rows import project_positions
from pbkd_lightning.sequences import Encoder

INDEX = "index.json"
LAYOUT = 2
"""Version of the sequence layout the rows follow (2: a response cut at the limit has no eos)."""


def cache_fingerprint(sequences: list[tuple[str, str]], k: int, tag: str = "") -> str:
    """Identifies the sequences, k, the teacher (``tag``) and the sequence layout a cache was written for."""
    return hashlib.sha256(json.dumps([k, tag, sequences, LAYOUT]).encode()).hexdigest()[:16]


def _write_json_atomic(path: str, value: dict) -> None:
    with atomic_output(path) as tmp, open(tmp, "w") as handle:
        json.dump(value, handle, indent=1)


@torch.no_grad()
def write_teacher_cache(
    teacher,
    encoder: Encoder,
    sequences: list[tuple[str, str]],
    folder: str,
    k: int = 64,
    shard_size: int = 256,
    batch_size: int = 16,
    vocabulary: int | None = None,
    tag: str = "",
) -> dict:
    """Score ``(prompt, response)`` pairs with ``teacher`` and store its top-k per response token.

    Resumes an interrupted pass over the same sequences, k and teacher; refuses a folder made for others.

    Args:
        vocabulary: keep only the first this-many logits (padding rows past the shared tokenizer).
        tag: names the teacher; part of the fingerprint, so another teacher's cache is never reused.

    Returns:
        The index (also in ``folder/index.json``), with ``bytes_per_token``.
    """
    if k < 1:
        raise ValueError(f"`k` must be ≥ 1, got {k}")
    os.makedirs(folder, exist_ok=True)
    fingerprint = cache_fingerprint(sequences, k, tag)
    index_path = os.path.join(folder, INDEX)
    index = {"k": k, "fingerprint": fingerprint, "sequences": len(sequences), "shard_size": shard_size, "shards": []}
    if os.path.exists(index_path):
        with open(index_path) as handle:
            found = json.load(handle)
        if (found["fingerprint"], found["shard_size"]) != (fingerprint, shard_size):
            raise ValueError(f"{folder} holds a cache of other sequences or settings; use another folder")
        index = found
    remove_partial_outputs(folder)  # a shard a killed pass was writing: written again below
    done = {shard["file"] for shard in index["shards"]}
    was_training = teacher.training
    teacher.eval()
    shards = range(0, len(sequences), shard_size)
    try:
        for number, start in enumerate(tqdm(shards, desc="teacher cache", unit="shard")):
            name = f"shard_{number:05d}.safetensors"
            if name in done:
                continue
            rows = {"logprobs": [], "indices": [], "leftover": []}
            offsets = [0]
            chunk = sequences[start : start + shard_size]
            for begin in range(0, len(chunk), batch_size):
                part = chunk[begin : begin + batch_size]
                # (prompt, response) or (prompt, response, ended): a teacher answer cut at its limit has no eos row
                batch = encoder.batch([q[0] for q in part], [q[1] for q in part], [q[2] if len(q) > 2 else True for q in part])
                # the head sees the scored rows only (no N x T x V logits), split back into sequences
                scored = batch.scored_positions
                _, logits = project_positions(teacher, batch.input_ids, batch.attention_mask, scored)
                for row_logits in logits[:, :vocabulary].split(scored.sum(1).tolist()):
                    logprobs = torch.log_softmax(row_logits.float(), dim=-1)
                    top, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
                    rows["logprobs"].append(top.half().cpu())
                    rows["indices"].append(ids.int().cpu())
                    rows["leftover"].append((1.0 - top.exp().sum(-1)).clamp(min=0.0).cpu())
                    offsets.append(offsets[-1] + row_logits.shape[0])
            tensors = {key: torch.cat(values) for key, values in rows.items()}
            tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
            with atomic_output(os.path.join(folder, name)) as tmp:  # an interrupted shard is redone on resume
                save_file(tensors, tmp)
            index["shards"].append({"file": name, "start": start, "count": len(chunk), "tokens": offsets[-1]})
            _write_json_atomic(index_path, index)
    finally:
        teacher.train(was_training)
    tokens = sum(shard["tokens"] for shard in index["shards"])
    size = sum(os.path.getsize(os.path.join(folder, shard["file"])) for shard in index["shards"])
    index["bytes_per_token"] = size / max(1, tokens)
    _write_json_atomic(index_path, index)
    return index


class TeacherCache:
    """Reads a cache made by :func:`write_teacher_cache`; shards are loaded on first use."""

    def __init__(self, folder: str, fingerprint: str | None = None):
        """``fingerprint``: when given, the cache must have been written for it (:func:`cache_fingerprint`)."""
        path = os.path.join(folder, INDEX)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: no {INDEX}; write the cache first")
        with open(path) as handle:
            self.index = json.load(handle)
        if sum(s["count"] for s in self.index["shards"]) != self.index["sequences"]:
            raise ValueError(f"{folder}: the cache is incomplete; run the caching pass again to finish it")
        if fingerprint is not None and self.index["fingerprint"] != fingerprint:
            raise ValueError(f"{folder} holds a cache of other sequences, k or teacher; use another folder")
        self.folder, self.k, self._loaded = folder, self.index["k"], {}

    def __len__(self) -> int:
        return self.index["sequences"]

    def rows(self, sequence: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprobs (n, k), indices (n, k), leftover (n,))`` of one sequence's n scored tokens."""
        shard = next(s for s in self.index["shards"] if s["start"] <= sequence < s["start"] + s["count"])
        if shard["file"] not in self._loaded:
            self._loaded[shard["file"]] = load_file(os.path.join(self.folder, shard["file"]))
        data = self._loaded[shard["file"]]
        begin, end = data["offsets"][sequence - shard["start"] : sequence - shard["start"] + 2].tolist()
        return data["logprobs"][begin:end].float(), data["indices"][begin:end].long(), data["leftover"][begin:end]

    def batch(self, sequences: list[int], loss_mask: torch.Tensor) -> SparseTeacher:
        """A :class:`SparseTeacher` aligned with a collated batch's positions 1..T-1 (``(B, T-1, k)``): the rows of
        :meth:`flat` placed at their positions, zeros elsewhere (for losses that take labels with -100)."""
        target = loss_mask[:, 1:].bool()
        rows = self.flat(sequences, loss_mask)
        placed = []
        for field in rows:
            out = torch.zeros(*target.shape, *field.shape[1:], dtype=field.dtype)
            out[target] = field
            placed.append(out)
        return SparseTeacher(*placed)

    def flat(self, sequences: list[int], loss_mask: torch.Tensor) -> SparseTeacher:
        """The scored rows of a collated batch, row-major: a :class:`SparseTeacher` with ``(R, k)`` fields,
        R = the number of scored tokens (positions 1..T-1 of ``loss_mask``)."""
        counts = loss_mask[:, 1:].sum(1).tolist()
        parts = [self.rows(sequence) for sequence in sequences]
        for sequence, (values, _, _), count in zip(sequences, parts, counts):
            if values.shape[0] != count:
                raise ValueError(f"sequence {sequence}: the cache has {values.shape[0]} tokens, the batch {count}")
        return SparseTeacher(*(torch.cat([part[i] for part in parts]) for i in range(3)))


def cache_is_complete(folder: str, fingerprint: str) -> bool:
    """Whether ``folder`` holds a finished cache written for ``fingerprint``."""
    try:
        TeacherCache(folder, fingerprint)
    except (FileNotFoundError, ValueError):
        return False
    return True
