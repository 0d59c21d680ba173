"""Export a minirlhf policy checkpoint to the Hugging Face GPT-2 layout, so the result leaves our world as a standard
``GPT2LMHeadModel`` with its tokenizer::

    python -m minirlhf.export --checkpoint out/ppo --out out/ppo-hf
    # then, anywhere:  transformers.GPT2LMHeadModel.from_pretrained("out/ppo-hf")
    #                  transformers.AutoTokenizer.from_pretrained("out/ppo-hf")

The directory gets the model (``config.json`` + ``model.safetensors``, :func:`minirlhf.hf.save_pretrained`) and
the tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``,
:meth:`minirlhf.tokenizer.Tokenizer.save_pretrained`). The tokenizer is GPT-2's (or, for a "gpt2-<N>" checkpoint, its
first N merges with EOS at id N, recorded in ``config.json`` as ``eos_token_id``); its merge rules are recovered from
tiktoken's ranks (about a second for the full vocabulary; see minirlhf/tokenizer.py), and Hugging Face's tokenizer
encodes every text to the same ids as ours, "<|endoftext|>" written in the text included (plain text, not EOS: this
needs transformers >= 4.42, as older fast tokenizers ignore ``split_special_tokens`` and read it as EOS). PAD is not
exported: it is not a real token.
"""
import pathlib
from dataclasses import dataclass

from minirlhf.checkpoint import is_minirlhf_checkpoint, load_policy
from minirlhf.config import UserError, option, run
from minirlhf.hf import save_pretrained


@dataclass
class ExportConfig:
    """Write a policy checkpoint (pretrain, sft or ppo) in the Hugging Face GPT-2 layout: config.json +
    model.safetensors, and the tokenizer's vocab.json + merges.txt."""

    checkpoint: str = option("", "(required) minirlhf policy checkpoint directory (or any GPT-2 directory)")
    out: str = option("", "(required) output directory for the Hugging Face layout (new or empty; a minirlhf "
                          "checkpoint there is never replaced)")
    overwrite: bool = option(False, "replace the model and tokenizer files of a non-empty --out (e.g. an earlier "
                                    "export)")


def main(cfg: ExportConfig) -> pathlib.Path:
    if not cfg.checkpoint or not cfg.out:
        raise UserError("--checkpoint and --out are required")
    target = pathlib.Path(cfg.out)
    if is_minirlhf_checkpoint(target):
        raise UserError(f"--out {target} holds a minirlhf checkpoint, which the export would destroy; choose another "
                        "directory")
    if target.is_dir() and any(target.iterdir()) and not cfg.overwrite:
        raise UserError(f"--out {target} is not empty; pass --overwrite to replace its model and tokenizer files")
    model, tokenizer = load_policy(cfg.checkpoint)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"{cfg.checkpoint}: the model has {model.config.vocab_size} tokens but its tokenizer "
                        f"{tokenizer.name!r} has {tokenizer.vocab_size}")
    out = save_pretrained(model, cfg.out)
    tokenizer.save_pretrained(out, model_max_length=model.config.n_positions)
    print(f"wrote {out}: the model (config.json, model.safetensors) and its tokenizer {tokenizer.name!r} (vocab.json, "
          "merges.txt, tokenizer_config.json, special_tokens_map.json)")
    return out


if __name__ == "__main__":
    run(main, ExportConfig)
