"""Sampling (pbkd_lightning/data/generation.py): one place samples, and keeps the tokens as sampled, log π_old of
exactly the distribution sampled from, and whether each sample ended (the rollouts issue's defects 3 and 4); and
MiniLLM's teacher-mixed sampling."""

import logging

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pbkd_lightning.data.collate import StudentCollate
from pbkd_lightning.data.generation import GenerationConfig, sample_rollouts
from pbkd_lightning.models import ModelSpec, load_causal_lm
from pbkd_lightning.players import Players
from pbkd_lightning.sequences import Encoder

PROMPTS = ["Reverse: cat dog\n", "Cal has 4 keys, gets 9. How many keys?\n", "ab"]


def _greedy_by_hand(model, tokenizer, prompt, steps):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return out


def test_the_models_own_generation_config_does_not_change_what_is_sampled(caplog):
    """Defect 3: a model's shipped processors (here a repetition penalty of 5) used to reshape the sampler while
    π_old stayed a plain softmax. They are switched off with one log line: greedy is the plain argmax."""
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=3))
    model.generation_config.repetition_penalty = 5.0
    with caplog.at_level(logging.WARNING, logger="pbkd_lightning.data.generation"):
        rollouts, _ = sample_rollouts(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0.0), 1, 8)
        sample_rollouts(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0.0), 1, 8)
    assert [r[0].token_ids for r in rollouts] == [_greedy_by_hand(model, tokenizer, p, 12) for p in PROMPTS]
    assert sum("repetition_penalty" in m for m in caplog.messages) == 1
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config is put back


@pytest.mark.parametrize("sampling", [GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, temperature=0.7,
                                                                                            top_p=0.9, top_k=20)])
def test_old_logprobs_are_the_sampled_distribution_and_match_the_policy_loss(sampling):
    """π_old as recorded while sampling equals π_θ as the losses compute it (same temperature, top-k, top-p, columns,
    dropout off), so the PPO ratio starts at exactly 1; and every sampled token has finite probability."""
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=3))
    rollouts, stats = sample_rollouts(model, tokenizer, PROMPTS, sampling, 3, 8)
    flat = [r for group in rollouts for r in group]
    assert stats["tokens"] == sum(len(r.token_ids) + r.ended for r in flat)
    assert all(len(r.logprobs) == len(r.token_ids) + r.ended for r in flat)
    assert any(not r.ended for r in flat) and all(len(r.token_ids) == 10 for r in flat if not r.ended)
    players = Players(model, tokenizer, sampling, Encoder(tokenizer, 64, sampling.max_new_tokens))
    batch = StudentCollate(players.encoder)([{"prompt": p, "teacher": "x", "rollouts": g} for p, g in zip(PROMPTS, rollouts)])
    model.eval()
    with torch.no_grad():
        policy = players.policy_logprobs(batch.samples)
    mask = batch.samples.scored_positions
    assert torch.isfinite(batch.old_logprobs[mask]).all()
    torch.testing.assert_close(policy[mask], batch.old_logprobs[mask], atol=1e-5, rtol=1e-5)


def _bpe_student():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["apples and oranges", "an apple a day", "reverse the words", "cat dog sun sky"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    return model, tokenizer


def test_samples_are_scored_on_the_tokens_sampled_not_on_a_retokenisation():
    """Defect 4: with a BPE tokenizer, decoding a sample and encoding it again gives other tokens ("app"+"les" →
    "apples"); the student batch holds exactly the sampled tokens, and their log π_old."""
    model, tokenizer = _bpe_student()
    rollouts, _ = sample_rollouts(model, tokenizer, ["apples and", "cat dog"], GenerationConfig(max_new_tokens=12), 8, 8)
    flat = [r for group in rollouts for r in group]
    retokenised = [tokenizer(r.text, add_special_tokens=False)["input_ids"] for r in flat]
    assert any(ids != r.token_ids for ids, r in zip(retokenised, flat))  # the round trip would change the tokens
    encoder = Encoder(tokenizer, 32, 12)
    batch = StudentCollate(encoder)([{"prompt": p, "teacher": "x", "rollouts": g} for p, g in zip(["apples and", "cat dog"], rollouts)])
    for row, rollout in enumerate(flat):
        scored = batch.samples.input_ids[row, 1:][batch.samples.scored_positions[row]].tolist()
        assert scored == rollout.token_ids + ([tokenizer.eos_token_id] if rollout.ended else [])


def test_teacher_mixed_sampling_at_the_ends_is_each_model_alone():
    from pbkd_lightning.data.generation import GenerationConfig, generate, sample_mixed_rollouts
    from pbkd_lightning.models import ModelSpec, load_causal_lm

    student, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=0))
    teacher, _ = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=1))
    prompts, greedy = ["ab cd\n", "Reverse: x y z\n", "q"], GenerationConfig(max_new_tokens=8, temperature=0.0)
    for mix, alone in ((0.0, student), (1.0, teacher)):
        mixed, stats = sample_mixed_rollouts(student, teacher, tokenizer, prompts, greedy, 1, 2, teacher_mix=mix)
        reference, _ = generate(alone, tokenizer, prompts, greedy, 1, 2)
        assert [[r.text for r in group] for group in mixed] == reference and stats["tokens"] > 0
    sampled, _ = sample_mixed_rollouts(student, teacher, tokenizer, prompts, GenerationConfig(max_new_tokens=8), 3, 8)
    assert [len(group) for group in sampled] == [3, 3, 3]
    # each rollout keeps the student's own log π of the tokens the mixture drew (MiniLLM's π_old)
    rollout = sampled[0][0]
    ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"] + rollout.token_ids
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([ids])).logits[0, -len(rollout.token_ids) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(rollout.token_ids)[:, None]).squeeze(-1)
    assert rollout.logprobs[: len(rollout.token_ids)] == pytest.approx(expected.tolist(), abs=1e-4)


def test_dropout_off_and_the_shared_vocabulary_keep_the_ratio_at_one():
    """The minor points of the rollouts issue: π_old is computed with dropout off and on the columns the policy
    losses crop to (the vocabulary a white-box student shares with its teacher), so a dropout student in eval mode,
    cropped, scores exactly what was sampled — and never a token outside the shared vocabulary."""
    from transformers import AutoModelForCausalLM

    base, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=3))
    config = base.config
    config.attention_dropout = 0.3
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(base.state_dict())
    vocabulary = 60  # fewer columns than the model's 100
    sampling = GenerationConfig(max_new_tokens=10, temperature=0.8, top_k=30)
    model.train()  # the sampler must switch dropout off itself
    torch.manual_seed(1)
    rollouts, _ = sample_rollouts(model, tokenizer, PROMPTS, sampling, 3, 8, vocabulary=vocabulary)
    assert model.training  # and put the mode back
    flat = [r for group in rollouts for r in group]
    assert all(t < vocabulary for r in flat for t in r.token_ids)
    players = Players(model, tokenizer, sampling, Encoder(tokenizer, 64, 10), vocabulary=vocabulary)
    batch = StudentCollate(players.encoder)([{"prompt": p, "teacher": "x", "rollouts": g} for p, g in zip(PROMPTS, rollouts)])
    mask = batch.samples.scored_positions
    model.eval()  # as the module's student step for on-policy objectives
    with torch.no_grad():
        torch.testing.assert_close(players.policy_logprobs(batch.samples)[mask], batch.old_logprobs[mask], atol=1e-5, rtol=1e-5)
    model.train()
    with torch.no_grad():  # with dropout on, the same tokens would score differently: the eval mode matters
        assert (players.policy_logprobs(batch.samples)[mask] - batch.old_logprobs[mask]).abs().max() > 1e-3


def test_every_end_token_of_the_model_ends_a_sample_and_is_the_one_scored():
    """Instruct models ship several end tokens (end of turn, end of text): each ends a sample, and the eos that is
    scored is the one sampled, not the tokenizer's."""
    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=3))
    sampling = GenerationConfig(max_new_tokens=12)
    torch.manual_seed(0)
    [[plain]], _ = sample_rollouts(model, tokenizer, PROMPTS[:1], sampling, 1, 8)
    ids = plain.token_ids
    # make the first greedy token not seen before it an end token of the model
    at = next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])
    other_end = ids[at]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, other_end]
    torch.manual_seed(0)  # the same draws, so the same path until the new end token
    [[cut]], _ = sample_rollouts(model, tokenizer, PROMPTS[:1], sampling, 1, 8)
    assert cut.token_ids == ids[:at] and cut.ended and cut.eos_token_id == other_end
    batch = Encoder(tokenizer, 64, 12).batch(PROMPTS[:1], [cut])
    assert batch.scored_actions.tolist() == ids[:at] + [other_end]


def test_a_model_teacher_answer_cut_at_its_limit_is_marked_as_not_ended(tmp_path):
    """A model teacher that stops at its token limit must not hand the student a fake eos (its answer is text only,
    so the flag travels beside it)."""
    from pbkd_lightning.data.teachers import HFModelTeacher

    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=16, heads=2))
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    texts, ended = HFModelTeacher(str(tmp_path / "teacher"), max_new_tokens=3).answer([{"prompt": "ab"}, {"prompt": "cd"}])
    rollouts, _ = sample_rollouts(model, tokenizer, ["ab", "cd"], GenerationConfig(max_new_tokens=3, temperature=0.0), 1, 8)
    assert ended == [group[0].ended for group in rollouts] and not all(ended)  # a random model rarely says eos
    batch = Encoder(tokenizer, 16, 3).batch(["ab", "cd"], texts, ended)
    assert batch.ended.tolist() == ended
    assert all(tokenizer.eos_token_id not in row[mask].tolist()
               for row, mask, whole in zip(batch.input_ids[:, 1:], batch.scored_positions, ended) if not whole)


@pytest.mark.parametrize("sampling", [GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9),
                                      GenerationConfig(max_new_tokens=12, temperature=0)])
def test_the_sampler_draws_what_generate_draws_with_the_same_seed(sampling, monkeypatch):
    """Our decode loop (one prefill per prompt, the cache written in place) against ``model.generate`` through the
    same sampling logits and the same draw (``generate``'s ``multinomial`` replaced by :func:`draw_tokens`, which
    draws from its distribution: test_draw_tokens_...): with one sample per prompt and the same seed, the very
    same tokens and ends. (With K samples the prefill is shared; test_old_logprobs_... checks those rows' log π_old
    against a full forward.)"""
    from transformers import LogitsProcessor

    from pbkd_lightning.data.generation import _decoding, _encode_prompts, draw_tokens, end_tokens
    from pbkd_lightning.losses import sampling_logits

    model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2, init_seed=3))
    prompts = PROMPTS * 3
    torch.manual_seed(0)
    ours, _ = sample_rollouts(model, tokenizer, prompts, sampling, 1, 4)

    class Ours(LogitsProcessor):
        def __call__(self, ids, scores):
            return sampling_logits(scores.float(), sampling.temperature, sampling.top_k, sampling.top_p)

    torch.manual_seed(0)
    theirs = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: draw_tokens(probs)[:, None])
    with _decoding(tokenizer, model):
        for begin in range(0, len(prompts), 4):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + 4], None)
            warpers = {} if sampling.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
            out = model.generate(**encoded, do_sample=not sampling.greedy, **warpers, logits_processor=[Ours()],
                                 max_new_tokens=12, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_tokens(model, tokenizer))
            theirs += out[:, encoded["input_ids"].shape[1]:].tolist()
    assert [group[0].token_ids for group in ours] == [row[: len(group[0].token_ids)] for group, row in zip(ours, theirs)]
    assert all(group[0].ended == (len(group[0].token_ids) < len(row) and row[len(group[0].token_ids)] in end_tokens(model, tokenizer))
               for group, row in zip(ours, theirs))


def test_draw_tokens_draws_from_multinomials_distribution_and_never_a_token_of_probability_zero():
    """200,000 draws from four rows (one peaked, one flat, one with zeros inside and at its end, one of a single
    token): each token's frequency within 5 standard errors of its probability, the same as torch.multinomial's;
    zero-probability tokens never drawn even when the uniform number lands at the row's very top; the same seed,
    the same draws; rows that cannot be sampled are refused."""
    from pbkd_lightning.data.generation import draw_tokens

    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05, 0.0], [0.2] * 5, [0.3, 0.0, 0.5, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    draws = 50_000
    torch.manual_seed(0)
    ours = draw_tokens(probs.repeat(draws, 1)).view(draws, 4)  # rows drawn independently: 50,000 draws of each
    torch.manual_seed(0)
    again = draw_tokens(probs.repeat(draws, 1)).view(draws, 4)
    assert torch.equal(ours, again)
    theirs = torch.multinomial(probs, draws, replacement=True).T
    for drawn in (ours, theirs):
        frequency = F.one_hot(drawn, 5).float().mean(0)
        error = (probs * (1 - probs) / draws).sqrt()
        assert ((frequency - probs).abs() <= 5 * error + 1e-9).all(), frequency
    assert not (F.one_hot(ours, 5).bool() & (probs == 0)).any()
    with pytest.MonkeyPatch.context() as patch:  # u · total rounded up to the total itself (u = 1 - 2^-24 can)
        patch.setattr(torch, "rand_like", torch.ones_like)
        top = draw_tokens(probs)
    assert top.tolist() == [3, 4, 3, 3]  # the last non-zero entry, never the zero at the end
    with pytest.MonkeyPatch.context() as patch:  # u = 0: the first entry of positive probability
        patch.setattr(torch, "rand_like", torch.zeros_like)
        assert draw_tokens(probs).tolist() == [0, 0, 0, 3]
    torch.manual_seed(1)  # a row that is not normalised is drawn in proportion to its entries
    unnormalised = F.one_hot(draw_tokens(torch.tensor([[2.0, 0.0, 6.0]]).repeat(draws, 1)), 3).float().mean(0)
    assert abs(unnormalised[0] - 0.25) < 5 * (0.25 * 0.75 / draws) ** 0.5 and unnormalised[1] == 0
    for bad in ([0.0, 0.0, 0.0], [float("nan"), 0.5, 0.5]):
        with pytest.raises(ValueError, match="cannot sample"):
            draw_tokens(torch.tensor([bad]))


def _llama_and_qwen2_with_grouped_heads():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                         intermediate_size=128, num_hidden_layers=2))
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=101, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128, num_hidden_layers=2))  # 2 query heads per kv head, q/k/v biases
    return [llama.eval(), qwen2.eval()]


@pytest.mark.parametrize("samples", [3, 1], ids=["K=3", "K=1"])
@pytest.mark.parametrize("model", _llama_and_qwen2_with_grouped_heads(), ids=["llama", "qwen2-grouped-heads"])
def test_shared_prefix_steps_give_the_models_own_logits(model, samples):
    """Each decode step with the prompts' keys and values held once per prompt gives the logits of the model's own
    forward over the whole sequence (left-padded prompts of different lengths, K samples each, 6 steps); K = 1 (greedy
    validation, on-policy GKD) takes the same path."""
    from pbkd_lightning.data.generation import _Decoder

    ids = torch.randint(3, 101, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[1, :1] = 0, 0
    encoded = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    decoder = _Decoder(model, encoded, num_samples=samples, steps=6)
    assert decoder.shared is not None
    drawn, logits = [], decoder.logits
    for _ in range(6):
        drawn.append(torch.randint(3, 101, (3 * samples,)))
        logits = decoder.step(drawn[-1])
    # the model's own forward of prompt + drawn tokens, every row whole
    full_ids = torch.cat([encoded["input_ids"].repeat_interleave(samples, 0), torch.stack(drawn, 1)], 1)
    full_mask = torch.cat([mask.repeat_interleave(samples, 0), torch.ones(3 * samples, 6, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill_(full_mask == 0, 1)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, -1]
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5), (logits - expected).abs().max()


def test_shared_prefix_sampling_draws_what_the_expanded_cache_draws():
    """K = 4 samples per prompt through the shared-prefix path and through the model's forward on an expanded cache,
    from the same seed: the same tokens, and log π_old within float rounding."""
    from pbkd_lightning.data.generation import _decode

    for model in _llama_and_qwen2_with_grouped_heads():
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, :4] = 0
        encoded = {"input_ids": torch.randint(3, 101, (3, 9)).masked_fill(mask == 0, 0), "attention_mask": mask}
        runs = []
        for shared in (True, False):
            torch.manual_seed(1)
            runs.append(_decode(model, encoded, GenerationConfig(max_new_tokens=10), 4, None, [2], 0, False, shared_prefix=shared))
        (tokens, logprobs), (expected_tokens, expected_logprobs) = runs
        assert torch.equal(tokens, expected_tokens) and torch.allclose(logprobs, expected_logprobs, atol=1e-5)
