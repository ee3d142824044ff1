"""Peak extra memory and time of the chunked divergences against the naive full-tensor formula.

    python benchmarks/divergence_memory.py            # batch 4 × 512 tokens, vocabularies 32,000 and 151,936
    python benchmarks/divergence_memory.py --quick    # a small size, for a smoke test
    python benchmarks/divergence_memory.py --fused    # the projection fused in: hidden states and head weights in

With ``--fused`` the inputs are both models' hidden states at the scored rows and their head weights (student
896 wide, teacher 1,536: a 0.5B student of a 1.5B teacher); the naive variant projects all rows of both to
logits, then takes the naive formula, and :func:`~pbkd_lightning.losses.fused_divergence` projects a chunk of
rows at a time. Both end holding the gradients of the student's hidden states and head weight.

Each measurement runs in a fresh process: inputs are built, the resident set size (RSS) is
read and the kernel's peak mark reset to it (``/proc/self/clear_refs``; building the inputs may have
passed through more), then one forward and backward pass runs, and the peak RSS above that baseline
(``VmHWM``, as the kernel counts it) is the figure reported. Both variants compute the same
forward KL on float32 logits, and both end holding the gradient of the logits.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def start_peak() -> float:
    """The RSS now, in MB, with the kernel's peak mark reset to it where it can be (else the process's peak so far)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    return rss_mb()


def peak_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux


def naive_forward_kl(student_logits, teacher_logits, labels):
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)
    mask = (labels != -100).float()
    return (rows * mask).sum() / mask.sum().clamp(min=1)


def naive_projected_forward_kl(student_hidden, student_weight, teacher_hidden, teacher_weight):
    import torch.nn.functional as F

    log_s = F.log_softmax(student_hidden @ student_weight.T, -1)
    log_t = F.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def measure_fused(variant: str, rows: int, vocab: int, hidden: int, teacher_hidden: int, threads: int) -> dict:
    import torch

    from pbkd_lightning.losses import HeadRows, fused_divergence

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student_hidden = torch.randn(rows, hidden).requires_grad_()
    student_weight = torch.randn(vocab, hidden).div_(hidden**0.5).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(rows, teacher_hidden), torch.randn(vocab, teacher_hidden).div_(teacher_hidden**0.5)
    baseline = start_peak()
    start = time.perf_counter()
    if variant == "naive":
        loss = naive_projected_forward_kl(student_hidden, student_weight, teacher_hidden, teacher_weight)
    else:
        loss = fused_divergence("forward_kl", HeadRows(student_hidden, student_weight), HeadRows(teacher_hidden, teacher_weight))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_mb()
    return {"variant": variant, "vocab": vocab, "seconds": seconds, "peak_extra_mb": peak - baseline, "loss": float(loss),
            "grad_norms": [float(student_hidden.grad.norm()), float(student_weight.grad.norm())]}


def measure(variant: str, batch: int, tokens: int, vocab: int, threads: int) -> dict:
    import torch

    from pbkd_lightning.losses import forward_kl

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    student = torch.randn(batch, tokens, vocab).requires_grad_()
    teacher = torch.randn(batch, tokens, vocab)
    labels = torch.randint(vocab, (batch, tokens))
    labels[:, : tokens // 8] = -100  # a prompt that is not scored
    baseline = start_peak()
    start = time.perf_counter()
    loss = naive_forward_kl(student, teacher, labels) if variant == "naive" else forward_kl(student, teacher, labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_mb()
    return {"variant": variant, "vocab": vocab, "seconds": seconds, "peak_extra_mb": peak - baseline, "loss": float(loss)}


def run_isolated(target: str, arguments: dict, env: dict | None = None) -> dict:
    """``module:function`` called on ``arguments`` in a fresh process (its peak RSS, threads and imports are then its
    own), with ``env`` added to the environment; its return value comes back as JSON."""
    module, function = target.split(":")
    code = (f"import json, sys; sys.path.insert(0, '.'); from {module} import {function}; "
            f"print('RESULT ' + json.dumps({function}(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{target}({arguments}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare(batch: int, tokens: int, vocab: int, threads: int = 2) -> dict:
    """Naive and chunked, each in a fresh process, on the same inputs; they must agree on the loss."""
    sizes = dict(batch=batch, tokens=tokens, vocab=vocab, threads=threads)
    naive = run_isolated("benchmarks.divergence_memory:measure", dict(variant="naive", **sizes))
    chunked = run_isolated("benchmarks.divergence_memory:measure", dict(variant="chunked", **sizes))
    assert abs(naive["loss"] - chunked["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])), (naive, chunked)
    return {"batch": batch, "tokens": tokens, "vocab": vocab, "naive": naive, "chunked": chunked,
            "time_ratio": chunked["seconds"] / naive["seconds"], "memory_ratio": chunked["peak_extra_mb"] / naive["peak_extra_mb"]}


def compare_fused(rows: int, vocab: int, hidden: int = 896, teacher_hidden: int = 1536, threads: int = 2) -> dict:
    """Naive projection + divergence and the fused one, each in a fresh process; loss and gradients must agree."""
    sizes = dict(rows=rows, vocab=vocab, hidden=hidden, teacher_hidden=teacher_hidden, threads=threads)
    naive = run_isolated("benchmarks.divergence_memory:measure_fused", dict(variant="naive", **sizes))
    fused = run_isolated("benchmarks.divergence_memory:measure_fused", dict(variant="fused", **sizes))
    for a, b in zip([naive["loss"], *naive["grad_norms"]], [fused["loss"], *fused["grad_norms"]]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (naive, fused)
    return {**sizes, "naive": naive, "fused": fused, "time_ratio": fused["seconds"] / naive["seconds"],
            "memory_ratio": fused["peak_extra_mb"] / naive["peak_extra_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 × 64 tokens, vocabulary 4,096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="hidden states and head weights in: the fused projection")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.fused:
        rows, vocabs = (64, [4096]) if args.quick else (1792, [32000, 151936])  # batch 4 × 512 tokens, 1/8 of them prompt
        results = []
        print(f"forward KL from hidden states and head weights, forward + backward, {rows} scored rows, float32, {args.threads} threads")
        print(f"{'vocab':>8} {'naive s':>9} {'fused s':>8} {'time ×':>7} {'naive MB':>9} {'fused MB':>9} {'memory ×':>9}")
        for vocab in vocabs:
            row = compare_fused(rows, vocab, threads=args.threads)
            naive, fused = row["naive"], row["fused"]
            results.append(row)
            print(f"{vocab:>8} {naive['seconds']:>9.2f} {fused['seconds']:>8.2f} {row['time_ratio']:>7.2f} "
                  f"{naive['peak_extra_mb']:>9.0f} {fused['peak_extra_mb']:>9.0f} {row['memory_ratio']:>9.2f}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
        return
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
