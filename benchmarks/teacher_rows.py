"""The white-box teacher's forward: its head fed the scored rows only (``players.scored_rows``) against the full
``N × T × V`` logits selected afterwards (what ``Players.teacher_rows`` did before), in one process, interleaved.

    python -m benchmarks.teacher_rows                  # 8 sequences of 130 tokens (40 scored), vocabularies 8,192 and 49,152
    python -m benchmarks.teacher_rows --quick          # a small size, for a smoke test

The teacher is a 4 × 256 Llama with tied embeddings (the size of the GKD comparison in the README); figures are the
median of 5 interleaved rounds, with the logits each variant holds.
"""

import argparse
import json
import time


def measure(vocab: int, layers: int = 4, hidden: int = 256, rounds: int = 5, threads: int = 2) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pbkd_lightning.players import scored_rows
    from pbkd_lightning.sequences import SequenceBatch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(config).eval()
    n, t, prompt = 8, 130, 90
    ids, attention = torch.randint(0, vocab, (n, t)), torch.ones(n, t, dtype=torch.long)
    loss_mask = torch.zeros(n, t, dtype=torch.long)
    loss_mask[:, prompt:] = 1
    batch = SequenceBatch(ids, attention, loss_mask, torch.ones(n, dtype=torch.bool))

    def full_then_select():
        return teacher(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1][batch.scored_positions]

    def scored_only():
        return scored_rows(teacher, batch)[1]

    times = {"full": [], "scored": []}
    with torch.no_grad():
        difference = (full_then_select() - scored_only()).abs().max().item()
        for _ in range(rounds):
            for name, run in (("full", full_then_select), ("scored", scored_only)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    rows = int(batch.scored_positions.sum())
    return {"vocab": vocab, "full_ms": 1000 * median["full"], "scored_ms": 1000 * median["scored"],
            "speedup": median["full"] / median["scored"], "max_abs_difference": difference,
            "full_logits_mb": n * t * vocab * 4 / 2**20, "scored_logits_mb": rows * vocab * 4 / 2**20}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 49152])
    parser.add_argument("--quick", action="store_true", help="vocabulary 512, a 1 x 32 teacher")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = dict(layers=1, hidden=32, rounds=3) if args.quick else {}
    results = [measure(v, threads=args.threads, **sizes) for v in ([512] if args.quick else args.vocab)]
    print("| vocabulary | full logits, then select | scored rows only | speed-up | logits held (full / scored) | max |diff| |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['vocab']:,} | {r['full_ms']:.0f} ms | {r['scored_ms']:.0f} ms | {r['speedup']:.2f}× | "
              f"{r['full_logits_mb']:.0f} / {r['scored_logits_mb']:.0f} MB | {r['max_abs_difference']:.1e} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
