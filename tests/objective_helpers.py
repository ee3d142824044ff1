"""Tiny players and typed batches for objective unit tests (imported by tests and by their spawned processes)."""

import copy

import torch

from pbkd_lightning.data.collate import CriticCollate, StudentCollate
from pbkd_lightning.data.generation import GenerationConfig
from pbkd_lightning.models.critic import ImplicitReward
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm
from pbkd_lightning.objectives import XKD, BlackBoxPbKD, DivergenceKD, MiniLLM, SeqKD, WhiteBoxPbKD
from pbkd_lightning.objectives.base import accumulate_gradients
from pbkd_lightning.players import Players
from pbkd_lightning.sequences import Encoder
from pbkd_lightning.tasks import get_task

OBJECTIVES = {
    "seqkd": lambda: SeqKD(),
    "forward_kl": lambda: DivergenceKD("forward_kl"),
    "gkd_on_policy": lambda: DivergenceKD("generalized_jsd", on_policy_fraction=1.0),
    "blackbox_pbkd": lambda: BlackBoxPbKD(kl_coef=0.1, critic_warmup_steps=0),
    "minillm": lambda: MiniLLM(lm_coef=0.5),
    "whitebox_pbkd": lambda: WhiteBoxPbKD(critic_warmup_steps=0),
    "xkd": lambda: XKD(),
}


def tiny_players(objective, sampling: GenerationConfig | None = None) -> Players:
    """A 1-layer student, a frozen teacher and reference of the same tokenizer, and the objective's critic
    (black-box PbKD's implicit reward model from the student; heads randomised so Q is not 0)."""
    student, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=0))
    teacher, _ = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=1))
    teacher.eval().requires_grad_(False)
    reference = copy.deepcopy(student).eval().requires_grad_(False)
    sampling = sampling or GenerationConfig(max_new_tokens=8)
    vocabulary = student.config.vocab_size if objective.needs_teacher_logits else None
    players = Players(student, tokenizer, sampling, Encoder(tokenizer, 48, 8), 16, reference=reference, teacher=teacher,
                      implicit_reference=reference, vocabulary=vocabulary)
    generator = torch.Generator().manual_seed(7)
    critic = objective.build_critic(players)
    if critic is None:
        critic = ImplicitReward(copy.deepcopy(student).requires_grad_(True))
    else:
        for parameter in critic.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    players.critic, players.critic_tokenizer = critic, tokenizer
    return players


def records(n: int = 4) -> list[dict]:
    half = n // 2
    return get_task("arithmetic").generate(half, seed=3) + get_task("reversal").generate(n - half, seed=4)


def student_batch(players, objective, k: int = 2, n: int = 4, seed: int = 0):
    """A StudentBatch of n prompts (teacher = the task's reference) with K rollouts each when the objective samples."""
    torch.manual_seed(seed)
    items = [{"prompt": r["prompt"], "teacher": r["reference"], "row": None} for r in records(n)]
    if objective.needs_samples:
        rollouts, _ = objective.rollout(players, [i["prompt"] for i in items], k, players.sampling, 16, 48)
        for item, group in zip(items, rollouts):
            item["rollouts"] = group
    batch = StudentCollate(players.encoder)(items)
    return objective.prepare_student_batch(players, batch)


def pair_batch(players, n: int = 4, seed: int = 0):
    """Teacher pairs with every label (+1, −1, 0) and sample-vs-sample pairs, as the buffer makes them."""
    torch.manual_seed(seed)
    recs = records(n)
    rollouts, _ = BlackBoxPbKD().rollout(players, [r["prompt"] for r in recs], 2, players.sampling, 16, 48)
    items = []
    for index, (record, group) in enumerate(zip(recs, rollouts)):
        for j, rollout in enumerate(group):
            items.append({"prompt": record["prompt"], "chosen": record["reference"], "rejected": rollout,
                          "preference": (1, -1, 0)[(index + j) % 3], "teacher_pair": True, "row": None})
        items.append({"prompt": record["prompt"], "chosen": group[0], "rejected": group[1], "preference": 1,
                      "teacher_pair": False, "row": None})
    return CriticCollate(players.encoder)(items)


def gradient(model, compute, batch, micro_batch_size, reduce_sum=None, world_size=1) -> torch.Tensor:
    """The model's flat gradient after one accumulated step, as the module takes it."""
    model.zero_grad(set_to_none=True)
    accumulate_gradients(compute, batch, micro_batch_size, lambda loss: loss.backward(), reduce_sum, world_size)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def step_gradient(name: str, role: str, micro_batch_size, part=None, reduce_sum=None, world_size=1):
    """The student's (``role="student"``) or critic's gradient for objective ``name`` on its fixed tiny batch; ``part``
    keeps those prompts (or pairs) only, as one data-parallel rank would see them."""
    torch.manual_seed(0)
    objective = OBJECTIVES[name]()
    players = tiny_players(objective)
    if role == "student":
        batch = student_batch(players, objective)
        compute = lambda piece, share: objective.student_loss(players, piece, share, 0.95)  # noqa: E731
        model = players.student
        players.student.eval()  # on-policy steps run with dropout off
    else:
        batch = pair_batch(players) if objective.critic_uses_pairs else student_batch(players, objective)
        compute = lambda piece, share: objective.critic_loss(players, piece, share)  # noqa: E731
        model = players.critic
    if part is not None:
        batch = batch.select(part)
    return gradient(model, compute, batch, micro_batch_size, reduce_sum, world_size)
