"""Tasks kept outside the project: the check that the testbed's method ordering is not tuned to its own tasks.

Two kinds of prompt, mixed in one data set, as a user's file might mix them: sort a list of digits by value
(``Sort: 7 2 9 4`` → ``2 4 7 9``) and spell a number digit by digit (``Spell: 4071`` → ``four zero seven one``, a
token-by-token mapping to words the prompt does not contain). Held-out answers are scored by ROUGE-L against the
reference, as the library scores any file's records. It is written the way a user has data: JSONL prompt records
with references for training and held-out prompts, and a black-box teacher's response file (``{"prompt",
"teacher"}``), read through the same CLI (``data.train_file``, ``data.val_file``, ``data.teacher:
ResponseFileTeacher``). The teacher is not perfect: a seeded ``teacher_error`` of its answers carry one mistake
(two neighbouring digits swapped, or one digit spelled as its neighbour), as a real teacher's would.

    python -m benchmarks.outside_task DIR   # writes DIR/train.jsonl, DIR/val.jsonl, DIR/teacher.jsonl
"""

import argparse
import json
import os
import random

FILES = ("train.jsonl", "val.jsonl", "teacher.jsonl")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def record(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 7))]
        return {"prompt": f"Sort: {' '.join(map(str, digits))}\n", "reference": " ".join(map(str, sorted(digits)))}
    digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
    return {"prompt": f"Spell: {''.join(map(str, digits))}\n", "reference": " ".join(WORDS[d] for d in digits)}


def teacher_answer(record: dict, rng: random.Random, error_rate: float) -> str:
    """The reference, or with probability ``error_rate`` the reference with one mistake."""
    tokens = record["reference"].split()
    if rng.random() >= error_rate:
        return record["reference"]
    if record["prompt"].startswith("Spell"):
        i = rng.randrange(len(tokens))
        tokens[i] = WORDS[(WORDS.index(tokens[i]) + rng.choice((-1, 1))) % 10]
    else:
        unequal = [i for i in range(len(tokens) - 1) if tokens[i] != tokens[i + 1]]
        if unequal:  # all digits equal: no swap changes the answer, and it stays right
            i = rng.choice(unequal)
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return " ".join(tokens)


def write(folder: str, train_size: int, val_size: int, seed: int = 0, teacher_error: float = 0.05) -> dict:
    """The three files in ``folder`` (rewritten only when missing or made with other settings); returns their paths.
    ``train_size`` distinct training prompts and ``val_size`` distinct held-out ones, none of them a training one."""
    settings = {"train_size": train_size, "val_size": val_size, "seed": seed, "teacher_error": teacher_error,
                "tasks": ["sort", "spell"]}
    paths = {name.split(".")[0]: os.path.join(folder, name) for name in FILES}
    stamp = os.path.join(folder, "settings.json")
    if os.path.exists(stamp) and all(map(os.path.exists, paths.values())):
        with open(stamp) as handle:
            if json.load(handle) == settings:
                return paths
    rng = random.Random(seed)
    seen, splits = set(), []
    for size in (train_size, val_size):
        split = []
        while len(split) < size:
            r = record(rng)
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                split.append(r)
        splits.append(split)
    os.makedirs(folder, exist_ok=True)
    teacher_rng = random.Random(seed + 1)
    answers = [{"prompt": r["prompt"], "teacher": teacher_answer(r, teacher_rng, teacher_error)}
               for split in splits for r in split]
    for path, rows in ((paths["train"], splits[0]), (paths["val"], splits[1]), (paths["teacher"], answers)):
        with open(path + ".part", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(path + ".part", path)
    with open(stamp, "w") as handle:
        json.dump(settings, handle)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--val-size", type=int, default=500)
    args = parser.parse_args(argv)
    print(json.dumps(write(args.folder, args.train_size, args.val_size)))


if __name__ == "__main__":
    main()
