"""Black-box teachers and judges behind an OpenAI-compatible endpoint (pbkd_lightning/data/api.py, OpenAITeacher,
OpenAIJudge), against a real HTTP server on 127.0.0.1 (tests/api_server.py)."""

import json
import os

import pytest

from conftest import run_cli, scalars, tiny_args
from programs import Program

from pbkd_lightning.data import OpenAIJudge, OpenAITeacher
from pbkd_lightning.data.api import APIError, AnswerCache, request_key

SECRET = "sk-test-0123456789-SECRET"


def written_bytes(*folders):
    """Every file under the folders: (path, bytes)."""
    for folder in folders:
        for base, _, files in os.walk(folder):
            for name in files:
                with open(os.path.join(base, name), "rb") as handle:
                    yield os.path.join(base, name), handle.read()


def test_the_api_teacher_retries_rate_limits_and_errors_caches_every_answer_and_sends_but_never_stores_the_key(
        server, tmp_path, monkeypatch):
    monkeypatch.setenv("PBKD_TEST_KEY", SECRET)
    chat = server(faults={1: 429, 2: 500, 4: 503})
    records = [{"prompt": f"{i}+1?"} for i in range(5)] + [{"prompt": (("system", "Be brief."), ("user", "2+2?"))}]
    settings = dict(model="tiny", base_url=chat.url, api_key_env="PBKD_TEST_KEY", max_new_tokens=6, concurrency=2,
                    retry_delay=0.01, cache_dir=str(tmp_path / "cache"), system_prompt="You are terse.")
    texts, ended = OpenAITeacher(**settings).answer(records)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts) and len(ended) == 6
    assert len(chat.requests) == 9  # three faulted requests were retried
    assert {r["authorization"] for r in chat.requests} == {f"Bearer {SECRET}"}
    first = chat.requests[-1]["body"]
    assert first["model"] == "tiny" and first["max_tokens"] == 6 and first["messages"][0] == {"role": "system", "content": "You are terse."}
    conversation = next(r["body"]["messages"] for r in chat.requests if r["body"]["messages"][-1]["content"] == "2+2?")
    assert [m["role"] for m in conversation] == ["system", "system", "user"]  # the system prompt, then the turns
    # a second teacher with the same settings asks nothing: every answer was cached as it arrived
    assert OpenAITeacher(**settings).answer(records) == (texts, ended) and len(chat.requests) == 9
    assert not [path for path, data in written_bytes(tmp_path) if SECRET.encode() in data]
    from pbkd_lightning.config import plain

    assert SECRET not in json.dumps(plain({"teacher": OpenAITeacher(**settings)}))  # hparams keep the variable's name


def test_the_api_client_gives_up_with_a_clear_error_and_retries_a_timed_out_request(server, tmp_path):
    failing = server(faults={n: 500 for n in range(1, 10)})
    teacher = OpenAITeacher("tiny", base_url=failing.url, api_key_env=None, max_retries=2, retry_delay=0.01,
                            cache_dir=str(tmp_path / "a"))
    with pytest.raises(APIError, match=r"/v1/chat/completions: no answer after 3 tries; last: HTTP 500"):
        teacher.respond([{"prompt": "1+1?"}])
    refusing = server(faults={1: 401})
    teacher = OpenAITeacher("tiny", base_url=refusing.url, api_key_env="PBKD_TEST_KEY", cache_dir=str(tmp_path / "b"))
    with pytest.raises(APIError, match=r"HTTP 401 .*\(is \$PBKD_TEST_KEY set\?\)"):
        teacher.respond([{"prompt": "1+1?"}])
    assert len(refusing.requests) == 1  # refused: not retried
    slow = server(faults={2: "slow"}, delay_s=8.0)
    teacher = OpenAITeacher("tiny", base_url=slow.url, api_key_env=None, timeout=2.0, retry_delay=0.01,
                            cache_dir=str(tmp_path / "c"))
    teacher.respond([{"prompt": "warm-up"}])  # the model's first generate is slow on its own
    assert len(teacher.respond([{"prompt": "1+1?"}])) == 1 and len(slow.requests) == 3  # timed out, asked again
    with pytest.raises(ValueError, match="names the environment variable that holds the key"):
        OpenAITeacher("tiny", api_key_env="sk-proj-abc123")
    with pytest.raises(ValueError, match="`base_url` must be an http"):
        OpenAITeacher("tiny", base_url="127.0.0.1:8000/v1")


def test_an_answer_cache_with_a_torn_last_line_keeps_every_answer_written_after_it(tmp_path):
    from pbkd_lightning.data.api import Endpoint

    endpoint = Endpoint(cache_dir=str(tmp_path))
    AnswerCache(endpoint).add("a", {"text": "1"})
    with open(AnswerCache(endpoint).path, "a") as handle:
        handle.write('{"key": "b", "answ')  # a run killed mid-line
    AnswerCache(endpoint).add("c", {"text": "3"})
    assert AnswerCache(endpoint).answers == {"a": {"text": "1"}, "c": {"text": "3"}}


def test_the_judge_asks_both_orders_and_drops_ties_unparseable_and_order_dependent_verdicts(server, tmp_path):
    def judge(prompt, a, b):
        return {"biased": "A", "tie": "tie", "garbled": "maybe A, maybe B"}.get(prompt, "A" if a == "good" else "B")

    chat = server(judge=judge)
    settings = dict(model="judge", base_url=chat.url, api_key_env=None, cache_dir=str(tmp_path / "cache"))
    items = [("fair", "good", "bad"), ("fair", "bad", "good"), ("biased", "good", "bad"), ("tie", "good", "bad"),
             ("garbled", "good", "bad"), ("fair", "same", "same ")]
    verdicts, counts = OpenAIJudge(**settings).compare(items)
    assert verdicts == [1, -1, 0, 0, 0, 0]
    assert counts == {"pairs": 6, "asked": 10, "ties": 1, "unparsed": 1, "inconsistent": 1}  # identical texts: not asked
    asked = [r["body"]["messages"][-1]["content"] for r in chat.requests]
    assert sum("[Response A]\ngood\n\n[Response B]\nbad" in a for a in asked) == 4  # each pair in both orders
    # one order, drawn per pair and undone: the fair judge still decides correctly, the biased one now gets a label
    verdicts, counts = OpenAIJudge(**settings, both_orders=False).compare(items[:3])
    assert verdicts[:2] == [1, -1] and verdicts[2] in (1, -1) and counts["asked"] == 3
    with pytest.raises(ValueError, match=r"template` must hold \{prompt\}, \{a\} and \{b\}"):
        OpenAIJudge("judge", template="Which is better?")


def api_args(url, cache, *extra):
    return ["--data.teacher=pbkd_lightning.data.OpenAITeacher", "--data.teacher.model=tiny-teacher",
            f"--data.teacher.base_url={url}", "--data.teacher.api_key_env=PBKD_TEST_KEY", "--data.teacher.retry_delay=0.01",
            f"--data.teacher.cache_dir={cache}", *extra]


@pytest.mark.slow
def test_a_short_black_box_pbkd_fit_with_the_api_teacher_and_the_judge_labeler_writes_no_key_and_reruns_asking_nothing(
        server, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PBKD_TEST_KEY", SECRET)
    chat = server(judge=lambda prompt, a, b: "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie",
                  faults={3: 429, 10: 500})
    cache, root = tmp_path / "cache", tmp_path / "run"
    judge = ["--data.labeler=judge", "--data.judge=pbkd_lightning.data.OpenAIJudge", "--data.judge.model=tiny-judge",
             f"--data.judge.base_url={chat.url}", "--data.judge.api_key_env=PBKD_TEST_KEY", "--data.judge.retry_delay=0.01",
             f"--data.judge.cache_dir={cache}"]
    online = ["--model.objective.critic_warmup_steps=0", "--data.online=true", "--trainer.max_epochs=2",
              "--trainer.reload_dataloaders_every_n_epochs=1"]  # the judge labels each iteration's new samples
    cli = run_cli("fit", *tiny_args(root, *api_args(chat.url, cache), *judge, *online))
    stats, logged = cli.datamodule.stats, scalars(root)
    asked = len(chat.requests)
    teacher_requests = [r for r in chat.requests if r["body"]["model"] == "tiny-teacher"]
    assert len({json.dumps(r["body"]) for r in teacher_requests}) == 24  # 2 tasks x (8 training + 4 held-out), once each
    assert stats["data/judge_pairs"] > 16 and stats["data/judge_asked"] > 0  # teacher-vs-sample and sample-vs-sample
    assert stats["data/judge_ties"] + stats["data/judge_inconsistent"] + stats["data/judge_unparsed"] <= stats["data/judge_pairs"]
    assert len(logged["data/judge_pairs"]) == 2 and logged["critic/bt"]  # both iterations judged; the critic learned them
    assert all("judged_sample_pairs" in g for i in (0, 1) for g in cli.datamodule._load_iteration(i))
    assert {r["authorization"] for r in chat.requests} == {f"Bearer {SECRET}"}  # sent with every request
    assert not [path for path, data in written_bytes(root, cache) if SECRET.encode() in data]
    assert SECRET not in "".join(capfd.readouterr())  # nor printed
    # the same run again from scratch: every teacher answer and every verdict comes from the cache
    run_cli("fit", *tiny_args(tmp_path / "again", *api_args(chat.url, cache), *judge, *online))
    assert len(chat.requests) == asked


@pytest.mark.slow
def test_a_run_killed_while_asking_the_teacher_resumes_without_asking_again(server, tmp_path, monkeypatch):
    chat = server()
    cache, root = tmp_path / "cache", tmp_path / "run"
    args = tiny_args(root, *api_args(chat.url, cache, "--data.teacher.concurrency=1"), "--data.train_size=16",
                     config="configs/baselines/seqkd.yaml")
    process = Program(["fit", *args], env={**os.environ, "PBKD_TEST_KEY": SECRET})
    chat.kill_pid, chat.kill_after = process.pid, 7
    done = process.wait(timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    endpoint = OpenAITeacher("tiny-teacher", base_url=chat.url, cache_dir=str(cache)).endpoint
    kept = set(AnswerCache(endpoint).answers)
    assert 5 <= len(kept) <= 7  # what arrived before the kill (the last answers may have been in flight)
    first = len(chat.requests)
    monkeypatch.setenv("PBKD_TEST_KEY", SECRET)
    run_cli("fit", *args)  # the same command again
    again = [request_key(endpoint, r["body"]) for r in chat.requests[first:]]
    assert len(again) == 2 * (16 + 4) - len(kept) and not set(again) & kept  # the cached ones were not asked again
    assert (root / "summary.json").exists()


def test_the_judges_labels_and_its_agreement_with_the_verifier_reach_the_buffer_and_the_stats(server, tmp_path):
    from pbkd_lightning.data import PreferenceDataModule
    from pbkd_lightning.sequences import Rollout

    # a judge that knows arithmetic except for one question, where it prefers the wrong answer
    def judge(prompt, a, b):
        right = f"#### {2 * int(prompt.split('+')[0])}"
        return "A" if (a == right) != (prompt == "2+2?") else "B"

    chat = server(judge=judge)
    judge = OpenAIJudge("judge", base_url=chat.url, api_key_env=None, cache_dir=str(tmp_path / "cache"))
    data = PreferenceDataModule(labeler="judge", judge=judge, sample_pairs=True)
    records = [{"prompt": f"{n}+{n}?", "reference": f"#### {2 * n}", "task": "arithmetic", "teacher": f"#### {2 * n}"}
               for n in (1, 2, 3)]
    rollouts = [[Rollout(text, [], [], True) for text in (f"#### {2 * n + 1}", f"#### {2 * n}")] for n in (1, 2, 3)]
    preferences, ranked = data._judge(records, rollouts)
    # teacher vs the wrong sample: right for 1+1 and 3+3, wrong for 2+2; teacher vs an identical sample: no label
    assert preferences == [[1, 0], [-1, 0], [1, 0]]
    assert ranked == [[["#### 2", "#### 3"]], [["#### 5", "#### 4"]], [["#### 6", "#### 7"]]]
    assert data.stats["data/judge_verifier_agreement"] == pytest.approx(2 / 3)
    assert data.stats["data/judge_pairs"] == 9 and data.stats["data/judge_asked"] == 12  # 6 pairs asked twice
