"""Export a minirlhf policy checkpoint to the Hugging Face GPT-2 layout, so the result leaves our world as a standard
``GPT2LMHeadModel``::

    python -m minirlhf.export --checkpoint out/ppo --out out/ppo-hf
    # then, anywhere:  transformers.GPT2LMHeadModel.from_pretrained("out/ppo-hf")

The tokenizer is GPT-2's (or, for a "gpt2-<N>" checkpoint, its first N merges with EOS at id N, recorded in
``config.json`` as ``eos_token_id``).
"""
import pathlib
from dataclasses import dataclass

from minirlhf.checkpoint import load_policy
from minirlhf.config import UserError, option, run


@dataclass
class ExportConfig:
    """Write a policy checkpoint (pretrain, sft or ppo) as config.json + model.safetensors in the HF GPT-2 layout."""

    checkpoint: str = option("", "minirlhf policy checkpoint directory (or any GPT-2 directory)")
    out: str = option("", "output directory for the Hugging Face layout")


def main(cfg: ExportConfig) -> pathlib.Path:
    if not cfg.checkpoint or not cfg.out:
        raise UserError("--checkpoint and --out are required")
    model, _ = load_policy(cfg.checkpoint)
    out = model.save_pretrained(cfg.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return out


if __name__ == "__main__":
    run(main, ExportConfig)
