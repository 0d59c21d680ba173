"""The demo's shipped pre-trained base (minirlhf/demo/base.py): its corpus readers on small archives built here, the
recipe's command, and the shipped files themselves (they load, match the recipe, and their loss fell)."""
import io
import json
import zipfile

import pytest

import train_sft
from minirlhf.checkpoint import load_policy, read_meta
from minirlhf.config import UserError, parse_args
from minirlhf.demo import base
from minirlhf.demo import data as demo_data
from test_demo_data import make_sdist, targz


def chat_wheel(path, conversations: dict) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(base.CHAT_MEMBER, json.dumps(conversations))
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_conversation_is_one_text_with_a_line_per_turn(tmp_path):
    msg = lambda text: {"text": text, "timestamp": "", "sender": "x"}  # noqa: E731
    wheel = chat_wheel(tmp_path / "chat.whl", {
        "a": {"messages": [[msg("Hello"), msg("How are you? ")], [msg("fine")], [msg("  ")]]},
        "b": {"messages": [[msg(" ")]]},  # nothing said: no text
    })
    assert base.chat_texts(wheel) == ["Hello How are you?\nfine"]
    with pytest.raises(UserError, match="not the chitchat wheel"):
        base.chat_texts(make_sdist(tmp_path / "x.whl"))  # a tar.gz, not a zip


def test_snippets_are_the_amazon_and_nyt_texts_not_the_movie_sentences(tmp_path):
    inner = targz({f"hutto_ICWSM_2014/{base.SNIPPETS[0]}": b"1\t0.5\tGreat blender.\r\n2\t-1.0\tBroke in a week\r\n",
                   f"hutto_ICWSM_2014/{base.SNIPPETS[1]}": b"7\t0.1\tThe senate voted.\r\n",
                   f"hutto_ICWSM_2014/{demo_data.GROUND_TRUTH}": b"1\t2.0\tA fine film.\r\n"})
    sdist = tmp_path / "v.tar.gz"
    sdist.write_bytes(targz({f"vaderSentiment-3.3.2/{demo_data.INNER_ARCHIVE}": inner}))
    assert base.snippet_texts(sdist) == ["Great blender.", "Broke in a week", "The senate voted."]


def test_the_recipe_is_a_train_sft_command_its_parser_accepts():
    cmd = base.train_command("corpus.jsonl", "out/base/model", 1)
    assert cmd[1:3] == ["-m", "train_sft"]
    cfg = parse_args(train_sft.Config, cmd[3:])
    assert (cfg.init, cfg.data, cfg.out, cfg.n_embd, cfg.max_steps) == (
        "scratch", "corpus.jsonl", "out/base/model", base.RECIPE["n_embd"], base.RECIPE["max_steps"])


def test_the_shipped_base_loads_was_trained_by_the_recipe_and_learned():
    policy, tokenizer = load_policy(str(base.SHIPPED))
    train_config = read_meta(base.SHIPPED)["train_config"]
    for k, v in base.RECIPE.items():
        assert train_config[k] == v, k
    assert tokenizer.name == base.RECIPE["tokenizer"] and policy.config.n_embd == base.RECIPE["n_embd"]
    records = [json.loads(line) for line in (base.SHIPPED / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == base.RECIPE["max_steps"] and len(val) >= 2
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 2 and val[-1] < val[0]
