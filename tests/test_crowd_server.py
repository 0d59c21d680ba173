"""The crowd web app over real HTTP on 127.0.0.1: concurrent raters with overlap and gold, a server killed with SIGKILL
and restarted, escaping of untrusted text, who may read what, every task's form, red teaming against a tiny live
policy; then the store's hand-out, the quality report and the export read back by the trainers' readers."""
import json
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from http.cookiejar import CookieJar
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, build_opener

import pytest
import torch

from minirlhf.checkpoint import save_checkpoint
from minirlhf.config import UserError
from minirlhf.crowd.__main__ import CreateBatch, create_batch
from minirlhf.crowd.quality import batch_quality, export, report_markdown
from minirlhf.crowd.sampling import Sampler, Sampling
from minirlhf.crowd.server import http_server, make_app
from minirlhf.crowd.store import Store
from minirlhf.data import read_preferences, read_prompts, read_sft
from minirlhf.model import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------------
# Helpers: a store with raters and items, a server, a browser-less client


def texts(i: int, k: int) -> list[dict]:
    return [{"text": f" response {j} of item {i}", "policy": f"pol{j % 2}", "ended": True} for j in range(k)]


def make_store(tmp_path, task="rank", *, items=6, k=3, overlap=3, gold=(), gold_rate=0.0, scale=None, raters=5):
    """A store with a lead, ``raters`` raters (tokens returned) and one batch ``b`` of ``items`` items."""
    store = Store(tmp_path / "crowd.db")
    tokens = {"lead": store.add_rater("lead", "lead")}
    tokens.update({f"r{i}": store.add_rater(f"r{i}") for i in range(raters)})
    batch = store.add_batch("b", task, overlap=overlap, gold_rate=gold_rate, scale=scale)
    for i in range(items):
        store.add_item(batch, f"prompt {i}", texts(i, k))
    for answer in gold:
        store.add_item(batch, "a gold prompt", texts(99, k), gold=answer)
    return store, tokens


@pytest.fixture
def server():
    """``start(app) -> base URL``: the app on a free port of 127.0.0.1, in a thread, shut down after the test."""
    running = []

    def start(app):
        srv = http_server(app, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        running.append(srv)
        return f"http://127.0.0.1:{srv.server_port}"

    yield start
    for srv in running:
        srv.shutdown()
        srv.server_close()


class Client:
    """One rater's browser: a cookie jar, redirects followed. ``request`` returns (status, body, final url)."""

    def __init__(self, base: str, token: str = ""):
        self.base = base
        self.opener = build_opener(HTTPCookieProcessor(CookieJar()))
        self.headers = {}
        if token:
            status, _, _ = self.request("/login", {"token": token})
            assert status == 200

    def request(self, path: str, form=None):
        data = None if form is None else urlencode(form).encode()
        try:
            with self.opener.open(self.base + path, data=data, timeout=60) as r:
                self.headers = dict(r.headers)
                return r.status, r.read().decode(), r.url
        except HTTPError as e:
            return e.code, e.read().decode(), e.url


def label_everything(client: Client, batch: str, rng: random.Random) -> list[tuple[int, list[int]]]:
    """Rank every item the server hands this rater until none is left; return (assignment, ranks) submitted."""
    done = []
    while True:
        status, body, url = client.request(f"/batch/{batch}/next")
        assert status == 200, body
        if "Nothing left" in body:
            return done
        assignment = int(url.rsplit("/", 1)[1])
        ranks = list(range(1, body.count('name="rank_') + 1))
        rng.shuffle(ranks)
        status, body, _ = client.request(f"/task/{assignment}", {f"rank_{p}": r for p, r in enumerate(ranks)})
        assert status == 200, body
        done.append((assignment, ranks))


# ---------------------------------------------------------------------------------------------------------------------
# Over HTTP


def test_concurrent_raters_with_overlap_and_gold(tmp_path, server):
    """Five raters label at once (threads, real HTTP): every item gets exactly R = 3 distinct raters, every label is
    stored once, gold items are mixed in and never shown twice to one rater, and each stored ranking is what the
    rater submitted, mapped back through the order shown to them."""
    store, tokens = make_store(tmp_path, items=8, gold=[[0, 1, 2], [2, 1, 0]], gold_rate=0.3)
    base = server(make_app(store.path))
    results, errors = {}, []

    def rater(name, seed):
        try:
            results[name] = label_everything(Client(base, tokens[name]), "b", random.Random(seed))
        except Exception as e:  # reported below, with the rater's name
            errors.append((name, e))

    threads = [threading.Thread(target=rater, args=(f"r{i}", i)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    labels = store.labels(store.batch("b"))
    regular = [label for label in labels if label["gold"] is None]
    per_item = {}
    for label in regular:
        per_item.setdefault(label["item"], []).append(label["rater"])
    assert len(regular) == 8 * 3 and all(len(set(r)) == len(r) == 3 for r in per_item.values())
    assert len(labels) == sum(len(done) for done in results.values())  # every submitted label stored once
    gold_seen = [(label["rater"], label["item"]) for label in labels if label["gold"] is not None]
    assert len(gold_seen) == len(set(gold_seen)) and gold_seen  # (0.3 x 5 raters x ~5 items: some gold)
    by_assignment = {label["assignment"]: label for label in labels}
    for done in results.values():
        for assignment, ranks in done:
            label = by_assignment[assignment]
            shown_best_first = sorted(range(len(ranks)), key=lambda p: ranks[p])
            assert label["value"] == [label["shown_order"][p] for p in shown_best_first]
    orders = {tuple(label["shown_order"]) for label in labels}
    assert len(orders) > 1  # the response order is shuffled per rater
    assert store.progress(store.batch("b"))["complete"] == 8


def test_server_killed_and_restarted_loses_nothing_acknowledged(tmp_path):
    """A real server process, SIGKILLed while a rater is mid-session: after a restart every label the server had
    acknowledged (answered with the next page) is there with its value, and the item the rater was on comes back."""
    store, tokens = make_store(tmp_path, items=5, overlap=2)

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "minirlhf.crowd", "serve", "--db", str(store.path), "--port",
                                 "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("listening on"), (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc, line.split()[-1].rstrip("/")

    proc, base = start()
    try:
        client = Client(base, tokens["r0"])
        acknowledged = {}
        for _ in range(3):
            _, body, url = client.request("/batch/b/next")
            assignment = int(url.rsplit("/", 1)[1])
            status, _, _ = client.request(f"/task/{assignment}", {"rank_0": 2, "rank_1": 1, "rank_2": 3})
            assert status == 200
            acknowledged[assignment] = True
        _, _, url = client.request("/batch/b/next")  # the 4th item is on the rater's screen
        open_assignment = int(url.rsplit("/", 1)[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    proc, base = start()
    try:
        client = Client(base, tokens["r0"])
        labels = Store(store.path).labels(store.batch("b"))
        assert sorted(label["assignment"] for label in labels) == sorted(acknowledged)
        assert all(label["value"] == [label["shown_order"][1], label["shown_order"][0], label["shown_order"][2]]
                   for label in labels)
        _, _, url = client.request("/batch/b/next")
        assert int(url.rsplit("/", 1)[1]) == open_assignment
        assert client.request("/mine")[1].count("/task/") == 3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_untrusted_text_is_escaped(tmp_path, server):
    store, tokens = make_store(tmp_path, items=0, raters=1, overlap=1)
    evil = [{"text": '<script>alert("x")</script>', "policy": "p", "ended": True},
            {"text": '" onmouseover="alert(1)', "policy": "p", "ended": True}]
    store.add_item(store.batch("b"), "<b>bold</b> & <img src=x onerror=alert(1)>", evil)
    client = Client(server(make_app(store.path)), tokens["r0"])
    status, body, _ = client.request("/batch/b/next")
    assert status == 200
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body and "<script" not in body
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;img" in body and "<img" not in body and "<b>" not in body
    assert "&quot; onmouseover=&quot;alert(1)" in body
    assert "default-src 'none'" in client.headers["Content-Security-Policy"]


def test_raters_see_only_their_own_work(tmp_path, server):
    store, tokens = make_store(tmp_path, items=2, raters=2, overlap=2)
    base = server(make_app(store.path))
    alice, bob, lead = Client(base, tokens["r0"]), Client(base, tokens["r1"]), Client(base, tokens["lead"])
    _, _, url = alice.request("/batch/b/next")
    mine = int(url.rsplit("/", 1)[1])
    assert alice.request(f"/task/{mine}", {"rank_0": 3, "rank_1": 1, "rank_2": 2})[0] == 200
    for path in (f"/task/{mine}", "/lead", "/lead/labels/b"):
        assert bob.request(path)[0] == 403, path
    assert bob.request(f"/task/{mine}", {"rank_0": 1, "rank_1": 2, "rank_2": 3})[0] == 403
    assert "/task/" not in bob.request("/mine")[1]
    assert [label["rater"] for label in Store(store.path).labels(store.batch("b"))] == ["r0"]
    status, body, _ = lead.request("/lead/labels/b")
    assert status == 200 and "r0" in body
    status, body, _ = lead.request("/lead")
    assert status == 200 and "Krippendorff" in body
    stranger = Client(base)
    assert stranger.request("/")[2].endswith("/login") and stranger.request("/lead")[2].endswith("/login")
    assert stranger.request("/login", {"token": "not-a-token"})[0] == 401


@pytest.mark.parametrize("task", ["likert", "flag", "ideal", "rank"])
def test_each_task_form_stores_values_in_the_items_order(tmp_path, server, task):
    store, tokens = make_store(tmp_path, task, items=1, raters=1, overlap=1, scale=(1, 5) if task == "likert" else None)
    client = Client(server(make_app(store.path)), tokens["r0"])
    _, body, url = client.request("/batch/b/next")
    assignment = int(url.rsplit("/", 1)[1])
    answers = {"likert": {"score_0": 5, "score_1": 1, "score_2": 3},
               "flag": {"flag_0": "toxic", "flag_1": "ok", "flag_2": "false"},
               "ideal": {"text": "A better answer — ünïcode ✓."},
               "rank": {"rank_0": 1, "rank_1": 1, "rank_2": 2}}[task]
    status, body, _ = client.request(f"/task/{assignment}", answers)
    if task == "rank":  # two responses ranked 1: refused, asked again, nothing stored
        assert status == 400 and "different rank" in body and not store.labels(store.batch("b"))
        return
    assert status == 200
    [label] = store.labels(store.batch("b"))
    order = label["shown_order"]
    if task == "ideal":
        assert label["value"] == "A better answer — ünïcode ✓."
    else:
        shown = list(answers.values())
        assert [label["value"][order[p]] for p in range(3)] == shown
    # editing: the rater's page shows their answer, and a resubmission replaces the label (counted as an edit)
    status, body, _ = client.request(f"/task/{assignment}")
    assert "submitting replaces your label" in body
    if task == "likert":
        assert client.request(f"/task/{assignment}", {**answers, "score_1": 2})[0] == 200
        [label] = store.labels(store.batch("b"))
        assert label["edits"] == 1 and label["value"][order[1]] == 2


def tiny_policy(tmp_path) -> pathlib.Path:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, n_positions=64, n_layer=1, n_head=2, n_embd=32, tokenizer="gpt2-299")
    save_checkpoint(tmp_path / "sft", GPT(cfg), stage="sft", config=cfg)
    return tmp_path / "sft"


def test_red_team_chat_flags_become_items_for_others(tmp_path, server):
    """A rater chats with the live policy over HTTP: two turns, each reply sampled from the whole conversation as one
    plain text; a flagged reply becomes an item (the conversation up to it, the reply) that another rater is handed
    and flags, with its provenance; an over-long conversation is cut from the left to fit the context."""
    store, tokens = make_store(tmp_path, "flag", items=0, raters=2, overlap=2)
    sampler = Sampler(Sampling(policy=str(tiny_policy(tmp_path)), max_new_tokens=6))
    seen = []  # every prompt the policy is asked to continue
    respond = sampler.policy.respond
    sampler.policy.respond = lambda prompts: seen.extend(prompts) or respond(prompts)
    base = server(make_app(store.path, sampler=sampler, redteam_batch="b"))
    alice, bob = Client(base, tokens["r0"]), Client(base, tokens["r1"])
    assert "Your message" in alice.request("/redteam")[1]
    assert alice.request("/redteam", {"message": "Say something rude"})[0] == 200
    status, body, url = alice.request("/redteam", {"message": "Ruder, <please>"})
    assert status == 200 and url.endswith("/redteam") and "Ruder, &lt;please&gt;" in body
    r0 = next(r for r in store.raters() if r.name == "r0")
    chat = store.chat(r0)
    turns = store.turns(chat, r0)
    assert [t.role for t in turns] == ["rater", "policy", "rater", "policy"]
    first, second = turns[1].text, turns[3].text
    assert seen == ["User: Say something rude\nPolicy:", f"User: Say something rude\nPolicy:{first}\nUser: Ruder, "
                    f"<please>\nPolicy:"]
    # the tiny policy's context is 64 tokens, 6 of them kept for the reply: a prompt keeps its last 58 tokens
    assert [t.source["prompt_truncated"] for t in turns[1::2]] == [
        max(0, len(sampler.policy.tokenizer.encode_prompt(prompt)) - 58) for prompt in seen]
    assert turns[1].source["policy"] == str(tmp_path / "sft") and turns[1].source["prompt_truncated"] == 0
    # bob has a conversation of his own, sees nothing of alice's, may not flag her replies, has nothing to flag yet
    assert "Say something rude" not in bob.request("/redteam")[1]
    assert bob.request(f"/redteam/flag/{turns[1].id}", {"category": "toxic"})[0] == 403
    assert "Nothing left" in bob.request("/batch/b/next")[1]
    # alice flags the first reply: bob is handed it, with the conversation up to it as the prompt
    assert alice.request(f"/redteam/flag/{turns[0].id}", {"category": "toxic"})[0] == 400  # her own turn
    assert alice.request(f"/redteam/flag/{turns[1].id}", {"category": "ok"})[0] == 400  # not a failure
    status, body, _ = alice.request(f"/redteam/flag/{turns[1].id}", {"category": "toxic"})
    assert status == 200 and "Flagged as <strong>toxic</strong>" in body
    assert alice.request(f"/redteam/flag/{turns[1].id}", {"category": "false"})[0] == 400  # flagged already
    assert "Nothing left" in alice.request("/batch/b/next")[1]  # her flag is her label: not handed back to her
    status, body, url = bob.request("/batch/b/next")
    assert "User: Say something rude\nPolicy:" in body and "Ruder" not in body
    assert bob.request(url.replace(base, ""), {"flag_0": "toxic"})[0] == 200
    [item] = store.items(store.batch("b"))
    assert item.prompt == "User: Say something rude\nPolicy:" and item.category == "redteam-chat"
    [response] = item.responses
    assert (response["text"], response["chat"], response["turn"], response["attacker"], response["policy"]) == (
        first, chat, turns[1].id, "r0", str(tmp_path / "sft"))
    assert [(label["rater"], label["value"]) for label in store.labels(store.batch("b"))] == [
        ("r0", ["toxic"]), ("r1", ["toxic"])]
    counts = export(store, store.batch("b"), tmp_path / "out", min_agreement=0.0)
    assert counts["failures.jsonl"] == 1
    assert [p["prompt"] for p in read_prompts(tmp_path / "out" / "prompts.jsonl")] == [item.prompt]
    # a new conversation starts empty (the old one is kept); a long one is cut from the left to fit the context
    assert "Say something rude" not in alice.request("/redteam/new", {})[1]
    assert len(store.turns(chat, r0)) == 4
    long = "word " * 80
    status, body, _ = alice.request("/redteam", {"message": long})
    [_, reply] = store.turns(store.chat(r0), r0)
    full = len(sampler.policy.tokenizer.encode_prompt(f"User: {long.strip()}\nPolicy:"))
    assert reply.source["prompt_truncated"] == full - (64 - 6) > 0
    assert f"{full - 58} tokens were cut" in body


def test_red_team_chat_recovers_a_lost_reply_and_keeps_turns_alternating(tmp_path, server):
    """A server stopped while the policy was writing leaves the rater's message without a reply: the page says so and
    the next request answers that message (no new one is taken); an empty message is refused; the store refuses two
    turns of one side in a row."""
    store, tokens = make_store(tmp_path, "flag", items=0, raters=1, overlap=1)
    r0 = next(r for r in store.raters() if r.name == "r0")
    chat = store.chat(r0)
    store.add_turn(chat, r0, "rater", "Hello?")  # ... and the server stopped before the reply
    with pytest.raises(ValueError, match="waits for a policy turn"):
        store.add_turn(chat, r0, "rater", "Anyone?")
    sampler = Sampler(Sampling(policy=str(tiny_policy(tmp_path)), max_new_tokens=6))
    client = Client(server(make_app(store.path, sampler=sampler, redteam_batch="b")), tokens["r0"])
    assert "reply to your last message was lost" in client.request("/redteam")[1]
    assert client.request("/redteam", {"message": "ignored"})[0] == 200
    assert [(t.role, t.text if t.role == "rater" else "") for t in store.turns(chat, r0)] == [
        ("rater", "Hello?"), ("policy", "")]
    status, body, _ = client.request("/redteam", {"message": "  "})
    assert status == 400 and "type your message first" in body and len(store.turns(chat, r0)) == 2
    with pytest.raises(ValueError, match="waits for a rater turn"):
        store.add_turn(chat, r0, "policy", "again")


# ---------------------------------------------------------------------------------------------------------------------
# Without HTTP: batches from a policy, quality, export


def label_as(store, name, batch, answer):
    """The rater labels every item handed to them with ``answer(item)`` (in the item's own order)."""
    rater = next(r for r in store.raters() if r.name == name)
    while (assignment := store.next_assignment(rater, batch)) is not None:
        a = store.assignment(assignment, rater)
        store.submit(assignment, rater, answer(a.item))


def test_create_batch_samples_once_with_provenance(tmp_path):
    (tmp_path / "prompts.txt").write_text("The movie was\nI think\n")
    (tmp_path / "gold.jsonl").write_text(json.dumps({"prompt": "Rate", "responses": ["good", "bad"],
                                                     "answer": [0, 1]}) + "\n")
    policy = tiny_policy(tmp_path)
    common = dict(db=str(tmp_path / "crowd.db"), policy=str(policy), prompts=str(tmp_path / "prompts.txt"),
                  max_new_tokens=6, responses=3)
    assert create_batch(CreateBatch(name="b1", task="rank", gold=str(tmp_path / "gold.jsonl"), **common)) == 2
    store = Store(tmp_path / "crowd.db")
    batch = store.batch("b1")
    items = store.items(batch)
    assert [i.prompt for i in items] == ["The movie was", "I think", "Rate"] and items[2].gold == [0, 1]
    assert all(2 <= len(i.responses) <= 3 and len({r["text"] for r in i.responses}) == len(i.responses)
               for i in items[:2])
    assert batch.source["policy"] == str(policy) and batch.source["max_new_tokens"] == 6
    assert batch.gold_rate == 0.1
    (tmp_path / "bad_gold.jsonl").write_text(json.dumps({"prompt": "x", "responses": ["a", "b"],
                                                         "answer": [0, 0]}) + "\n")
    with pytest.raises(UserError, match="bad_gold.jsonl:1: field 'answer'"):
        create_batch(CreateBatch(name="b2", task="rank", gold=str(tmp_path / "bad_gold.jsonl"), **common))
    with pytest.raises(UserError, match="exists already"):
        create_batch(CreateBatch(name="b1", task="rank", **common))
    assert [b.name for b in store.batches()] == ["b1"]  # nothing of the refused batches was stored


def test_create_batch_is_all_or_nothing(tmp_path, monkeypatch):
    """A failure while the items are being stored (here: the disk gives out at the second INSERT of an item) leaves
    no batch and no item behind, and the same command then succeeds."""
    (tmp_path / "prompts.txt").write_text("The movie was\nI think\nThe plot\n")
    cfg = CreateBatch(db=str(tmp_path / "crowd.db"), name="b1", task="flag", policy=str(tiny_policy(tmp_path)),
                      prompts=str(tmp_path / "prompts.txt"), max_new_tokens=6, responses=2)
    insert, calls = Store._insert_item, []

    def failing_insert(self, *args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return insert(self, *args, **kw)

    monkeypatch.setattr(Store, "_insert_item", failing_insert)
    with pytest.raises(sqlite3.OperationalError):
        create_batch(cfg)
    assert len(calls) == 2  # the first item was inserted before the failure
    store = Store(tmp_path / "crowd.db")
    assert store.batches() == [] and store.db.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    monkeypatch.setattr(Store, "_insert_item", insert)
    assert create_batch(cfg) == 3
    assert [i.prompt for i in store.items(store.batch("b1"))] == ["The movie was", "I think", "The plot"]


def test_quality_report_gold_accuracy_and_agreement(tmp_path):
    store, _ = make_store(tmp_path, "flag", items=4, k=2, overlap=3, gold=[["toxic", "ok"]], gold_rate=0.99, raters=3)
    batch = store.batch("b")
    label_as(store, "r0", batch, lambda item: ["toxic", "ok"])
    label_as(store, "r1", batch, lambda item: ["toxic", "ok"])
    label_as(store, "r2", batch, lambda item: ["ok", "toxic"])
    q = batch_quality(store, batch)
    assert q["progress"] == {"items": 4, "complete": 4, "labels": 12, "per_rater": {"r0": 5, "r1": 5, "r2": 5}}
    assert q["raters"]["r0"]["gold_accuracy"] == 1.0 and q["raters"]["r2"]["gold_accuracy"] == 0.0
    assert q["raters"]["r0"]["agreement"] == 0.5 and q["raters"]["r2"]["agreement"] == 0.0
    # 8 units, values (toxic, toxic, ok) or (ok, ok, toxic): o_tt = o_oo = 8, o_to = o_ot = 8, n = 24, n_t = n_o = 12
    # alpha = 1 - 23 * 16 / (2 * 144) = -0.2778
    assert q["alpha"]["nominal"] == pytest.approx(1 - 23 * 16 / 288)
    text = report_markdown([q])
    assert "| r2 | 5 |" in text and "4 of 4 items have 3 labels" in text


def test_export_writes_what_the_trainers_read(tmp_path):
    """Every task's export, read back by minirlhf.data's readers (the extra provenance fields are accepted), with
    disagreements sent to adjudication."""
    out = tmp_path / "out"
    # rank: r0, r1 say 0 > 1 > 2, r2 says 2 > 1 > 0
    store, _ = make_store(tmp_path / "rank", "rank", items=2, raters=3)
    for name, ranking in (("r0", [0, 1, 2]), ("r1", [0, 1, 2]), ("r2", [2, 1, 0])):
        label_as(store, name, store.batch("b"), lambda item, ranking=ranking: ranking)
    assert export(store, store.batch("b"), out / "votes", min_agreement=0.6)["comparisons.jsonl"] == 6
    prefs = read_preferences(out / "votes" / "comparisons.jsonl")
    first = prefs[0]
    assert (first["chosen"], first["rejected"], first["votes"]) == (" response 0 of item 0", " response 1 of item 0",
                                                                    [2, 1])
    assert first["agreement"] == pytest.approx(2 / 3) and sorted(first["raters"]) == ["r0", "r1", "r2"]
    counts = export(store, store.batch("b"), out / "strict", min_agreement=0.7)
    assert counts["adjudication.jsonl"] == 6 and counts["comparisons.jsonl"] == 0
    export(store, store.batch("b"), out / "bt", ranking="bradley-terry")
    rankings = read_preferences(out / "bt" / "rankings.jsonl")
    assert [r["ranking"] for r in rankings] == [[0, 1, 2]] * 2 and rankings[0]["kind"] == "ranking"
    # likert: r1 is harsher by 2 points but agrees on the order: the z-scores agree
    store, _ = make_store(tmp_path / "likert", "likert", items=2, k=2, raters=2, overlap=2, scale=(1, 7))
    label_as(store, "r0", store.batch("b"), lambda item: [7, 3])
    label_as(store, "r1", store.batch("b"), lambda item: [5, 1])
    export(store, store.batch("b"), out / "likert", min_agreement=0.0)
    scores = read_preferences(out / "likert" / "scores.jsonl")
    assert [s["score"] for s in scores] == [1.0, -1.0, 1.0, -1.0] and scores[0]["scale"] == [-3, 3]
    assert scores[0]["raw_scores"] == [7, 5] and scores[0]["agreement"] == pytest.approx(1 - 2 / 6)
    # flag: Dawid-Skene and majority; failures and the prompts for PPO
    store, _ = make_store(tmp_path / "flag", "flag", items=2, k=2, raters=3)
    for name in ("r0", "r1", "r2"):
        label_as(store, name, store.batch("b"), lambda item, n=name: ["toxic" if n != "r2" else "ok", "ok"])
    for method in ("majority", "dawid-skene"):
        export(store, store.batch("b"), out / method, flags=method)
        failures = [json.loads(line) for line in (out / method / "failures.jsonl").read_text().splitlines()]
        assert [(f["output"], f["category"], f["judge"]) for f in failures] == [
            (" response 0 of item 0", "toxic", "crowd"), (" response 0 of item 1", "toxic", "crowd")]
        assert [p["prompt"] for p in read_prompts(out / method / "prompts.jsonl")] == ["prompt 0", "prompt 1"]
    # ideal: demonstrations, one per rater, joined to the prompt as the labelling tool does
    store, _ = make_store(tmp_path / "ideal", "ideal", items=1, k=1, raters=2, overlap=2)
    label_as(store, "r0", store.batch("b"), lambda item: "Fine.")
    label_as(store, "r1", store.batch("b"), lambda item: "Good.")
    export(store, store.batch("b"), out / "ideal")
    demos = read_sft(out / "ideal" / "demonstrations.jsonl")
    assert [(d["prompt"], d["response"], d["rater"]) for d in demos] == [("prompt 0", " Fine.", "r0"),
                                                                          ("prompt 0", " Good.", "r1")]


def test_hand_out_respects_overlap_and_lease(tmp_path):
    """An item goes to at most R raters at a time; a rater's unfinished assignment comes back to them; one left
    longer than the lease frees its slot."""
    store, _ = make_store(tmp_path, items=1, overlap=1, raters=2)
    r0, r1 = [r for r in store.raters() if r.role == "rater"]
    batch = store.batch("b")
    first = store.next_assignment(r0, batch)
    assert store.next_assignment(r0, batch) == first and store.next_assignment(r1, batch) is None
    store.lease_s = 0.0
    assert store.next_assignment(r1, batch) is not None
    with pytest.raises(PermissionError):
        store.submit(first, r1, [0, 1, 2])
    with pytest.raises(ValueError, match="different rank"):
        store.submit(first, r0, [0, 0, 1])
