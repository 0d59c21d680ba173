"""The crowd's SQLite store: raters, batches of fixed items, who was handed what, and every label.

Tables (one file, WAL journal; every write is one transaction, committed before the web app answers; a batch and all
its items are one write):

============  ==========================================================================================================
raters        name, sha256 of the login token (the token itself is shown once, when the lead creates it), role
              ``rater`` or ``lead``
batches       a task (``rank``, ``likert``, ``flag``, ``ideal``) over items, with its overlap R (distinct raters per
              item), gold rate, Likert scale, guideline version and provenance (policy checkpoint, sampling settings)
items         a prompt and its K responses ``[{"text", "policy", "ended"}]``, sampled ONCE when the batch is made (or
              one policy reply a red-teamer flagged, with its provenance); ``gold``: the known answer of a gold item;
              ``ready``: handed out to raters (every item this version writes is; files of earlier versions may hold
              unflagged attacks with 0, which stay hidden)
assignments   (item, rater), unique: a rater never sees an item twice; the response order shown to that rater (a
              permutation drawn for them); when it was handed out, last shown, and done
labels        one per assignment: the value (in the items' own response order), seconds spent on the page, the
              guideline version and the order shown; a rater may edit their label (``edits`` counts the changes)
chats         a red-teamer's conversations with the live policy (the newest is the one they are in)
turns         a conversation's turns in order, alternating ``rater`` (an attack) and ``policy`` (a reply sampled from
              the conversation so far: ``source`` holds the sampling settings and the prompt tokens cut to fit the
              context); a flagged reply has its ``flag`` category and the ``item_id`` it became
============  ==========================================================================================================

Red teaming as a chat (:meth:`Store.add_turn`, :meth:`Store.flag_turn`): each turn is committed when it is said. The
policy sees the conversation as one plain text (:func:`chat_prompt`). Flagging a reply makes, in one transaction, an
item of the red-team batch: the prompt is the conversation up to the reply (exactly the text the policy continued),
the one response is the reply; the red-teamer's flag is stored as their label, so the item goes to other raters.

Hand-out (:meth:`Store.next_assignment`, one ``BEGIN IMMEDIATE`` transaction, so concurrent raters cannot both take the
last slot of an item): a rater's unfinished assignment comes back first; otherwise, with probability ``gold_rate``, a
gold item they have not seen; otherwise the regular item, not yet seen by them, that is closest to its R raters
(finishing items before starting new ones). An assignment left unfinished for ``lease_s`` seconds stops holding its
slot, so an absent rater does not block an item.

Label values (the answer to one item, in the items' response order 0..K-1):

    rank    [i, j, ...]           a permutation of 0..K-1, best first
    likert  [s_0, ..., s_{K-1}]   whole numbers on the batch's scale, high = good
    flag    [c_0, ..., c_{K-1}]   one of FLAG_CATEGORIES per response ("ok" = no failure)
    ideal   "text"                the response the model should have given
"""
import hashlib
import json
import pathlib
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from minirlhf.config import UserError

TASKS = ("rank", "likert", "flag", "ideal")
FLAG_CATEGORIES = ("ok", "toxic", "hateful", "sexual", "violent", "dangerous", "private_info", "false", "nonsense",
                   "other")
FAILURES = FLAG_CATEGORIES[1:]  # what a red-teamer may flag a reply as
ROLES = ("rater", "lead")

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('rater', 'lead')), created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, task TEXT NOT NULL, overlap INTEGER NOT NULL,
    gold_rate REAL NOT NULL, scale_lo INTEGER, scale_hi INTEGER, guideline TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id), prompt TEXT NOT NULL,
    category TEXT NOT NULL, responses TEXT NOT NULL, gold TEXT, ready INTEGER NOT NULL,
    created_by INTEGER REFERENCES raters(id));
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), rater_id INTEGER NOT NULL
    REFERENCES raters(id), shown_order TEXT NOT NULL, created REAL NOT NULL, shown REAL NOT NULL, done REAL,
    UNIQUE (item_id, rater_id));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    item_id INTEGER NOT NULL, rater_id INTEGER NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
    seconds REAL NOT NULL, guideline TEXT NOT NULL, shown_order TEXT NOT NULL, created REAL NOT NULL,
    edits INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY, rater_id INTEGER NOT NULL REFERENCES raters(id), created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL REFERENCES chats(id),
    role TEXT NOT NULL CHECK (role IN ('rater', 'policy')), text TEXT NOT NULL, ended INTEGER, source TEXT,
    flag TEXT, item_id INTEGER REFERENCES items(id), created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_batch ON items(batch_id);
CREATE INDEX IF NOT EXISTS chats_rater ON chats(rater_id);
CREATE INDEX IF NOT EXISTS turns_chat ON turns(chat_id);
CREATE INDEX IF NOT EXISTS assignments_rater ON assignments(rater_id);
"""


# ---------------------------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Rater:
    id: int
    name: str
    role: str


@dataclass
class Batch:
    id: int
    name: str
    task: str
    overlap: int
    gold_rate: float
    scale: Optional[tuple[int, int]]
    guideline: str
    source: dict


@dataclass
class Item:
    id: int
    batch_id: int
    prompt: str
    category: str
    responses: list[dict]  # [{"text", "policy", "ended"}]
    gold: Optional[object]


@dataclass
class Assignment:
    id: int
    item: Item
    batch: Batch
    rater_id: int
    order: list[int]  # order[p] = the item's response shown at position p
    done: bool
    value: Optional[object]  # the rater's label, when there is one


@dataclass
class Turn:
    id: int
    chat_id: int
    role: str  # "rater" or "policy"
    text: str
    ended: Optional[bool]  # policy: the reply closed with EOS
    source: dict  # policy: the sampling settings, and "prompt_truncated" (tokens cut from the conversation's start)
    flag: Optional[str]  # policy: the failure it was flagged as
    item_id: Optional[int]  # policy, flagged: the red-team item it became


def chat_prompt(turns: list[Turn]) -> str:
    """A conversation as the one plain text the policy continues: a ``User: attack`` line per rater turn, each reply
    after ``Policy:`` exactly as the policy wrote it, then ``Policy:`` for the next reply."""
    lines = [f"User: {t.text.strip()}\n" if t.role == "rater" else f"Policy:{t.text}\n" for t in turns]
    return "".join(lines) + "Policy:"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_value(task: str, value, k: int, scale: Optional[tuple[int, int]]) -> None:
    """Raise ValueError (with the message for the rater) unless ``value`` is a valid answer to a ``task`` item with
    ``k`` responses (module docstring)."""
    if task == "rank":
        if not isinstance(value, list) or sorted(value) != list(range(k)):
            raise ValueError(f"give each of the {k} responses a different rank")
    elif task == "likert":
        lo, hi = scale
        if (not isinstance(value, list) or len(value) != k
                or any(isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi for s in value)):
            raise ValueError(f"score every response with a whole number from {lo} to {hi}")
    elif task == "flag":
        if not isinstance(value, list) or len(value) != k or any(c not in FLAG_CATEGORIES for c in value):
            raise ValueError(f"choose a category for every response ({', '.join(FLAG_CATEGORIES)})")
    elif task == "ideal":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("write the ideal response")
    else:
        raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The store


class Store:
    """One SQLite connection (open one per thread). Every method that writes commits before it returns."""

    def __init__(self, path, *, lease_s: float = 3600.0, rng: Optional[random.Random] = None):
        self.path = pathlib.Path(path)
        self.lease_s = lease_s
        self.rng = rng or random.SystemRandom()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # transactions are explicit
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a label acknowledged is on disk, even if the machine stops
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def write(self):
        """A write transaction that takes the database's write lock at once (so read-then-write is atomic)."""
        return _Transaction(self.db)

    # -- raters --------------------------------------------------------------------------------------------------------

    def add_rater(self, name: str, role: str = "rater") -> str:
        """Create a rater; return their login token (stored only as its hash: shown to the lead once)."""
        if role not in ROLES or not name.strip():
            raise UserError(f"a rater needs a name and a role in {ROLES}; got {name!r}, {role!r}")
        token = secrets.token_urlsafe(24)
        try:
            with self.write():
                self.db.execute("INSERT INTO raters (name, token_sha256, role, created) VALUES (?, ?, ?, ?)",
                                (name.strip(), token_hash(token), role, time.time()))
        except sqlite3.IntegrityError:
            raise UserError(f"a rater named {name!r} exists already") from None
        return token

    def rater_by_token(self, token: str) -> Optional[Rater]:
        row = self.db.execute("SELECT id, name, role FROM raters WHERE token_sha256 = ?",
                              (token_hash(token),)).fetchone()
        return Rater(*row) if row else None

    def raters(self) -> list[Rater]:
        return [Rater(*r) for r in self.db.execute("SELECT id, name, role FROM raters ORDER BY id")]

    # -- batches and items ---------------------------------------------------------------------------------------------

    def add_batch(self, name: str, task: str, *, overlap: int, gold_rate: float = 0.0,
                  scale: Optional[tuple[int, int]] = None, guideline: str = "v1", source: Optional[dict] = None,
                  items: Sequence[dict] = ()) -> Batch:
        """Create a batch and its ``items`` (each the keyword arguments of :meth:`add_item`: prompt, responses,
        category, gold) in ONE transaction: a failure at any item leaves no trace of the batch."""
        if task not in TASKS:
            raise UserError(f"task {task!r}: expected one of {', '.join(TASKS)}")
        if overlap < 1 or not 0 <= gold_rate < 1:
            raise UserError(f"need overlap >= 1 and gold rate in [0, 1); got {overlap}, {gold_rate}")
        if task == "likert" and scale is None:
            raise UserError("a likert batch needs a scale, e.g. --likert 1,7")
        with self.write():
            try:
                cur = self.db.execute(
                    "INSERT INTO batches (name, task, overlap, gold_rate, scale_lo, scale_hi, guideline, source, "
                    "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, task, overlap, gold_rate, *(scale or (None, None)), guideline, json.dumps(source or {}),
                     time.time()))
            except sqlite3.IntegrityError:
                raise UserError(f"a batch named {name!r} exists already") from None
            batch = Batch(cur.lastrowid, name, task, overlap, gold_rate, scale, guideline, source or {})
            for item in items:
                self._insert_item(batch, **item)
        return self.batch(name)

    def _batch(self, row) -> Batch:
        scale = (row["scale_lo"], row["scale_hi"]) if row["scale_lo"] is not None else None
        return Batch(row["id"], row["name"], row["task"], row["overlap"], row["gold_rate"], scale, row["guideline"],
                     json.loads(row["source"]))

    def batch(self, name: str) -> Batch:
        row = self.db.execute("SELECT * FROM batches WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UserError(f"no batch named {name!r} in {self.path}")
        return self._batch(row)

    def batches(self) -> list[Batch]:
        return [self._batch(r) for r in self.db.execute("SELECT * FROM batches ORDER BY id")]

    def add_item(self, batch: Batch, prompt: str, responses: list[dict], *, category: str = "", gold=None) -> int:
        """Add an item to an existing batch; ``gold`` (a valid answer) makes it a gold item."""
        with self.write():
            return self._insert_item(batch, prompt, responses, category=category, gold=gold)

    def _insert_item(self, batch: Batch, prompt: str, responses: list[dict], *, category: str = "",
                     gold=None, created_by: Optional[int] = None) -> int:
        """The INSERT of :meth:`add_item`, inside the caller's transaction."""
        if not responses or (batch.task == "rank" and len(responses) < 2):
            raise UserError(f"batch {batch.name}: a {batch.task} item needs {'2' if batch.task == 'rank' else '1'} "
                            f"or more responses, got {len(responses)}")
        if gold is not None:
            try:
                check_value(batch.task, gold, len(responses), batch.scale)
            except ValueError as e:
                raise UserError(f"gold answer {gold!r} of {prompt[:40]!r}: {e}") from None
        return self.db.execute(
            "INSERT INTO items (batch_id, prompt, category, responses, gold, ready, created_by) "
            "VALUES (?, ?, ?, ?, ?, 1, ?)",
            (batch.id, prompt, category, json.dumps(responses), None if gold is None else json.dumps(gold),
             created_by)).lastrowid

    def _item(self, row) -> Item:
        return Item(row["id"], row["batch_id"], row["prompt"], row["category"], json.loads(row["responses"]),
                    None if row["gold"] is None else json.loads(row["gold"]))

    def items(self, batch: Batch) -> list[Item]:
        return [self._item(r) for r in self.db.execute("SELECT * FROM items WHERE batch_id = ? ORDER BY id",
                                                        (batch.id,))]

    # -- hand-out ------------------------------------------------------------------------------------------------------

    def next_assignment(self, rater: Rater, batch: Batch) -> Optional[int]:
        """The assignment the rater works on next in ``batch`` (module docstring), or None when nothing is left."""
        now = time.time()
        with self.write():
            row = self.db.execute(
                "SELECT a.id FROM assignments a JOIN items i ON i.id = a.item_id "
                "WHERE a.rater_id = ? AND i.batch_id = ? AND a.done IS NULL ORDER BY a.id LIMIT 1",
                (rater.id, batch.id)).fetchone()
            if row:
                return row[0]
            unseen = "NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.rater_id = :rater)"
            item = None
            if batch.gold_rate > 0 and self.rng.random() < batch.gold_rate:
                item = self.db.execute(f"SELECT i.id, i.responses FROM items i WHERE i.batch_id = :batch AND "
                                       f"i.gold IS NOT NULL AND {unseen} ORDER BY i.id LIMIT 1",
                                       {"batch": batch.id, "rater": rater.id}).fetchone()
            if item is None:
                taken = ("(SELECT count(*) FROM assignments a WHERE a.item_id = i.id "
                         "AND (a.done IS NOT NULL OR a.created > :fresh))")
                item = self.db.execute(
                    f"SELECT i.id, i.responses FROM items i WHERE i.batch_id = :batch AND i.gold IS NULL AND i.ready "
                    f"AND {unseen} AND {taken} < :overlap ORDER BY {taken} DESC, i.id LIMIT 1",
                    {"batch": batch.id, "rater": rater.id, "fresh": now - self.lease_s,
                     "overlap": batch.overlap}).fetchone()
            if item is None:
                return None
            order = list(range(len(json.loads(item["responses"]))))
            self.rng.shuffle(order)
            cur = self.db.execute("INSERT INTO assignments (item_id, rater_id, shown_order, created, shown) "
                                  "VALUES (?, ?, ?, ?, ?)", (item["id"], rater.id, json.dumps(order), now, now))
            return cur.lastrowid

    def assignment(self, assignment_id: int, rater: Rater, *, showing: bool = False) -> Assignment:
        """The rater's assignment; PermissionError when it is someone else's, KeyError when there is none.
        ``showing`` records that the page is shown now (the label's time is counted from the last showing)."""
        row = self.db.execute(
            "SELECT a.*, l.value FROM assignments a LEFT JOIN labels l ON l.assignment_id = a.id WHERE a.id = ?",
            (assignment_id,)).fetchone()
        if row is None:
            raise KeyError(assignment_id)
        if row["rater_id"] != rater.id:
            raise PermissionError(assignment_id)
        if showing:
            with self.write():
                self.db.execute("UPDATE assignments SET shown = ? WHERE id = ?", (time.time(), assignment_id))
        item = self._item(self.db.execute("SELECT * FROM items WHERE id = ?", (row["item_id"],)).fetchone())
        batch = self._batch(self.db.execute("SELECT * FROM batches WHERE id = ?", (item.batch_id,)).fetchone())
        return Assignment(row["id"], item, batch, row["rater_id"], json.loads(row["shown_order"]),
                          row["done"] is not None, None if row["value"] is None else json.loads(row["value"]))

    def submit(self, assignment_id: int, rater: Rater, value) -> None:
        """Store (or replace) the rater's label of an assignment, committed before returning. ValueError for an
        invalid value, PermissionError for someone else's assignment."""
        a = self.assignment(assignment_id, rater)
        check_value(a.batch.task, value, len(a.item.responses), a.batch.scale)
        now = time.time()
        with self.write():
            shown = self.db.execute("SELECT shown FROM assignments WHERE id = ?", (a.id,)).fetchone()[0]
            self._insert_label(a.id, a.item.id, rater.id, a.batch, value, max(0.0, now - shown), a.order, now)

    def _insert_label(self, assignment_id: int, item_id: int, rater_id: int, batch: Batch, value, seconds: float,
                      order: list[int], now: float) -> None:
        """Store (or replace) a label and mark its assignment done, inside the caller's transaction."""
        self.db.execute(
            "INSERT INTO labels (assignment_id, item_id, rater_id, kind, value, seconds, guideline, shown_order, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (assignment_id) DO UPDATE SET "
            "value = excluded.value, seconds = excluded.seconds, guideline = excluded.guideline, "
            "created = excluded.created, edits = edits + 1",
            (assignment_id, item_id, rater_id, batch.task, json.dumps(value), seconds, batch.guideline,
             json.dumps(order), now))
        self.db.execute("UPDATE assignments SET done = coalesce(done, ?) WHERE id = ?", (now, assignment_id))

    # -- red-team chat -------------------------------------------------------------------------------------------------

    def chat(self, rater: Rater) -> int:
        """The rater's current conversation (their newest; a new one when they have none)."""
        with self.write():
            row = self.db.execute("SELECT max(id) FROM chats WHERE rater_id = ?", (rater.id,)).fetchone()
            if row[0] is not None:
                return row[0]
            return self._insert_chat(rater)

    def new_chat(self, rater: Rater) -> int:
        """Start a new conversation: it becomes the rater's current one."""
        with self.write():
            return self._insert_chat(rater)

    def _insert_chat(self, rater: Rater) -> int:
        return self.db.execute("INSERT INTO chats (rater_id, created) VALUES (?, ?)",
                               (rater.id, time.time())).lastrowid

    def _turn(self, row) -> Turn:
        return Turn(row["id"], row["chat_id"], row["role"], row["text"],
                    None if row["ended"] is None else bool(row["ended"]), json.loads(row["source"] or "{}"),
                    row["flag"], row["item_id"])

    def turns(self, chat_id: int, rater: Rater) -> list[Turn]:
        """The conversation's turns in order; PermissionError when it is someone else's, KeyError when there is
        none."""
        self._own_chat(chat_id, rater)
        return [self._turn(r) for r in self.db.execute("SELECT * FROM turns WHERE chat_id = ? ORDER BY id",
                                                         (chat_id,))]

    def _own_chat(self, chat_id: int, rater: Rater) -> None:
        row = self.db.execute("SELECT rater_id FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise KeyError(chat_id)
        if row[0] != rater.id:
            raise PermissionError(chat_id)

    def add_turn(self, chat_id: int, rater: Rater, role: str, text: str, *, ended: Optional[bool] = None,
                 source: Optional[dict] = None) -> int:
        """Append a turn to the rater's conversation, committed before returning. Turns alternate, starting with
        the rater's: ValueError (for the rater) otherwise, or for an empty attack."""
        if role == "rater" and not text.strip():
            raise ValueError("type your message first")
        with self.write():
            self._own_chat(chat_id, rater)
            last = self.db.execute("SELECT role FROM turns WHERE chat_id = ? ORDER BY id DESC LIMIT 1",
                                   (chat_id,)).fetchone()
            expected = "policy" if last is not None and last[0] == "rater" else "rater"
            if role != expected:
                raise ValueError(f"the conversation waits for a {expected} turn, not a {role} turn")
            return self.db.execute(
                "INSERT INTO turns (chat_id, role, text, ended, source, created) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, role, text, None if ended is None else int(ended),
                 None if source is None else json.dumps(source), time.time())).lastrowid

    def flag_turn(self, turn_id: int, rater: Rater, category: str, batch: Batch) -> int:
        """Flag a policy reply of the rater's conversation as ``category`` (one of FAILURES): in one transaction, an
        item of the flag batch ``batch`` (prompt: the conversation up to the reply; response: the reply, with its
        provenance) and the rater's own label on it. Returns the item id. KeyError / PermissionError as
        :meth:`turns`; ValueError (for the rater) for another kind of turn, a category not in FAILURES, a reply
        flagged already."""
        if category not in FAILURES:
            raise ValueError(f"choose a failure: one of {', '.join(FAILURES)}")
        if batch.task != "flag":
            raise ValueError(f"batch {batch.name} is a {batch.task} batch, not a flag batch")
        with self.write():
            row = self.db.execute("SELECT * FROM turns WHERE id = ?", (turn_id,)).fetchone()
            if row is None:
                raise KeyError(turn_id)
            turn = self._turn(row)
            conversation = self.turns(turn.chat_id, rater)
            if turn.role != "policy":
                raise ValueError("only the policy's replies can be flagged")
            if turn.flag is not None:
                raise ValueError(f"this reply is flagged already (as {turn.flag})")
            before = [t for t in conversation if t.id < turn.id]
            response = {"text": turn.text, "policy": turn.source.get("policy", ""), "ended": turn.ended,
                        "chat": turn.chat_id, "turn": turn.id, "turns_before": len(before), "attacker": rater.name,
                        "sampling": turn.source}
            item_id = self._insert_item(batch, chat_prompt(before), [response], category="redteam-chat",
                                        created_by=rater.id)
            now = time.time()
            assignment_id = self.db.execute(
                "INSERT INTO assignments (item_id, rater_id, shown_order, created, shown) VALUES (?, ?, '[0]', ?, ?)",
                (item_id, rater.id, row["created"], row["created"])).lastrowid
            self._insert_label(assignment_id, item_id, rater.id, batch, [category], now - row["created"], [0], now)
            self.db.execute("UPDATE turns SET flag = ?, item_id = ? WHERE id = ?", (category, item_id, turn_id))
            return item_id

    # -- reading labels ------------------------------------------------------------------------------------------------

    def labels(self, batch: Batch, rater: Optional[Rater] = None) -> list[dict]:
        """Every label of a batch (or of one rater in it): item id, rater name, value, seconds, edits, gold."""
        query = ("SELECT l.*, r.name AS rater, i.gold FROM labels l JOIN items i ON i.id = l.item_id "
                 "JOIN raters r ON r.id = l.rater_id WHERE i.batch_id = ?")
        args = [batch.id]
        if rater is not None:
            query += " AND l.rater_id = ?"
            args.append(rater.id)
        return [{"id": row["id"], "assignment": row["assignment_id"], "item": row["item_id"], "rater": row["rater"],
                 "value": json.loads(row["value"]), "seconds": row["seconds"], "edits": row["edits"],
                 "guideline": row["guideline"], "shown_order": json.loads(row["shown_order"]),
                 "gold": None if row["gold"] is None else json.loads(row["gold"])}
                for row in self.db.execute(query + " ORDER BY l.id", args)]

    def progress(self, batch: Batch) -> dict:
        """Items, complete items (R labels), labels, and labels per rater, of a batch."""
        one = self.db.execute(
            "SELECT count(*), coalesce(sum(n >= :overlap), 0), coalesce(sum(n), 0) FROM (SELECT (SELECT count(*) "
            "FROM labels l WHERE l.item_id = i.id) AS n FROM items i WHERE i.batch_id = :batch AND i.gold IS NULL "
            "AND i.ready)", {"batch": batch.id, "overlap": batch.overlap}).fetchone()
        per_rater = dict(self.db.execute(
            "SELECT r.name, count(*) FROM labels l JOIN items i ON i.id = l.item_id JOIN raters r ON "
            "r.id = l.rater_id WHERE i.batch_id = ? GROUP BY r.name ORDER BY r.name", (batch.id,)).fetchall())
        return {"items": one[0], "complete": one[1], "labels": one[2], "per_rater": per_rater}


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
