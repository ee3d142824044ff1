"""Black-box PbKD's quality switches (issue 8): critic schedule, buffer weighting, critic trust, labels,
sample-vs-sample pairs, a reward model initialised from the teacher, and the held-out ranking metric."""

import pytest
import torch
from lightning.pytorch import Callback

from conftest import run_cli, scalars, tiny_args, tiny_modules, tiny_trainer
from pbkd_lightning.data.labelers import label_pair, sample_pairs
from pbkd_lightning.objectives import BlackBoxPbKD, WhiteBoxPbKD


def test_both_labeler_lets_the_verifier_decide_and_the_teacher_break_its_ties():
    record = {"task": "arithmetic", "reference": "#### 7"}
    assert label_pair("both", record, "#### 7", "#### 9") == 1
    assert label_pair("both", record, "#### 9", "x #### 7") == -1  # a right student beats a wrong teacher
    assert label_pair("both", record, "#### 8", "#### 9") == 1  # both wrong: the paper's rule
    assert label_pair("both", record, "#### 7", "#### 7") == 0
    with pytest.raises(ValueError, match="unknown labeler"):
        label_pair("oracle", record, "a", "b")


def test_sample_pairs_rank_distinct_samples_the_verifier_tells_apart():
    record = {"task": "arithmetic", "reference": "#### 7"}
    pairs = sample_pairs(record, ["#### 9", "a #### 7", "#### 9 ", "#### 8", "b #### 7"])
    # 4 distinct texts: two right, two wrong; the right ones tie with each other, as do the wrong ones
    assert sorted(pairs) == sorted([("a #### 7", "#### 9"), ("a #### 7", "#### 8"), ("b #### 7", "#### 9"), ("b #### 7", "#### 8")])


def test_trust_gates_or_scales_the_surrogate_by_held_out_accuracy():
    assert BlackBoxPbKD().trust(None) == 1.0 and BlackBoxPbKD().trust(0.3) == 1.0
    gate = BlackBoxPbKD(critic_trust="gate", trust_threshold=0.8)
    assert [gate.trust(a) for a in (None, 0.79, 0.8, 0.95)] == [0.0, 0.0, 1.0, 1.0]
    scale = BlackBoxPbKD(critic_trust="scale", trust_threshold=0.9)
    assert [scale.trust(a) for a in (None, 0.4, 0.7, 0.9, 0.99)] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="trust_threshold"):
        BlackBoxPbKD(trust_threshold=0.5)
    with pytest.raises(ValueError, match="critic_trust"):
        BlackBoxPbKD(critic_trust="sometimes")


def test_several_critic_steps_per_student_step(tmp_path):
    module, datamodule = tiny_modules(tmp_path, objective=BlackBoxPbKD(critic_warmup_steps=0, critic_steps=3))
    trainer = tiny_trainer(tmp_path / "run", limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule)
    critic_scheduler, student_scheduler = module.lr_schedulers()
    assert (critic_scheduler.last_epoch, student_scheduler.last_epoch) == (6, 2)
    [batches] = [b for _, b in zip(range(1), trainer.train_dataloader["critic"])]
    assert isinstance(batches, list) and len(batches) == 3
    assert all(b.preference.shape == (8,) for b in batches)  # each critic step sees critic_batch_size pairs


def test_old_pairs_are_drawn_less_often_with_buffer_decay(tmp_path):
    class Weights(Callback):
        seen = {}

        def on_train_epoch_start(self, trainer, module):
            sampler = trainer.train_dataloader["critic"].sampler
            pairs = trainer.train_dataloader["critic"].dataset
            self.seen[trainer.current_epoch] = sorted({(p["iteration"], float(w)) for p, w in zip(pairs, sampler.weights)})

    module, datamodule = tiny_modules(tmp_path, online=True, buffer_decay=0.25)
    tiny_trainer(tmp_path / "run", callbacks=[Weights()], online=True, max_epochs=2, limit_val_batches=0).fit(module, datamodule)
    assert Weights.seen == {0: [(0, 1.0)], 1: [(0, 0.25), (1, 1.0)]}
    with pytest.raises(ValueError, match="buffer_decay"):
        tiny_modules(tmp_path, buffer_decay=0.0)


def test_gated_student_waits_for_a_trusted_critic_and_the_trust_survives_resume(tmp_path):
    args = ["--model.objective.critic_warmup_steps=0", "--model.objective.critic_trust=gate",
            "--model.objective.trust_threshold=0.6", "--data.sample_pairs=true"]
    cli = run_cli("fit", *tiny_args(tmp_path / "run", *args))
    logged = scalars(tmp_path / "run", version=0)
    assert set(logged["student/critic_trust"]) == {0.0}  # nothing measured before the first validation: chance
    assert "student/pg_loss" not in logged and "student/nll_teacher" in logged  # the anchor alone moved the student
    accuracy = cli.model.critic_heldout_acc
    assert accuracy == pytest.approx(logged["critic/heldout_pref_acc"][-1])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["critic_heldout_acc"] == accuracy
    resumed = run_cli("fit", *tiny_args(tmp_path / "run", *args, "--trainer.max_epochs=2"), f"--ckpt_path={ckpt}")
    assert set(scalars(tmp_path / "run", version=1)["student/critic_trust"]) == {float(accuracy >= 0.6)}
    assert resumed.model.critic_heldout_acc is not None


def test_held_out_ranking_accuracy_orders_a_prompts_samples_as_the_verifier(tmp_path):
    """The student's advantages compare a prompt's samples with each other: is the reward model's order the verifier's?"""
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0).fit(module, datamodule)
    records = datamodule.val_records[:4]
    samples = [[r["teacher"], "zz", r["teacher"] + "9"] for r in records]  # right, wrong, (almost always) wrong
    module.heldout.update(records, samples, "teacher", lambda texts: module.score_texts(records, texts))
    encoder = datamodule.encoder(module.critic_tokenizer)
    with torch.no_grad():
        expected = []
        for record, group in zip(records, samples):
            for better, worse in sample_pairs(record, group):
                scores = module.objective.sequence_reward(module.players, encoder.batch([record["prompt"]] * 2, [better, worse]).to(module.device))
                expected.append(float(scores[0] > scores[1]))
    assert len(expected) >= 2 * len(records)
    assert float(module.heldout.ranking.compute()) == pytest.approx(sum(expected) / len(expected))


def test_sample_pairs_reach_the_reward_model_and_not_a_q_head(tmp_path):
    module, datamodule = tiny_modules(tmp_path, sample_pairs=True, samples_per_prompt=4)
    trainer = tiny_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule)
    from pbkd_lightning.sequences import Rollout

    record = next(r for r in datamodule.train_records if r["task"] == "arithmetic")
    right, wrong = (Rollout(text, [5, 6], [-1.0, -1.0, -1.0], True) for text in (record["reference"], "#### -1"))
    datamodule._groups = [{**record, "rollouts": [wrong, right], "preferences": [1, 0], "iteration": 0}]
    pairs = datamodule.critic_pairs(0)
    among_samples = [p for p in pairs if not p["teacher_pair"]]
    # the verifier's better sample is chosen, both sides as sampled (their tokens, not re-tokenised text)
    assert [(p["chosen"], p["rejected"], p["preference"], p["row"]) for p in among_samples] == [(right, wrong, 1, None)]
    assert [p["rejected"] for p in pairs if p["teacher_pair"]] == [wrong]  # the identical text carries no preference
    from pbkd_lightning.models.teacher import TeacherModel

    from pbkd_lightning.models import ModelSpec
    from pbkd_lightning.module import DistillationModule

    _, datamodule = tiny_modules(tmp_path, sample_pairs=True)
    from pbkd_lightning.models.warmup import WarmupConfig

    module = DistillationModule(WhiteBoxPbKD(critic_warmup_steps=0), student=ModelSpec(layers=1, hidden=32, heads=2),
                                warmup=WarmupConfig(steps=0),
                                teacher=TeacherModel(layers=1, hidden=32, heads=2, train_steps=5, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="sample_pairs"):
        tiny_trainer(tmp_path / "whitebox", max_steps=1, limit_val_batches=0).fit(module, datamodule)


TINY_TEACHER = ["--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2", "--model.teacher.train_steps=5"]


def test_reward_model_initialised_from_the_teacher_model(tmp_path):
    root = tmp_path / "run"
    cli = run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--model.critic.init=teacher",
                                    "--model.objective.critic_warmup_steps=0", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"))
    module = cli.model
    assert module.reference is None  # the implicit reward's reference is the frozen teacher, not a student copy
    assert module.critic.lm.config.hidden_size == 64 and module.student.config.hidden_size == 32
    assert module.critic.lm.config.num_hidden_layers == 1 and module.critic_tokenizer is module.teacher_tokenizer
    teacher_weights = dict(module.teacher.named_parameters())
    moved = [n for n, p in module.critic.lm.named_parameters() if not torch.equal(p, teacher_weights[n])]
    assert moved and all(p.requires_grad for p in module.critic.lm.parameters())  # a trained copy; the teacher is untouched
    assert not any(p.requires_grad for p in module.teacher.parameters())
    with pytest.raises(ValueError, match="critic.init: teacher"):  # no teacher model to start from
        run_cli("fit", *tiny_args(tmp_path / "none", "--model.critic.init=teacher"))
