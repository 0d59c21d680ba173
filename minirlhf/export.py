"""Export a minirlhf policy checkpoint to the Hugging Face GPT-2 layout, so the result leaves our world as a standard
``GPT2LMHeadModel``::

    python -m minirlhf.export --checkpoint out/ppo --out out/ppo-hf
    # then, anywhere:  transformers.GPT2LMHeadModel.from_pretrained("out/ppo-hf")

The tokenizer is GPT-2's (or, for a "gpt2-<N>" checkpoint, its first N merges with EOS at id N, recorded in
``config.json`` as ``eos_token_id``).
"""
import pathlib
from dataclasses import dataclass

from minirlhf.checkpoint import is_minirlhf_checkpoint, load_policy
from minirlhf.config import UserError, option, run


@dataclass
class ExportConfig:
    """Write a policy checkpoint (pretrain, sft or ppo) as config.json + model.safetensors in the HF GPT-2 layout."""

    checkpoint: str = option("", "minirlhf policy checkpoint directory (or any GPT-2 directory)")
    out: str = option("", "output directory for the Hugging Face layout (new or empty; a minirlhf checkpoint there is "
                          "never replaced)")
    overwrite: bool = option(False, "replace the config.json and model.safetensors of a non-empty --out (e.g. an "
                                    "earlier export)")


def main(cfg: ExportConfig) -> pathlib.Path:
    if not cfg.checkpoint or not cfg.out:
        raise UserError("--checkpoint and --out are required")
    target = pathlib.Path(cfg.out)
    if is_minirlhf_checkpoint(target):
        raise UserError(f"--out {target} holds a minirlhf checkpoint, which the export would destroy; choose another "
                        "directory")
    if target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"--out {target} is not empty; pass --overwrite to replace its config.json and "
                        "model.safetensors")
    model, _ = load_policy(cfg.checkpoint)
    out = model.save_pretrained(cfg.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return out


if __name__ == "__main__":
    run(main, ExportConfig)
