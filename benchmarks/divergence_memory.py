"""Peak extra memory and time of the chunked divergences against the naive full-tensor formula.

    python benchmarks/divergence_memory.py            # batch 4 × 512 tokens, vocabularies 32,000 and 151,936
    python benchmarks/divergence_memory.py --quick    # a small size, for a smoke test

Each measurement runs in a fresh process: inputs are built, the resident set size (RSS) is
read, then one forward and backward pass runs, and the peak RSS above that baseline
(``ru_maxrss``, as the kernel counts it) is the figure reported. Both variants compute the same
forward KL on float32 logits, and both end holding the gradient of the logits.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def naive_forward_kl(student_logits, teacher_logits, labels):
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = (labels != -100).float()
    return (rows * mask).sum() / mask.sum().clamp(min=1)


def measure(variant: str, batch: int, tokens: int, vocab: int, threads: int) -> dict:
    import torch

    from pbkd_lightning.losses import forward_kl

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = torch.randn(batch, tokens, vocab).requires_grad_()
    teacher = torch.randn(batch, tokens, vocab)
    labels = torch.randint(vocab, (batch, tokens))
    labels[:, : tokens // 8] = -100  # a prompt that is not scored
    baseline = rss_mb()
    start = time.perf_counter()
    loss = naive_forward_kl(student, teacher, labels) if variant == "naive" else forward_kl(student, teacher, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    return {"variant": variant, "vocab": vocab, "seconds": seconds, "peak_extra_mb": peak - baseline, "loss": float(loss)}


def run_isolated(variant: str, batch: int, tokens: int, vocab: int, threads: int) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, '.'); from benchmarks.divergence_memory import measure; "
        f"print(json.dumps(measure({variant!r}, {batch}, {tokens}, {vocab}, {threads})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(batch: int, tokens: int, vocab: int, threads: int = 2) -> dict:
    """Naive and chunked, each in a fresh process, on the same inputs; they must agree on the loss."""
    naive = run_isolated("naive", batch, tokens, vocab, threads)
    chunked = run_isolated("chunked", batch, tokens, vocab, threads)
    assert abs(naive["loss"] - chunked["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])), (naive, chunked)
    return {"batch": batch, "tokens": tokens, "vocab": vocab, "naive": naive, "chunked": chunked,
            "time_ratio": chunked["seconds"] / naive["seconds"], "memory_ratio": chunked["peak_extra_mb"] / naive["peak_extra_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 × 64 tokens, vocabulary 4,096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    batch, tokens, vocabs = (2, 64, [4096]) if args.quick else (4, 512, [32000, 151936])
    results = []
    print(f"forward KL, forward + backward, batch {batch} × {tokens} tokens, float32 logits, {args.threads} threads")
    print(f"{'vocab':>8} {'naive s':>9} {'chunked s':>10} {'time ×':>7} {'naive MB':>9} {'chunked MB':>11} {'memory ×':>9}")
    for vocab in vocabs:
        row = compare(batch, tokens, vocab, args.threads)
        naive, chunked = row["naive"], row["chunked"]
        results.append(row)
        print(
            f"{vocab:>8} {naive['seconds']:>9.2f} {chunked['seconds']:>10.2f} {row['time_ratio']:>7.2f} "
            f"{naive['peak_extra_mb']:>9.0f} {chunked['peak_extra_mb']:>11.0f} {row['memory_ratio']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
