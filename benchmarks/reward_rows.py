"""The implicit reward model's step at a real vocabulary: its head fed the scored (response) rows only
(``models.critic.response_token_logprobs``) against every position's logits, then the response tokens' entries (what
it did before), each variant in a fresh process.

    python -m benchmarks.reward_rows               # 16 sequences of 192 tokens (half prompt), vocabulary 151,936
    python -m benchmarks.reward_rows --quick       # a small size, for a smoke test

One reward-model step as black-box PbKD takes it on a batch of pairs' sequences: the rewards (the mean log-ratio to a
frozen reference's kept log-probabilities) forward and backward, on a 2 × 256 Qwen2 with tied embeddings. Reported:
the median time of 3 steps after one warm-up step, and the peak resident memory above the inputs and models (the
kernel's ``VmHWM`` after resetting it, as ``benchmarks/divergence_memory.py`` measures it).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(variant: str, vocab: int, sequences: int, tokens: int, hidden: int, layers: int, threads: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.divergence_memory import peak_mb, start_peak
    from pbkd_lightning.losses import token_logprobs
    from pbkd_lightning.models.critic import ImplicitReward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    critic = ImplicitReward(Qwen2ForCausalLM(config))
    ids = torch.randint(0, vocab, (sequences, tokens))
    attention = torch.ones(sequences, tokens, dtype=torch.long)
    loss_mask = torch.zeros(sequences, tokens, dtype=torch.long)
    loss_mask[:, tokens // 2:] = 1
    reference = torch.randn(sequences, tokens - 1) * loss_mask[:, 1:]

    def every_position():  # the formula before: N × T × V logits, every position's log-probability, then the mask
        logits = critic.lm(input_ids=ids, attention_mask=attention, use_cache=False).logits
        logprobs = token_logprobs(logits[:, :-1], ids[:, 1:])
        mask = loss_mask[:, 1:].float()
        return critic.scale * ((logprobs - reference) * mask).sum(1) / mask.sum(1)

    def scored_rows():
        return critic(ids, attention, loss_mask, ref_logprobs=reference)

    run = {"every position": every_position, "scored rows": scored_rows}[variant]
    times, peak = [], 0.0
    for step in range(4):
        critic.zero_grad(set_to_none=True)
        baseline = start_peak()
        start = time.perf_counter()
        rewards = run()
        rewards.sum().backward()
        seconds = time.perf_counter() - start
        peak = max(peak, peak_mb() - baseline)
        if step:
            times.append(seconds)
    gradient = torch.cat([p.grad.flatten() for p in critic.parameters()])
    return {"variant": variant, "vocab": vocab, "seconds": statistics.median(times), "peak_extra_mb": peak,
            "rewards": rewards.detach().tolist(), "gradient_norm": float(gradient.norm())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--quick", action="store_true", help="vocabulary 4,096, 4 sequences of 32 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's
    args = parser.parse_args(argv)
    size = dict(vocab=4096, sequences=4, tokens=32) if args.quick else dict(vocab=args.vocab, sequences=16, tokens=192)
    size.update(hidden=256, layers=2, threads=args.threads)
    if args.variant:
        print(json.dumps(measure(args.variant, **size)))
        return []
    results = []
    for variant in ("every position", "scored rows"):
        child = [sys.executable, "-m", "benchmarks.reward_rows", "--variant", variant, "--threads", str(args.threads),
                 "--vocab", str(args.vocab)] + (["--quick"] if args.quick else [])
        results.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    full, rows = results
    difference = max(abs(a - b) for a, b in zip(full["rewards"], rows["rewards"]))
    print(f"{size['sequences']} sequences x {size['tokens']} tokens (half prompt), vocabulary {size['vocab']:,}, "
          f"a {size['layers']} x {size['hidden']} Qwen2, {args.threads} threads")
    print("| reward model step | time | peak extra memory | max \\|reward diff\\| | gradient norm |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {1000 * r['seconds']:.0f} ms | {r['peak_extra_mb']:,.0f} MB | "
              f"{'–' if r is full else format(difference, '.1e')} | {r['gradient_norm']:.6g} |")
    print(f"scored rows / every position: {rows['seconds'] / full['seconds']:.2f}x the time, "
          f"{rows['peak_extra_mb'] / full['peak_extra_mb']:.2f}x the memory")
    return results


if __name__ == "__main__":
    main()
