"""The Lightning module (pbkd_lightning/module.py) end to end: fits of tiny models, through the CLI or the Python
API, in this process, for every objective: what each logs, steps, checkpoints and resumes, and what it refuses."""

import glob
import json
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT, TINY_TEACHER, checksum, read_jsonl, run_cli, scalar_steps, scalars, tiny_args, tiny_modules, tiny_trainer, whitebox_fit

from pbkd_lightning.objectives import BlackBoxPbKD, WhiteBoxPbKD
from pbkd_lightning.objectives.base import Share

pytestmark = pytest.mark.slow  # every test here fits (or needs a fitted run)


# ---------------------------------------------------------------------------- black-box PbKD and what every fit shares
def test_offline_fit_end_to_end(tiny_fit, tmp_path):
    root = tmp_path / "run"
    tiny_fit("--model.objective.critic_warmup_steps=0", "--model.objective.critic_trust=always",  # the surrogate from step 1
             "--data.tasks=[arithmetic,reversal,distinct]", "--data.train_size=6")  # the built-in tasks: 18 prompts
    logged = scalars(root)
    for tag in ("critic/pref_acc", "critic/loss", "critic/reward_gap", "critic/heldout_pref_acc",
                "student/pg_loss", "student/clip_frac", "student/nll_teacher", "eval/arithmetic_score",
                "eval/reversal_score", "eval/distinct_score", "data/buffer_pairs", "gen/tokens_per_s", "student/loss"):
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
    assert len(groups) == 18 and all(len(g["samples"]) == 2 for g in groups)
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
    module, datamodule = tiny_modules(tmp_path, online=True, prompts_per_epoch=12)
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


def test_an_online_runs_first_iteration_does_not_depend_on_how_many_follow(tmp_path):
    """What make bench's iterations section relies on: it reads n iterations off a longer online run's epoch n."""
    logged = {}
    for epochs in (1, 2):
        root = tmp_path / f"epochs{epochs}"
        run_cli("fit", *tiny_args(root, "--config", os.path.join(ROOT, "configs/online.yaml"), f"--trainer.default_root_dir={root}",
                                  f"--trainer.max_epochs={epochs}",
                                  "--data.prompts_per_epoch=4", "--model.objective.critic_warmup_steps=0"))
        logged[epochs] = scalars(root)
        logged[epochs]["buffer"] = read_jsonl(root / "buffer" / "iter_0000.jsonl")
    timing = {tag for tag in logged[1] if tag.endswith("per_s")}
    # ... and what holds it in the bench's full size: a constant learning rate, no prompt window repeating in 5 epochs
    from benchmarks.experiments import SIZES, experiments
    from benchmarks.runner import method_config

    [online] = [e for e in experiments(SIZES["full"]) if e.section == "iterations" and e.tags["iterations"]]
    config = method_config(online)
    assert config["model"]["student_optimizer"]["schedule"] == config["model"]["critic_optimizer"]["schedule"] == "constant"
    data = config["data"]
    assert data["online"] and online.epochs * data["prompts_per_epoch"] <= data["train_size"] * len(data["tasks"])
    assert logged[1]["buffer"] == logged[2]["buffer"] and len(logged[1]) > 10
    assert {tag for tag, values in logged[2].items() if len(values) > len(logged[1].get(tag, []))} >= {"eval/arithmetic_score", "critic/bt"}
    for tag, values in logged[1].items():
        if tag not in timing:
            assert logged[2][tag][: len(values)] == values, tag


class EpochPrompts(Callback):
    """The training prompts of each epoch (the student loader's items)."""

    def __init__(self):
        self.prompts = []

    def on_train_epoch_start(self, trainer, module):
        loader = getattr(trainer.train_dataloader, "iterables", trainer.train_dataloader)
        loader = loader["student"] if isinstance(loader, dict) else loader
        self.prompts.append(sorted(item["prompt"] for item in loader.dataset))


def test_every_epoch_draws_new_prompts_from_the_pool(tmp_path):
    from pbkd_lightning.objectives import SeqKD

    seen = EpochPrompts()
    module, datamodule = tiny_modules(tmp_path, SeqKD(), prompts_per_epoch=6, train_size=6)  # a pool of 12 (two tasks)
    tiny_trainer(tmp_path / "run", [seen], online=True, max_epochs=3).fit(module, datamodule)
    first, second, third = (set(p) for p in seen.prompts)
    assert len(first) == len(second) == 6 and not first & second  # no prompt repeats before the pool is used up
    assert third == first  # then the same shuffled order again
    pool = {r["prompt"] for r in datamodule.train_records}
    assert first | second == pool and not pool & {r["prompt"] for r in datamodule.val_records}

    module, datamodule = tiny_modules(tmp_path, SeqKD(), prompts_per_epoch=6, train_size=6)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs: 1"):
        tiny_trainer(tmp_path / "other", max_epochs=1).fit(module, datamodule)


def test_offline_samples_every_epochs_prompts_once_from_the_starting_student(tmp_path, monkeypatch):
    import pbkd_lightning.objectives.base as objective_code  # what Objective.rollout calls

    calls = []
    real = objective_code.sample_rollouts
    monkeypatch.setattr(objective_code, "sample_rollouts", lambda model, tokenizer, prompts, *a, **k: (
        calls.append((checksum(model), list(prompts))), real(model, tokenizer, prompts, *a, **k))[1])
    seen = EpochPrompts()
    module, datamodule = tiny_modules(tmp_path, prompts_per_epoch=4, train_size=6)
    tiny_trainer(tmp_path / "run", [seen], online=True, max_epochs=2).fit(module, datamodule)
    assert len(calls) == 1 and len(calls[0][1]) == 8  # one pass, before the student moved, for both epochs' prompts
    [buffered] = [read_jsonl(tmp_path / "run" / "buffer" / "iter_0000.jsonl")]
    assert sorted(g["prompt"] for g in buffered) == sorted(seen.prompts[0] + seen.prompts[1])
    assert not set(seen.prompts[0]) & set(seen.prompts[1])


def test_offline_sampling_bounded_by_max_steps_covers_every_epoch_it_runs(tmp_path):
    seen = EpochPrompts()
    module, datamodule = tiny_modules(tmp_path, prompts_per_epoch=4, train_size=6)
    tiny_trainer(tmp_path / "run", [seen], online=True, max_epochs=None, max_steps=6).fit(module, datamodule)
    buffered = {g["prompt"] for g in read_jsonl(tmp_path / "run" / "buffer" / "iter_0000.jsonl")}
    assert len(seen.prompts) >= 2 and all(set(prompts) <= buffered for prompts in seen.prompts)


class StudentPrompts(Callback):
    """The prompts of every student batch, in order."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((batch["student"] if isinstance(batch, dict) else batch).prompts)


def test_every_method_sees_the_same_student_batches_as_seqkd_with_the_same_seed(tmp_path):
    """Pairing on the data order: the student batches come from their own seeded shuffle, so sampling, the critic's
    draws and the held-out sampling (which consume the global generator) change nothing; with the gate shut (no
    validation: no trusted reward model) black-box PbKD's student step is SeqKD's NLL on the same batches, so the
    students end equal."""
    from lightning.pytorch import seed_everything

    from pbkd_lightning.objectives import SeqKD

    students, prompts = [], []
    for name, objective in (("seqkd", SeqKD()), ("pbkd", BlackBoxPbKD(critic_warmup_steps=0, critic_trust="gate",
                                                                        trust_threshold=0.99))):
        seed_everything(3)
        seen = StudentPrompts()
        module, datamodule = tiny_modules(tmp_path, objective, prompts_per_epoch=8, train_size=6)
        tiny_trainer(tmp_path / name, [seen], online=True, max_epochs=2, check_val_every_n_epoch=3).fit(module, datamodule)
        students.append(checksum(module.student))
        prompts.append(seen.batches)
    assert prompts[0] == prompts[1] and len(prompts[0]) == 4
    assert students[0] == pytest.approx(students[1], rel=1e-6)


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


def unfused_adamw(params, **settings):
    """Stands in for `optim.fused_adamw`: torch's AdamW without the fused kernel."""
    return torch.optim.AdamW(params, **settings)


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, monkeypatch, fused):
    """Fused AdamW (the default) skips on the device: parameters, moments and step count as if the step had not
    been taken; another optimizer (here torch's unfused one) skips after a host check."""
    from pbkd_lightning import optim
    from pbkd_lightning.objectives import BlackBoxPbKD

    if not fused:
        monkeypatch.setattr(optim, "fused_adamw", unfused_adamw)

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
            if batch_idx == 0:
                self.first_before = self.student_before

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 0:
                self.student_after_first = checksum(module.student)

    watch = Watch()
    module, datamodule = tiny_modules(tmp_path, objective=NaNOnFirstStudentStep(critic_warmup_steps=0))
    tiny_trainer(tmp_path / "run", [watch], max_steps=4).fit(module, datamodule)
    assert module.nonfinite_skips == {"student": 1, "critic": 0}
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    assert watch.student_after_first == watch.first_before  # the first batch's student step was skipped
    student_optimizer = module.optimizers()[1].optimizer
    assert all(bool(group["fused"]) == fused for group in student_optimizer.param_groups)
    taken = module.training_batches_seen - 1  # a student step every batch (no critic warm-up), the first skipped
    assert taken >= 1 and {float(state["step"]) for state in student_optimizer.state.values()} == {float(taken)}
    logged = scalars(tmp_path / "run", "lightning_logs")
    assert logged["student/nonfinite_skips"][-1] == 1.0


def test_a_checkpoint_of_an_unfused_optimizer_resumes_with_the_host_check(tmp_path, monkeypatch):
    """A checkpoint written before the optimizer was fused brings its parameter groups back unfused: the step must
    not hand that optimizer `found_inf` (torch's unfused AdamW refuses it)."""
    from pbkd_lightning import optim

    root = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(optim, "fused_adamw", unfused_adamw)
        run_cli("fit", *tiny_args(root, "--model.objective.critic_warmup_steps=0", "--trainer.limit_val_batches=0"))
    cli = run_cli("fit", *tiny_args(root, "--model.objective.critic_warmup_steps=0", "--trainer.limit_val_batches=0",
                                    "--trainer.max_epochs=2"), f"--ckpt_path={root}/checkpoints/last.ckpt")
    groups = [group for optimizer in cli.model.optimizers() for group in optimizer.optimizer.param_groups]
    assert groups and not any(group["fused"] for group in groups) and cli.model.training_batches_seen == 8


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


# ---------------------------------------------------------------------------- black-box PbKD's quality switches
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
    first_run = len(logged["student/critic_trust"])
    resumed = run_cli("fit", *tiny_args(tmp_path / "run", *args, "--trainer.max_epochs=2"), f"--ckpt_path={ckpt}")
    # the resumed fit continues the same TensorBoard run: its values follow the first run's
    after = scalars(tmp_path / "run", version=0)["student/critic_trust"][first_run:]
    assert after and set(after) == {float(accuracy >= 0.6)}
    assert resumed.model.critic_heldout_acc is not None


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


# ---------------------------------------------------------------------------- white-box PbKD (MM PbKD's two players)
@pytest.fixture(scope="module")
def whitebox_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("whitebox")
    cli = whitebox_fit(root, "--model.objective.critic_warmup_steps=0")
    return root, cli


def _fixed_batches(cli):
    module, data = cli.model, cli.datamodule
    student_batch = next(iter(data.train_dataloader()["student"]))
    critic_batch = next(iter(data.train_dataloader()["critic"]))
    return module, student_batch, critic_batch


def _gap(module, objective, critic_batch):
    with torch.no_grad():
        return objective.critic_loss(module.players, critic_batch, Share.whole(critic_batch))["gap"].item()


def test_whitebox_fit_logs_its_terms_and_heldout_scores(whitebox_run):
    root, _ = whitebox_run
    logged = scalars(root)
    for tag in ("critic/gap", "critic/gap_off", "critic/gap_on", "critic/bt", "critic/l2", "critic/pref_acc",
                "critic/heldout_pref_acc", "student/policy_value_off", "student/pg_loss", "student/advantage_abs",
                "eval/arithmetic_score", "eval/reversal_score"):
        assert tag in logged, tag
    summary = json.loads((root / "summary.json").read_text())
    assert {"teacher_model", "student_final"} <= set(summary)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("critic.linear") for k in ckpt["state_dict"])
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])  # the frozen teacher is never stored


def test_critic_step_raises_the_gap_and_student_step_lowers_it(whitebox_run):
    _, cli = whitebox_run
    module, student_batch, critic_batch = _fixed_batches(cli)
    objective = module.objective
    objective.nll_coef = 0.0  # the moment-matching step alone (the NLL anchor pulls elsewhere)
    start = _gap(module, objective, critic_batch)
    critic_optimizer = torch.optim.SGD(module.critic.parameters(), lr=0.5)
    for _ in range(3):
        critic_optimizer.zero_grad()
        objective.critic_loss(module.players, critic_batch, Share.whole(critic_batch))["loss"].backward()
        critic_optimizer.step()
    critic_optimizer.zero_grad(set_to_none=True)
    after_critic = _gap(module, objective, critic_batch)
    assert after_critic > start + 1e-4
    critic_before = [p.detach().clone() for p in module.critic.parameters()]
    student_optimizer = torch.optim.SGD(module.student.parameters(), lr=0.5)
    for _ in range(3):
        student_optimizer.zero_grad()
        objective.student_loss(module.players, student_batch, Share.whole(student_batch))["loss"].backward()
        assert all(p.grad is None for p in module.critic.parameters())  # Q is frozen in the student step
        student_optimizer.step()
    assert _gap(module, objective, critic_batch) < after_critic - 1e-5
    assert all(torch.equal(a, b) for a, b in zip(critic_before, module.critic.parameters()))


def test_whitebox_validates_and_resumes_from_its_checkpoint(whitebox_run):
    root, _ = whitebox_run
    ckpt = str(root / "checkpoints" / "last.ckpt")
    args = tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--model.objective.critic_warmup_steps=0",
                     config="configs/whitebox.yaml")
    validate = run_cli("validate", *args, f"--ckpt_path={ckpt}")
    fitted = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(validate.model.critic.linear.weight, fitted["critic.linear.weight"])
    assert "critic/heldout_pref_acc" in validate.trainer.callback_metrics
    resumed = run_cli("fit", *[a for a in args if not a.startswith("--trainer.max_epochs")], "--trainer.max_epochs=2",
                      f"--ckpt_path={ckpt}")
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step > 0


def test_whitebox_online_iterations_resample_and_grow_the_buffer(tmp_path):
    root = tmp_path / "run"
    run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--model.objective.critic_warmup_steps=0",
                              config="configs/whitebox.yaml"), "--config", "configs/online.yaml", f"--trainer.default_root_dir={root}",
            "--trainer.max_epochs=2")
    assert (root / "buffer" / "iter_0001.jsonl").exists()
    pairs = scalars(root)["data/buffer_pairs"]
    assert len(pairs) == 2 and pairs[1] > pairs[0]


# ---------------------------------------------------------------------------- divergence baselines
# (each baseline config's two-step fit and its logged divergence: tests/test_configs.py)
def test_on_policy_batches_are_sampled_from_the_current_student(tmp_path, monkeypatch):
    from pbkd_lightning.players import Players

    calls = []
    original = Players.sample

    def spy(self, prompts, model=None):
        calls.append(model)
        return original(self, prompts, model)

    monkeypatch.setattr(Players, "sample", spy)
    whitebox_fit(tmp_path / "run", "--trainer.limit_train_batches=3", "--model.objective.on_policy_fraction=1.0",
                 config="configs/baselines/gkd.yaml")
    assert calls == [None, None, None]  # every batch, from the student (model=None)
    assert scalars(tmp_path / "run")["student/on_policy"] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------- teacher models
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_whitebox_trains_with_a_quantized_teacher(tmp_path, quantization):
    cli = whitebox_fit(tmp_path / "run", "--trainer.limit_train_batches=2", f"--model.teacher.quantization={quantization}",
                       config="configs/baselines/fkl.yaml")
    layer = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quantization]
    assert type(cli.model.teacher.model.layers[0].mlp.up_proj).__name__ == layer
    assert len(scalars(tmp_path / "run")["student/divergence"]) == 2


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
                                        unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "word-teacher")
    tokenizer.save_pretrained(tmp_path / "word-teacher")
    with pytest.raises(ValueError, match="needs one tokenizer.*word-teacher"):
        whitebox_fit(tmp_path / "run", f"--model.teacher.path={tmp_path / 'word-teacher'}", config="configs/baselines/fkl.yaml")
    assert not glob.glob(str(tmp_path / "run" / "checkpoints" / "*"))


def test_a_whitebox_objective_without_a_teacher_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs `model.teacher`"):
        run_cli("fit", *tiny_args(tmp_path / "run", "--model.teacher=null", config="configs/baselines/fkl.yaml"))
    assert not (tmp_path / "run" / "cache").exists()


# ---------------------------------------------------------------------------- X-KD
@pytest.fixture(scope="module")
def xkd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xkd")
    cli = run_cli("fit", *tiny_args(root, "--trainer.max_epochs=2", config="configs/xkd.yaml"))
    return root, cli


def test_xkd_gradients_reach_the_reward_head_and_the_student(xkd_run):
    _, cli = xkd_run
    module = cli.model
    batch = next(iter(cli.datamodule.train_dataloader()))
    share = Share.whole(batch)
    module.zero_grad(set_to_none=True)
    module.objective.student_loss(module.players, batch, share)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.critic.parameters())
    assert module.student.get_input_embeddings().weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)
    module.objective.critic_loss(module.players, batch, share)["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in module.critic.parameters())


def test_xkd_config_runs_two_epochs_and_logs_the_posterior(xkd_run):
    root, _ = xkd_run
    logged = scalars(root)
    for tag in ("xkd/mu_mean", "xkd/sigma_mean", "xkd/td_nll", "xkd/kl", "student/kd", "student/avril",
                "eval/arithmetic_score", "eval/distinct_2", "eval/self_bleu"):
        assert tag in logged, tag
    assert len(logged["eval/distinct_2"]) == 2
    assert "critic/heldout_pref_acc" not in logged  # the posterior is not a preference model


def test_divergence_based_xkd_uses_the_teacher_model(tmp_path):
    root = tmp_path / "run"
    cli = run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache",
                                    "--model.objective.kd=generalized_jsd", "--trainer.max_epochs=2", config="configs/xkd.yaml"))
    assert cli.model.teacher is not None
    logged = scalars(root)
    assert {"xkd/mu_mean", "student/kd", "eval/self_bleu"} <= set(logged)


# ---------------------------------------------------------------------------- MiniLLM
def test_minillm_config_runs_two_on_policy_epochs(tmp_path):
    root = tmp_path / "run"
    run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", "--trainer.max_epochs=2",
                              "--model.objective.lm_coef=0.5", config="configs/baselines/minillm.yaml"))
    logged = scalars(root)
    for tag in ("student/long_term", "student/single_step_rkl", "student/importance_weight", "student/clip_frac",
                "student/lm_loss", "eval/reversal_score", "eval/distinct_2", "eval/self_bleu"):
        assert tag in logged, tag
    assert all(0 < w <= 1 / 0.8 + 1e-4 for w in logged["student/importance_weight"])
    assert (root / "buffer" / "iter_0001.jsonl").exists()  # a second iteration of samples


def test_step_values_are_logged_as_their_means_over_each_log_every_n_steps_batches(tmp_path):
    """The same deterministic fit logged every batch and every 2 batches: each value of the second is the mean of
    two of the first (losses, terms), the skip count is the count so far, and nothing is logged between."""
    def fit(name, every):
        run_cli("fit", *tiny_args(tmp_path / name, "--model.objective.critic_warmup_steps=0", "--trainer.limit_val_batches=0",
                                  f"--trainer.log_every_n_steps={every}", "--trainer.max_epochs=2"))
        return scalars(tmp_path / name)

    each, pairs = fit("each", 1), fit("pairs", 2)
    assert len(each["student/loss"]) == 8 and len(pairs["student/loss"]) == 4  # 4 batches an epoch, 2 epochs
    for name in ("student/loss", "critic/loss", "critic/reward_gap"):
        means = [(a + b) / 2 for a, b in zip(each[name][::2], each[name][1::2])]
        assert pairs[name] == pytest.approx(means, rel=1e-5), name
    assert pairs["student/nonfinite_skips"] == each["student/nonfinite_skips"][1::2]
    # the losses go through self.log, the other terms straight to the logger: at the same x values, Lightning's
    steps = scalar_steps(tmp_path / "pairs")
    assert steps["student/loss"] == steps["critic/loss"] == steps["critic/reward_gap"] == steps["student/nonfinite_skips"] == [1, 3, 5, 7]


def test_step_means_are_the_means_since_the_last_pop_brought_to_the_cpu_together():
    """What the module logs every log_every_n_steps batches: the steps' mean of each value (a count: its latest),
    as CPU tensors, so Lightning's per-batch read of the progress-bar value never waits on an accelerator."""
    from pbkd_lightning.module import StepMeans

    means = StepMeans()
    means.add({"student/loss": torch.tensor(1.0), "student/tokens": torch.tensor(4)})
    means.add({"student/loss": torch.tensor(3.0, dtype=torch.float64), "student/tokens": torch.tensor(8)})
    means.set("student/nonfinite_skips", 2)
    popped = means.pop()
    assert {name: value.item() for name, value in popped.items()} == {"student/loss": 2.0, "student/tokens": 6.0,
                                                                       "student/nonfinite_skips": 2.0}
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and v.dim() == 0 for v in popped.values())
    assert means.pop() == {}  # nothing since the last pop: nothing logged
    means.add({"student/loss": torch.tensor(5.0)})
    assert means.pop()["student/loss"].item() == 5.0  # no value of an earlier interval is carried over
