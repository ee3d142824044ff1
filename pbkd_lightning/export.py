"""``python -m pbkd_lightning export --ckpt_path runs/…/last.ckpt --out student-hf/``.

Writes the student (and, with ``--reward_model``, black-box PbKD's reward model) from a checkpoint as
Hugging Face folders: safetensors weights, config and tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained`` without this package.
"""

import argparse
import os
import sys

import torch

from pbkd_lightning.models.loading import ModelSpec, load_causal_lm, save_student


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export(ckpt_path: str, out: str, reward_model: bool = False) -> list[str]:
    """Export from ``ckpt_path`` into ``out`` (the student) and ``out/reward_model`` (if asked). Returns the folders."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams, state = checkpoint.get("hyper_parameters", {}), checkpoint["state_dict"]
    if "student" not in hparams:
        raise ValueError(f"{ckpt_path} is not a pbkd_lightning checkpoint (no `student` hyperparameters)")
    spec = ModelSpec(**hparams["student"])
    student, tokenizer = load_causal_lm(spec)
    student.load_state_dict(_prefixed(state, "student."))
    save_student(student, tokenizer, out)  # a LoRA student: merged weights, and its adapter in out/adapter
    folders = [out]
    if reward_model:
        weights = _prefixed(state, "critic.lm.")
        if not weights:
            raise ValueError("--reward_model: the checkpoint has no implicit reward model (a language-model copy) to export")
        critic, _ = load_causal_lm(spec)
        critic.load_state_dict(weights)
        folder = os.path.join(out, "reward_model")
        critic.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbkd_lightning export", description=__doc__.split("\n\n")[1])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit (e.g. runs/blackbox/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="folder for the student's Hugging Face files")
    parser.add_argument("--reward_model", action="store_true",
                        help="also write the implicit reward model (a language model) to <out>/reward_model")
    args = parser.parse_args(argv)
    try:
        folders = export(args.ckpt_path, args.out, args.reward_model)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for folder in folders:
        print(f"wrote {folder}")
