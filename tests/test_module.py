"""End-to-end fits of tiny models through the CLI, in this process."""

import glob
import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT, checksum, read_jsonl, run_cli, scalars, tiny_args, tiny_modules, tiny_trainer


def test_offline_fit_end_to_end(tiny_fit, tmp_path):
    root = tmp_path / "run"
    tiny_fit("--model.objective.critic_warmup_steps=0", "--model.objective.critic_trust=always")  # the surrogate from step 1
    logged = scalars(root)
    for tag in ("critic/pref_acc", "critic/loss", "critic/reward_gap", "critic/heldout_pref_acc",
                "student/pg_loss", "student/clip_frac", "student/nll_teacher", "eval/arithmetic_score",
                "eval/reversal_score", "data/buffer_pairs", "gen/tokens_per_s", "student/loss"):
        assert tag in logged, tag
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary) >= {"teacher", "student_before_warmup", "student_start", "student_final",
                            "reward_model_heldout_pref_acc"}
    assert summary["teacher"]["mean"] == 1.0
    assert [h["epoch"] for h in summary["heldout_pref_acc_per_epoch"]] == [0]
    assert summary["heldout_pref_acc_per_epoch"][0]["all"] == pytest.approx(logged["critic/heldout_pref_acc"][-1])
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert (root / "student" / "config.json").exists()
    groups = read_jsonl(root / "buffer" / "iter_0000.jsonl")
    assert len(groups) == 16 and all(len(g["samples"]) == 2 for g in groups)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])  # rebuilt, not stored


def test_each_optimizer_step_touches_only_its_own_parameters(tmp_path):
    class StepAudit(Callback):
        def __init__(self):
            self.events = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = (checksum(module.student), checksum(module.critic))

        def on_before_optimizer_step(self, trainer, module, optimizer):
            owner = "critic" if optimizer.param_groups[0]["params"][0] is next(module.critic.parameters()) else "student"
            student_grads = [p.grad for p in module.student.parameters()]
            critic_grads = [p.grad for p in module.critic.parameters()]
            self.events.append((owner, any(g is not None for g in student_grads), any(g is not None for g in critic_grads),
                                checksum(module.student), checksum(module.critic)))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.after = (checksum(module.student), checksum(module.critic))

    audit = StepAudit()
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(tmp_path / "run", [audit], max_steps=2).fit(module, datamodule)
    (c_owner, c_sgrad, c_cgrad, c_s, c_c), (s_owner, s_sgrad, s_cgrad, s_s, s_c) = audit.events[:2]
    assert (c_owner, c_sgrad, c_cgrad) == ("critic", False, True)  # critic step: no student gradient
    assert (c_s, c_c) == audit.before  # nothing has moved before the critic's step
    assert (s_owner, s_sgrad, s_cgrad) == ("student", True, False)  # student step: no critic gradient
    assert s_s == audit.before[0] and s_c != audit.before[1]  # the critic step moved only the critic
    assert audit.after[0] != s_s and audit.after[1] == s_c  # the student step moved only the student


def test_online_fit_regenerates_samples_from_the_updated_student(tmp_path, monkeypatch):
    import pbkd_lightning.objectives.base as objective_code  # what Objective.rollout calls

    sampled_from = []
    real_sample = objective_code.sample_rollouts

    def recording_sample(model, *args, **kwargs):
        sampled_from.append(checksum(model))
        return real_sample(model, *args, **kwargs)

    class EpochEnd(Callback):
        def __init__(self):
            self.students = []

        def on_train_epoch_end(self, trainer, module):
            self.students.append(checksum(module.student))

    monkeypatch.setattr(objective_code, "sample_rollouts", recording_sample)
    epoch_end = EpochEnd()
    module, datamodule = tiny_modules(tmp_path, online=True, prompts_per_iteration=12)
    tiny_trainer(tmp_path / "run", [epoch_end], online=True, max_epochs=2).fit(module, datamodule)

    assert len(sampled_from) == 2
    assert sampled_from[1] == pytest.approx(epoch_end.students[0])  # iteration 1 samples the student after epoch 0
    assert sampled_from[1] != pytest.approx(sampled_from[0])
    iterations = [read_jsonl(tmp_path / "run" / "buffer" / f"iter_{i:04d}.jsonl") for i in range(2)]
    assert [g["samples"] for g in iterations[0]] != [g["samples"] for g in iterations[1]]
    assert all(g["iteration"] == i for i in range(2) for g in iterations[i])
    assert [len(it) for it in iterations] == [12, 12]  # a fresh draw of 12 of the 16 prompts each iteration
    assert [g["prompt"] for g in iterations[0]] != [g["prompt"] for g in iterations[1]]
    pairs = scalars(tmp_path / "run", "lightning_logs")["data/buffer_pairs"]
    assert len(pairs) == 2 and pairs[1] > pairs[0]  # the buffer grows every iteration


class Killed(Exception):
    pass


def test_kill_and_resume_continues_with_the_same_buffer(tmp_path):
    class KillInSecondEpoch(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise Killed()

    root = tmp_path / "run"
    module, datamodule = tiny_modules(tmp_path, online=True)
    with pytest.raises(Killed):
        tiny_trainer(root, [KillInSecondEpoch()], online=True, max_epochs=3).fit(module, datamodule)
    buffer = {p.name: p.read_text() for p in (root / "buffer").iterdir()}
    assert sorted(buffer) == ["iter_0000.jsonl", "iter_0001.jsonl"]
    checkpoint = root / "lightning_logs" / "version_0" / "checkpoints"
    [last] = list(checkpoint.iterdir())  # written at the end of epoch 0

    module, datamodule = tiny_modules(tmp_path, online=True)
    trainer = tiny_trainer(root, online=True, max_epochs=3)
    trainer.fit(module, datamodule, ckpt_path=str(last))
    assert trainer.current_epoch == 3
    after = {p.name: p.read_text() for p in (root / "buffer").iterdir()}
    assert sorted(after) == ["iter_0000.jsonl", "iter_0001.jsonl", "iter_0002.jsonl"]
    assert all(after[name] == text for name, text in buffer.items())  # resumed with the same pairs


def test_a_fresh_run_in_the_same_folder_does_not_reuse_another_runs_pairs(tmp_path):
    root = tmp_path / "run"
    (root / "buffer").mkdir(parents=True)
    stale = root / "buffer" / "iter_0000.jsonl"
    stale.write_text('{"prompt": "stale", "teacher": "t", "samples": ["s", "s"], "preferences": [1, 1]}\n')
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(root, max_steps=1).fit(module, datamodule)
    assert "stale" not in stale.read_text()


def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path):
    from pbkd_lightning.objectives import BlackBoxPbKD

    class NaNOnFirstStudentStep(BlackBoxPbKD):
        calls = 0

        def student_loss(self, players, batch, share, critic_trust=None):
            terms = super().student_loss(players, batch, share, critic_trust)
            NaNOnFirstStudentStep.calls += 1
            if NaNOnFirstStudentStep.calls == 1:
                terms["loss"] = terms["loss"] * float("nan")
            return terms

    class Watch(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.student_before = checksum(module.student)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.student_after_first = checksum(module.student)

    watch = Watch()
    module, datamodule = tiny_modules(tmp_path, objective=NaNOnFirstStudentStep(critic_warmup_steps=0))
    tiny_trainer(tmp_path / "run", [watch], max_steps=4).fit(module, datamodule)
    assert module.nonfinite_skips == {"student": 1, "critic": 0}
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    logged = scalars(tmp_path / "run", "lightning_logs")
    assert logged["student/nonfinite_skips"][-1] == 1.0


def test_long_prompts_are_truncated_and_counted_or_rejected(tmp_path):
    from pbkd_lightning.data import DataError

    module, datamodule = tiny_modules(tmp_path, max_prompt_tokens=30)  # arithmetic prompts are longer
    tiny_trainer(tmp_path / "run", max_steps=1).fit(module, datamodule)
    truncated = datamodule.stats["data/truncated_prompts"]
    assert truncated == sum(len(r["prompt"]) > 30 for r in datamodule.train_records + datamodule.val_records) > 0
    assert scalars(tmp_path / "run", "lightning_logs")["data/truncated_prompts"] == [truncated]

    module, datamodule = tiny_modules(tmp_path, max_prompt_tokens=30, truncation="error")
    with pytest.raises(DataError, match="longer than `data.max_prompt_tokens` \\(30\\)"):
        tiny_trainer(tmp_path / "run2", max_steps=1).fit(module, datamodule)


def test_heldout_prompts_are_never_trained_on(tmp_path):
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text("".join(f'{{"prompt": "p{i}", "reference": "r{i}"}}\n' for i in range(6)))
    val.write_text('{"prompt": "p1", "reference": "r1"}\n{"prompt": "q", "reference": "r"}\n')
    module, datamodule = tiny_modules(tmp_path, train_file=str(train), val_file=str(val))
    datamodule.setup("fit")
    assert [r["prompt"] for r in datamodule.val_records] == ["q"]
    module, datamodule = tiny_modules(tmp_path)
    datamodule.setup("fit")
    assert not {r["prompt"] for r in datamodule.train_records} & {r["prompt"] for r in datamodule.val_records}


def test_seqkd_baseline_trains_without_critic_or_samples(tiny_fit, tmp_path):
    cli = tiny_fit(config="configs/baselines/seqkd.yaml")
    assert cli.model.critic is None and cli.model.reference is None
    logged = scalars(tmp_path / "run")
    assert "student/nll_teacher" in logged and "eval/arithmetic_score" in logged
    assert not any(tag.startswith("critic/") for tag in logged)
    assert not (tmp_path / "run" / "buffer" / "iter_0000.jsonl").exists()


def test_validate_and_predict_from_a_checkpoint(tiny_fit, tmp_path, capsys):
    tiny_fit("--model.objective.critic_warmup_steps=0")
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    args = tiny_args(tmp_path / "run")[2:]  # the same settings, without a second --config
    validate = run_cli("validate", "--config", f"{ROOT}/configs/blackbox.yaml", *args, f"--ckpt_path={ckpt}")
    fitted = torch.load(ckpt, weights_only=True)["state_dict"]
    loaded = validate.model.student.state_dict()
    assert all(torch.equal(fitted[f"student.{k}"], v) for k, v in loaded.items())
    assert "eval/arithmetic_score" in validate.trainer.callback_metrics
    tested = run_cli("test", "--config", f"{ROOT}/configs/blackbox.yaml", *args, f"--ckpt_path={ckpt}")
    assert "critic/heldout_pref_acc" in tested.trainer.callback_metrics
    predict = run_cli("predict", "--config", f"{ROOT}/configs/blackbox.yaml", *args, f"--ckpt_path={ckpt}")
    assert predict.trainer.predict_loop.predictions  # one list of {prompt, response} per batch


def test_black_box_teacher_with_another_tokenizer_exchanges_text_only(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pbkd_lightning.data import HFModelTeacher

    # A teacher whose token ids mean other characters than the student's.
    characters = sorted(set("0123456789+-=.#\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,?:"), reverse=True)
    vocab = {t: i for i, t in enumerate(["<unk>", "</s>", "<pad>"] + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2, pad_token_id=2, eos_token_id=1))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")

    module, datamodule = tiny_modules(tmp_path, teacher=HFModelTeacher(str(tmp_path / "teacher"), max_new_tokens=8))
    tiny_trainer(tmp_path / "run", max_steps=1).fit(module, datamodule)
    expected = HFModelTeacher(str(tmp_path / "teacher"), max_new_tokens=8).respond(datamodule.train_records)
    assert [r["teacher"] for r in datamodule.train_records] == expected  # the teacher's text, decoded by its tokenizer
    [cached] = list((tmp_path / "run" / "teacher").iterdir())  # train and held-out responses, one request
    assert len(cached.read_text().splitlines()) == len(datamodule.train_records) + len(datamodule.val_records)


@pytest.mark.parametrize(
    "critic, objective_args, data_args, expected_tag",
    [
        ({"kind": "scalar", "pooling": "last"}, {}, {}, "critic/reward_gap"),
        ({"kind": "scalar", "pooling": "mean", "init": "scratch"}, {}, {}, "critic/reward_gap"),
        ({"kind": "implicit"}, {"kl_coef": 0.1, "normalize_advantages": True}, {}, "student/kl_ref"),
        ({"kind": "implicit"}, {}, {"labeler": "verifier"}, "critic/bt"),
    ],
)
def test_critic_and_objective_variants_train(tmp_path, critic, objective_args, data_args, expected_tag):
    from pbkd_lightning.models.critic import CriticConfig
    from pbkd_lightning.objectives import BlackBoxPbKD

    module, datamodule = tiny_modules(tmp_path, objective=BlackBoxPbKD(critic_warmup_steps=0, **objective_args), **data_args)
    module.critic_config = CriticConfig(**critic)
    tiny_trainer(tmp_path / "run", max_steps=2).fit(module, datamodule)
    logged = scalars(tmp_path / "run", "lightning_logs")
    assert expected_tag in logged and all(torch.isfinite(torch.tensor(v)).all() for v in logged.values())
    assert type(module.critic).__name__ == ("ScalarReward" if critic["kind"] == "scalar" else "ImplicitReward")


def test_eight_bit_optimizers_keep_uint8_states_and_resume(tiny_fit, tmp_path):
    cli = tiny_fit("--model.optimizer=adamw8bit", "--model.objective.critic_warmup_steps=0", "--model.student.hidden=64")
    import bitsandbytes as bnb

    optimizers = cli.model.optimizers()
    assert all(isinstance(o.optimizer, bnb.optim.AdamW8bit) for o in optimizers)
    embedding = cli.model.student.get_input_embeddings().weight  # ≥ 4,096 elements: 8-bit states
    assert optimizers[-1].optimizer.state[embedding]["state1"].dtype == torch.uint8
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = run_cli("fit", *tiny_args(tmp_path / "run", "--model.optimizer=adamw8bit", "--model.objective.critic_warmup_steps=0",
                                        "--model.student.hidden=64", "--trainer.max_epochs=2"), f"--ckpt_path={ckpt}")
    assert resumed.trainer.current_epoch == 2


def test_gradient_checkpointing_is_a_switch_for_student_and_critic(tiny_fit):
    cli = tiny_fit("--model.student.gradient_checkpointing=true", "--model.objective.critic_warmup_steps=0")
    assert cli.model.student.is_gradient_checkpointing and cli.model.critic.lm.is_gradient_checkpointing
    assert cli.model.summary["student_final"]["mean"] >= 0.0


@pytest.mark.parametrize("config", ["configs/blackbox.yaml", "configs/baselines/fkl.yaml"])
def test_bf16_mixed_precision_trains(tmp_path, config):
    extra = ["--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2",
             "--model.teacher.train_steps=5", f"--model.teacher.cache_dir={tmp_path}/cache"] if "fkl" in config else []
    cli = run_cli("fit", *tiny_args(tmp_path / "run", "--trainer.precision=bf16-mixed", *extra, config=config))
    assert cli.trainer.precision == "bf16-mixed"
    assert all(v == v for v in cli.model.summary["student_final"].values())  # finite, no NaN
    assert cli.model.nonfinite_skips == {"student": 0, "critic": 0}


def test_lora_student_trains_its_adapter_and_saves_adapter_and_merged_weights(tiny_fit, tmp_path):
    from transformers import AutoModelForCausalLM

    cli = tiny_fit("--model.student.lora.r=4", "--model.objective.critic_warmup_steps=0")
    student = cli.model.student
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in n for n, p in cli.model.critic.named_parameters() if p.requires_grad)
    folder = tmp_path / "run" / "student"
    assert (folder / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no PEFT needed
    ids = cli.model.tokenizer("Reverse: cat dog\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, student.eval()(input_ids=ids).logits, atol=1e-4)
    from pbkd_lightning.export import export

    export(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, merged(ids).logits, atol=1e-5)
    again = tiny_fit("--model.student.lora.r=4", "--model.objective.critic_warmup_steps=0",
                     f"--model.warmup.cache_dir={tmp_path / 'run' / 'cache'}", root=tmp_path / "again")
    assert again.model.summary["student_start"] == cli.model.summary["student_start"]  # the cached adapter warm-up


def test_lora_without_peft_names_the_extra(monkeypatch):
    import sys

    from pbkd_lightning.models.loading import LoraSpec, ModelSpec, load_causal_lm

    monkeypatch.setitem(sys.modules, "peft", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lora\]'"):
        load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, lora=LoraSpec(r=4)))


def test_gradient_checkpointing_reuses_the_cached_warm_up(tiny_fit, tmp_path):
    first = tiny_fit("--model.objective.critic_warmup_steps=0")
    second = tiny_fit("--model.objective.critic_warmup_steps=0", "--model.student.gradient_checkpointing=true",
                      f"--model.warmup.cache_dir={tmp_path / 'run' / 'cache'}", root=tmp_path / "again")
    assert len(list((tmp_path / "run" / "cache").glob("student-sft-*"))) == 1  # one warm-up for both
    assert second.model.summary["student_start"] == first.model.summary["student_start"]


def test_a_resumed_offline_run_keeps_the_old_logprobs_of_the_student_that_sampled(tmp_path):
    """Defect 6 of the rollouts issue: log π_old lives in the buffer with the samples, so a run resumed from a
    checkpoint optimises the same surrogate as an uninterrupted one (it used to recompute π_old from the
    restored, already trained student)."""
    from pbkd_lightning.sequences import gather_logprobs

    class OldLogprobs(Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            samples = batch["student"].samples
            for row, values in enumerate(gather_logprobs(batch["student"].old_logprobs, samples)):
                self.seen[tuple(samples.input_ids[row][samples.attention_mask[row].bool()].tolist())] = values

    root = tmp_path / "run"
    first = OldLogprobs()
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(root, [first], max_epochs=1).fit(module, datamodule)
    [last] = list((root / "lightning_logs" / "version_0" / "checkpoints").iterdir())
    resumed = OldLogprobs()
    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(root, [resumed], max_epochs=2).fit(module, datamodule, ckpt_path=str(last))
    assert resumed.seen and set(resumed.seen) == set(first.seen)  # offline: the same samples, read back from the buffer
    for key, values in resumed.seen.items():
        assert values == pytest.approx(first.seen[key], abs=1e-6)
