"""White-box methods: the Q-head's losses, the two players of MM PbKD, divergence baselines, teachers and the cache."""

import glob
from dataclasses import replace
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TEACHER, run_cli, tiny_args
from conftest import scalars

from pbkd_lightning.objectives.base import Share
from pbkd_lightning.losses import SparseTeacher, dense_teacher_probs, moment_matching_gap, q_induced_returns



def whitebox_fit(root, *extra, config="configs/whitebox.yaml"):
    return run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", *extra, config=config))


# ---------------------------------------------------------------------------- losses
def test_moment_matching_gap_matches_a_loop_over_states_and_actions():
    torch.manual_seed(0)
    q, p_t, p_s = torch.randn(5, 7), F.softmax(torch.randn(5, 7), -1), F.softmax(torch.randn(5, 7), -1)
    naive = sum(sum((p_t[s, a] - p_s[s, a]) * q[s, a] for a in range(7)) for s in range(5)) / 5
    assert moment_matching_gap(q, p_t, p_s).item() == pytest.approx(naive.item(), abs=1e-6)
    assert moment_matching_gap(q, p_t, p_t).item() == pytest.approx(0.0, abs=1e-7)  # same policy: no gap
    assert moment_matching_gap(q[:0], p_t[:0], p_s[:0]).item() == 0.0  # no state scored: 0, not NaN


def test_q_induced_returns_match_the_per_token_formula_with_a_terminal_state():
    q_taken = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])  # prompt position, three response tokens, padding
    gamma = 0.9
    # r_t = Q(s_t, a_t) − γ V(s_{t+1}); after the last response token (eos) the state is terminal (V = 0)
    expected = (1.0 - gamma * 1.0) + (2.0 - gamma * 1.5) + (3.0 - 0.0)
    assert q_induced_returns(q_taken, values, mask, gamma).item() == pytest.approx(expected)


def test_a_sparse_teacher_with_every_token_densifies_exactly():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    logprobs = F.log_softmax(logits, -1)
    full = SparseTeacher(*logprobs.topk(6, -1), torch.zeros(4))
    assert torch.allclose(dense_teacher_probs(full, 6), F.softmax(logits, -1), atol=1e-6)
    top, ids = logprobs.topk(2, -1)
    sparse = dense_teacher_probs(SparseTeacher(top, ids, 1 - top.exp().sum(-1)), 6)
    assert torch.allclose(sparse.sum(-1), torch.ones(4), atol=1e-6)  # leftover spread over the other 4 tokens
    assert torch.allclose(sparse.gather(-1, ids), top.exp())


# ---------------------------------------------------------------------------- MM PbKD's two players
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


# ---------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("name", ["fkl", "rkl", "gkd", "skew_kl", "skew_rkl", "tvd"])
def test_each_divergence_baseline_config_trains_two_steps(tmp_path, name):
    root = tmp_path / name
    whitebox_fit(root, "--trainer.limit_train_batches=2", config=f"configs/baselines/{name}.yaml")
    logged = scalars(root)
    assert len(logged["student/divergence"]) == 2 and all(v >= 0 for v in logged["student/divergence"])
    assert "eval/arithmetic_score" in logged
    if name == "gkd":  # λ = 0.5: the draws are logged, each batch either on- or off-policy
        assert set(logged["student/on_policy"]) <= {0.0, 1.0}


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


# ---------------------------------------------------------------------------- teachers
def test_teacher_logit_cache_is_written_once_then_trained_from_without_a_teacher(tmp_path, caplog):
    cache = tmp_path / "topk"
    whitebox_fit(tmp_path / "first", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=8",
                 config="configs/baselines/fkl.yaml")
    index = json.loads((cache / "index.json").read_text())
    assert index["k"] == 8 and index["sequences"] == 16
    written = os.path.getmtime(cache / "index.json")
    with caplog.at_level("INFO"):
        cli = whitebox_fit(tmp_path / "second", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=8",
                           config="configs/baselines/fkl.yaml")
    assert os.path.getmtime(cache / "index.json") == written  # read, not rewritten
    assert cli.model.teacher is None
    assert not list((tmp_path / "second" / "cache").glob("teacher-sft-*"))  # the embedded teacher was never even built
    assert "student/divergence" in scalars(tmp_path / "second")
    # another k is another cache: the folder refuses it rather than serving the wrong one
    with pytest.raises(ValueError, match="other sequences"):
        whitebox_fit(tmp_path / "third", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=4",
                     config="configs/baselines/fkl.yaml")


def test_forward_kl_from_the_cache_equals_the_dense_teacher_at_full_k(tmp_path):
    from pbkd_lightning.objectives.divergence import divergence_loss

    cache = tmp_path / "topk"
    cli = whitebox_fit(tmp_path / "run", f"--data.teacher_cache={cache}", "--data.teacher_cache_k=200", config="configs/baselines/fkl.yaml")
    module, data = cli.model, cli.datamodule
    batch = next(iter(data.train_dataloader()))
    from pbkd_lightning.models.teacher import load_teacher

    teacher, _ = load_teacher(module.teacher_config, data.train_records, 96, data.generation.max_new_tokens)
    module.players.teacher = teacher
    with torch.no_grad():
        _, logits = module.players.rows(batch.teacher)
        cached = divergence_loss("forward_kl", logits, batch.teacher.teacher_topk, 0.5, 0.1, 1.0, False)
        dense = divergence_loss("forward_kl", logits, module.players.teacher_rows(replace(batch.teacher, teacher_topk=None)), 0.5, 0.1, 1.0, False)
    assert cached.item() == pytest.approx(dense.item(), rel=2e-3)  # float16 log-probabilities in the cache


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


def test_scored_rows_are_the_full_forward_at_response_positions(tmp_path):
    """The head sees only scored rows, yet the rows are exactly the full model's (one forward through the root
    module, as FSDP2 needs), and gradients reach the tied embedding through both of its uses."""
    from conftest import tiny_modules, tiny_trainer

    module, datamodule = tiny_modules(tmp_path)
    tiny_trainer(tmp_path / "run", max_steps=1, limit_val_batches=0).fit(module, datamodule)
    batch = next(iter(datamodule.train_dataloader()["student"])).teacher
    hidden, logits = module.players.rows(batch)
    full = module.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    positions = batch.scored_positions
    assert logits.shape == (int(positions.sum()), module.student.config.vocab_size)
    assert torch.allclose(logits, full.logits[:, :-1][positions], atol=1e-5)
    assert torch.allclose(hidden, full.hidden_states[-1][:, :-1][positions], atol=1e-5)
    logits.logsumexp(-1).sum().backward()
    assert module.student.get_input_embeddings().weight.grad.abs().sum() > 0
