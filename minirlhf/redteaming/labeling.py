"""Human feedback at the keyboard: one person red-teams a policy and labels its outputs, over plain stdin/stdout.

How the human data of RLHF is made (InstructGPT, Ouyang et al. 2022; Stiennon et al. 2020): people write the ideal
response to a prompt (demonstrations, for SFT), rank several model responses from best to worst, or score one on a
Likert scale (for the reward model), and red-teamers flag the outputs that fail (human red teaming as in Ganguli et
al. 2022, "Red Teaming Language Models to Reduce Harms"). This loop does all of it:

    for each prompt (the next one of a set -- or one the person types):
        show K sampled responses (with --compare, K from each policy, shuffled: the person does not see which is which)
        1. flag failures          "2" or "1=insult 3"  -> failures.jsonl        {"policy", "category", "judge": "human",
                                                                                 ..., "prompt", "output"}
        2. rank them, best first  "2 1 3"              -> preferences.jsonl     {"prompt", "responses", "ranking"}
           or, with --likert lo,hi, score each one     -> preferences.jsonl     {"prompt", "response", "score"}
        3. write the ideal response (optional)         -> demonstrations.jsonl  {"prompt", "response"}
        the prompt is recorded as done                 -> done_prompts.jsonl

``demonstrations.jsonl`` is read by ``train_sft.py --data``, ``preferences.jsonl`` by ``train_rm.py --data`` (rankings
as they are; Likert scores carry their ``"scale"``, which train_rm.py reads). Every label is appended and flushed the moment it is
entered, so Ctrl-C, the end of the input or a crash loses nothing; rerunning with the same output directory resumes:
prompts of the set already done (labelled or skipped) are not shown again. A prompt interrupted halfway keeps the
labels entered for it and comes back on resume with the very responses shown before (``shown_prompts.jsonl`` keeps
every prompt's responses when they are shown, and which of its questions were answered), asking only the questions
not answered yet: a flag or score already saved always refers to an output the person saw, and none is asked twice.

At every question: ``?`` shows the help, ``:skip`` moves on to the next prompt, ``:quit`` (or end of input) stops.
Typed text may contain ``\\n`` for a line break. An ideal response is appended to the prompt with a space between
them unless either side already has one (the shared tokenization concatenates prompt and response as they are).
A prompt longer than the model's context allows is sampled without its first tokens, and the session says how many.
The session reads plain lines, so it can be scripted or replayed from a file (``python redteam.py --mode human ... <
answers.txt``: one answer per line, in the order the questions come).
"""
import re
from typing import Callable, Optional, TextIO

from minirlhf.redteaming.attacks import Attack
from minirlhf.config import UserError
from minirlhf.data import iter_jsonl, write_jsonl
from minirlhf.redteaming.judges import Sample

FILES = {"failure": "failures.jsonl", "preference": "preferences.jsonl", "demonstration": "demonstrations.jsonl",
         "done": "done_prompts.jsonl"}
SHOWN = "shown_prompts.jsonl"  # {"prompt", "samples"} when responses are shown; {"prompt", "answered": question} after

HELP = """\
Commands (at any question):  ?  this help    :skip  next prompt    :quit  stop (everything entered is saved)
Prompt:        Enter labels the prompt shown; any other text is a prompt of your own to try instead.
Failures:      numbers of the responses that fail, each optionally with a category: "2" or "1=insult 3".
Ranking:       all response numbers, best first: "2 1 3". Likert: one whole number on the scale, high = good.
Ideal answer:  the response the model should have given, on one line (\\n for a line break).
Any question but the prompt can be left empty with Enter."""

SHOW_CHARS = 400  # longer prompts are shown shortened, saying how much is hidden


class Quit(Exception):
    """The person typed :quit, or the input ended."""


class Skip(Exception):
    """The person typed :skip."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing answers (each raises ValueError with the message to show)


def parse_likert(text: str) -> Optional[tuple[int, int]]:
    """``"1,7"`` -> (1, 7); ``""`` -> None (rank instead)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"--likert {text!r}: expected two whole numbers 'low,high' with low < high, e.g. '1,7'")
    return int(m.group(1)), int(m.group(2))


def parse_flags(line: str, n: int, default_category: str) -> list[tuple[int, str]]:
    """``"1=insult 3"`` -> [(0, "insult"), (2, default_category)]."""
    flags = {}
    for item in line.split():
        number, _, category = item.partition("=")
        if not number.isdigit() or not 1 <= int(number) <= n:
            raise ValueError(f"{item!r}: give response numbers from 1 to {n}, optionally with =category")
        flags[int(number) - 1] = category or default_category
    return list(flags.items())


def parse_ranking(line: str, n: int) -> list[int]:
    """``"2 1 3"`` (1-based, best first) -> [1, 0, 2]."""
    items = line.replace(",", " ").split()
    if sorted(items) != sorted(str(i) for i in range(1, n + 1)):
        raise ValueError(f"{line!r}: list each response number 1..{n} exactly once, best first (e.g. "
                         f"{' '.join(str(i) for i in range(n, 0, -1))})")
    return [int(i) - 1 for i in items]


def parse_score(line: str, scale: tuple[int, int]) -> int:
    lo, hi = scale
    if not re.fullmatch(r"-?\d+", line.strip()) or not lo <= int(line) <= hi:
        raise ValueError(f"{line!r}: give a whole number from {lo} to {hi}")
    return int(line)


def join_response(prompt: str, text: str) -> str:
    """The typed ideal response as stored: a space before it unless the prompt ends or the text starts with
    whitespace (or the prompt is empty)."""
    return text if not prompt or prompt[-1].isspace() or text[:1].isspace() else " " + text


# ---------------------------------------------------------------------------------------------------------------------
# The session


class Session:
    def __init__(self, out_dir, respond: Callable[[str], list[Sample]], *, likert: Optional[tuple[int, int]],
                 stdin: TextIO, stdout: TextIO):
        self.paths = {kind: out_dir / name for kind, name in FILES.items()}
        self.shown_path = out_dir / SHOWN
        self.respond, self.likert, self.stdin, self.stdout = respond, likert, stdin, stdout
        self.counts = dict.fromkeys(FILES, 0)
        self.pending: dict[str, tuple[list[Sample], set[str]]] = {}  # shown, not done: prompt -> (samples, answered)

    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def ask(self, question: str, parse: Optional[Callable[[str], object]] = None):
        """Ask until ``parse`` accepts the answer (an empty answer is None); without ``parse``, return the line as
        typed. Handles ?, :skip, :quit and the end of input."""
        while True:
            self.say(question)
            self.stdout.write("> ")
            self.stdout.flush()
            line = self.stdin.readline()
            if not line:
                raise Quit
            line = line.rstrip("\r\n").replace("\\n", "\n")
            command = line.strip()
            if command == "?":
                self.say(HELP)
            elif command == ":quit":
                raise Quit
            elif command == ":skip":
                raise Skip
            elif parse is None:
                return line
            elif not command:
                return None
            else:
                try:
                    return parse(line)
                except ValueError as e:
                    self.say(f"  {e}")

    def save(self, kind: str, record: dict) -> None:
        write_jsonl(self.paths[kind], [record], append=True)  # appended and flushed now: nothing waits in memory
        self.counts[kind] += 1

    def note(self, record: dict) -> None:
        write_jsonl(self.shown_path, [record], append=True)

    def load_pending(self, done: set[str]) -> None:
        """The prompts shown but not done in an earlier session: their samples and the questions answered."""
        if not self.shown_path.exists():
            return
        for _, r in iter_jsonl(self.shown_path):
            if "samples" in r:
                self.pending[r["prompt"]] = ([Sample(**s) for s in r["samples"]], set())
            elif r["prompt"] in self.pending:
                self.pending[r["prompt"]][1].add(r["answered"])
        for prompt in done:
            self.pending.pop(prompt, None)

    def label(self, attack: Attack) -> None:
        """Show the responses to one prompt and collect its labels (each saved as soon as it is entered). A prompt
        left halfway in an earlier session shows its earlier responses and asks only what was not answered."""
        if attack.prompt in self.pending:
            samples, answered = self.pending.pop(attack.prompt)
            self.say("(resumed: the responses shown before; questions answered then are not asked again)")
        else:
            sampled = self.respond(attack.prompt)
            samples, answered = list({s.output: s for s in sampled}.values()), set()  # one per distinct text
            if len(samples) < len(sampled):
                self.say(f"({len(sampled)} responses sampled, {len(samples)} distinct: duplicates are shown once)")
            self.note({"prompt": attack.prompt, "samples": [s.__dict__ for s in samples]})
        cut = max(s.prompt_truncated for s in samples) if samples else 0
        if cut:
            self.say(f"(the prompt is longer than the model's context allows: it saw the prompt without its first "
                     f"{cut} tokens)")

        for i, s in enumerate(samples, 1):
            note = "" if s.ended else f"   [no EOS: cut at {len(s.output_ids)} tokens]"
            self.say(f"--- response {i}{note}")
            self.say("\n".join("    " + line for line in (s.output or "(empty)").split("\n")))
        n = len(samples)

        def done_with(question: str) -> None:
            self.note({"prompt": attack.prompt, "answered": question})

        if "failures" not in answered:
            flags = self.ask("Failures? response numbers, optionally =category (e.g. '2' or '1=insult 3'); Enter = "
                             "none", lambda line: parse_flags(line, n, attack.category)) or []
            for i, category in flags:
                self.save("failure", {"policy": samples[i].policy, "category": category, "judge": "human",
                                      "score": 1.0, "reason": "flagged by a person", "prompt": attack.prompt,
                                      "output": samples[i].output})
            done_with("failures")

        if self.likert is not None:
            lo, hi = self.likert
            for i, s in enumerate(samples, 1):
                if f"score {i}" in answered:
                    continue
                score = self.ask(f"Score response {i} from {lo} to {hi} ({hi} = best); Enter = no score",
                                 lambda line: parse_score(line, self.likert))
                if score is not None:
                    self.save("preference", {"prompt": attack.prompt, "response": s.output, "score": score,
                                             "scale": [lo, hi], "category": attack.category, "policy": s.policy})
                done_with(f"score {i}")
        elif n >= 2:
            if "ranking" not in answered:
                ranking = self.ask("Rank the responses, best first (e.g. '2 1'); Enter = no ranking",
                                   lambda line: parse_ranking(line, n))
                if ranking is not None:
                    self.save("preference", {"prompt": attack.prompt, "responses": [s.output for s in samples],
                                             "ranking": ranking, "category": attack.category,
                                             "policies": [s.policy for s in samples]})
                done_with("ranking")
        else:
            self.say("(only one distinct response: nothing to rank)")

        ideal = self.ask("Ideal response (one line, \\n = line break); Enter = none", str)
        if ideal is not None:
            self.save("demonstration", {"prompt": attack.prompt, "response": join_response(attack.prompt, ideal),
                                        "category": attack.category})

    def run(self, prompts: list[Attack]) -> dict[str, int]:
        done = {r["prompt"] for _, r in iter_jsonl(self.paths["done"])} if self.paths["done"].exists() else set()
        self.load_pending(done)
        todo = [a for a in prompts if a.prompt not in done]
        out_dir = self.paths["done"].parent
        self.say(f"Labelling {len(todo)} prompts" + (f" ({len(prompts) - len(todo)} already done in {out_dir})"
                                                     if len(todo) < len(prompts) else "") + ". Type ? for help.")
        self.say(f"Labels are saved as you go in {out_dir}/: demonstrations.jsonl (for train_sft.py), "
                 "preferences.jsonl (for train_rm.py), failures.jsonl, done_prompts.jsonl and shown_prompts.jsonl (for "
                 "resuming)")
        position = 0
        try:
            while True:
                if position < len(todo):
                    attack = todo[position]
                    self.say(f"\n=== prompt {position + 1} of {len(todo)} (category {attack.category})")
                    self.say(show(attack.prompt))
                    try:
                        typed = self.ask("Enter = label this prompt; or type a prompt of your own")
                    except Skip:
                        self.save("done", {"prompt": attack.prompt, "category": attack.category, "status": "skipped"})
                        position += 1
                        continue
                    if not typed.strip():
                        position += 1
                    else:
                        attack = Attack(typed, "own", "typed")
                        self.say(f"\n=== your prompt (the set's prompt {position + 1} comes back next)")
                        self.say(show(attack.prompt))
                else:
                    self.say("\n=== no prompts left in the set")
                    try:
                        typed = self.ask("Type a prompt of your own (:quit to stop)")
                    except Skip:
                        continue
                    if not typed.strip():
                        continue
                    attack = Attack(typed, "own", "typed")
                status = "labelled"
                try:
                    self.label(attack)
                except Skip:
                    status = "skipped"
                self.save("done", {"prompt": attack.prompt, "category": attack.category, "status": status})
        except (Quit, KeyboardInterrupt) as stop:
            self.say(f"\nSaved in {out_dir}: {self.counts['failure']} failures, {self.counts['preference']} "
                     f"rankings/scores, {self.counts['demonstration']} demonstrations. Rerun the same command to "
                     "resume.")
            if isinstance(stop, KeyboardInterrupt):
                raise
        return self.counts


def show(prompt: str) -> str:
    """A prompt as displayed: quoted when empty or blank, shortened (saying so) when very long."""
    if not prompt.strip():
        return f"(blank prompt: {prompt!r})"
    if len(prompt) > SHOW_CHARS:
        return prompt[:SHOW_CHARS // 2] + f" [... {len(prompt) - SHOW_CHARS} characters not shown ...] " + \
            prompt[-SHOW_CHARS // 2:]
    return prompt


def label(prompts: list[Attack], respond: Callable[[str], list[Sample]], out_dir, *,
          likert: Optional[tuple[int, int]] = None, stdin: TextIO, stdout: TextIO) -> dict[str, int]:
    """Run an interactive labelling session over ``prompts`` (then prompts the person types) until :quit or the end
    of the input. ``respond(prompt)`` returns the samples to show. Returns how many records of each kind were saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return Session(out_dir, respond, likert=likert, stdin=stdin, stdout=stdout).run(prompts)
