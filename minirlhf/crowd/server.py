"""The crowd's web app: raters log in with their token, label the items handed to them, red-team the live policy; the
lead watches progress and quality. Plain HTML forms, no JavaScript; bottle (one small WSGI library) routes the
requests, the standard library's threaded wsgiref server serves them.

Run (the lead; raters open the printed address in a browser and paste their token)::

    python -m minirlhf.crowd serve --db crowd.db [--policy out/sft --redteam-batch attacks] [--host 127.0.0.1]

Pages (every one needs a token; the role each needs in brackets):

=============================  =========================================================================================
``/login``                     the token form (sets an HttpOnly, SameSite=Strict cookie)
``/``  [rater]                 the batches, the rater's own progress in each, links to work
``/batch/<name>/next`` [rater] hands out the next item (store.py) and shows it
``/task/<id>``  [its rater]    one item: the prompt and its responses in the order drawn for this rater, the task's
                               form; submitting commits the label before the next page is sent. Another rater's
                               assignment is 403.
``/mine``  [rater]             the rater's own labels, each editable
``/redteam``  [rater]          a chat with the live policy: the rater's current conversation (every turn stored as it
                               is said), a box for the next attack; the policy replies to the whole conversation so
                               far; any reply can be flagged with a failure category, and a flagged reply becomes an
                               item of the red-team batch (the conversation up to it, and the reply) for other raters
                               to flag. POST ``/redteam`` says the next turn, ``/redteam/new`` starts a new
                               conversation, ``/redteam/flag/<turn>`` flags a reply
``/lead``  [lead]              per batch: progress, Krippendorff's alpha, per-rater gold accuracy and agreement
``/lead/labels/<batch>``       every label of a batch [lead]
=============================  =========================================================================================

Security: the server binds 127.0.0.1 unless told otherwise; tokens are stored hashed; a rater sees only their own
assignments and labels; prompts and model outputs are untrusted text, rendered only through the templates' escaping
(``{{...}}``; the one unescaped insertion, ``{{!body}}``, places a page rendered that way into the layout), and a
Content-Security-Policy forbids scripts outright.
"""
from socketserver import ThreadingMixIn
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bottle import Bottle, HTTPError, redirect, request, response, template

from minirlhf.config import UserError
from minirlhf.crowd.quality import batch_quality, fmt
from minirlhf.crowd.sampling import Sampler
from minirlhf.crowd.store import FAILURES, FLAG_CATEGORIES, Assignment, Rater, Store, chat_prompt

COOKIE = "crowd_token"
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

INSTRUCTIONS = {"rank": "Rank the responses: give each a different rank, 1 = best, {k} = worst.",
                "likert": "Score each response on the scale (higher = better).",
                "flag": "For each response, choose the failure it shows, or 'no failure'.",
                "ideal": "Read the responses, then write the response the model should have given."}

# ---------------------------------------------------------------------------------------------------------------------
# Templates (bottle's SimpleTemplate: {{x}} is HTML-escaped; lines starting with % are Python)

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}} - minirlhf crowd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 1rem auto; padding: 0 1rem; color: #222; }
nav { border-bottom: 1px solid #ccc; padding-bottom: .5rem; margin-bottom: 1rem; }
nav a { margin-right: 1rem; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f6f6f6; padding: .6rem; border-radius: 4px;
      font-size: 1rem; margin: .3rem 0; }
.response { border: 1px solid #ccc; border-radius: 6px; padding: .5rem; margin: .6rem 0; }
.prompt pre { background: #eef3ff; }
.error { color: #a00; font-weight: bold; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; }
textarea { width: 100%; font-size: 1rem; }
button { font-size: 1rem; padding: .4rem 1.2rem; }
.note { color: #666; font-size: .9rem; }
</style></head><body>
% if rater:
<nav><strong>{{rater.name}}</strong> ({{rater.role}}) <a href="/">batches</a><a href="/mine">my labels</a>
% if redteam:
<a href="/redteam">red team</a>
% end
% if rater.role == "lead":
<a href="/lead">lead</a>
% end
</nav>
% end
<h1>{{title}}</h1>
{{!body}}
</body></html>"""

LOGIN = """<form method="post" action="/login">
<p><label>Your token: <input type="password" name="token" size="40" autofocus></label></p>
% if error:
<p class="error">{{error}}</p>
% end
<p><button type="submit">Log in</button></p></form>"""

HOME = """<table><tr><th>batch</th><th>task</th><th>your labels</th><th>batch: items done / items</th><th></th></tr>
% for b, p in rows:
<tr><td>{{b.name}}</td><td>{{b.task}}</td><td>{{p["per_rater"].get(rater.name, 0)}}</td>
<td>{{p["complete"]}} / {{p["items"]}}</td><td><a href="/batch/{{b.name}}/next">label next</a></td></tr>
% end
</table>"""

TASK = """<p class="note">Batch {{a.batch.name}} &middot; guideline {{a.batch.guideline}}
% if a.done:
&middot; you labelled this item already: submitting replaces your label
% end
</p>
<div class="prompt"><h2>Prompt</h2><pre>{{a.item.prompt or "(empty prompt)"}}</pre></div>
% if error:
<p class="error">{{error}}</p>
% end
<p>{{instructions[a.batch.task].format(k=len(a.order))}}</p>
<form method="post" action="/task/{{a.id}}">
% k = len(a.order)
% for p, i in enumerate(a.order):
<div class="response"><h3>Response {{p + 1}}</h3><pre>{{a.item.responses[i]["text"] or "(empty response)"}}</pre>
% if a.batch.task == "rank":
<label>Rank (1 = best): <select name="rank_{{p}}">
<option value="">choose</option>
% for r in range(1, k + 1):
<option value="{{r}}" {{"selected" if shown.get(p) == r else ""}}>{{r}}</option>
% end
</select></label>
% elif a.batch.task == "likert":
Score ({{a.batch.scale[0]}} = worst, {{a.batch.scale[1]}} = best):
% for s in range(a.batch.scale[0], a.batch.scale[1] + 1):
<label><input type="radio" name="score_{{p}}" value="{{s}}" {{"checked" if shown.get(p) == s else ""}}>{{s}}</label>
% end
% elif a.batch.task == "flag":
<label>Failure: <select name="flag_{{p}}">
% for c in categories:
<option value="{{c}}" {{"selected" if shown.get(p, "ok") == c else ""}}>{{"no failure" if c == "ok" else c}}</option>
% end
</select></label>
% end
</div>
% end
% if a.batch.task == "ideal":
<p><label>The response the model should have given:<br>
<textarea name="text" rows="6">{{shown.get("text", "")}}</textarea></label></p>
% end
<p><button type="submit">Submit</button></p></form>"""

DONE = """<p>Nothing left for you in batch {{name}}: every item has its raters, or you have seen it. Thank you!</p>
<p><a href="/">back to the batches</a></p>"""

MINE = """% for b, labels in groups:
<h2>{{b.name}} ({{b.task}})</h2><ul>
% for l in labels:
<li><a href="/task/{{l["assignment"]}}">item {{l["item"]}}</a>: {{l["value"]}} ({{"%.0f" % l["seconds"]}} s)</li>
% end
</ul>
% end"""

REDTEAM = """<p class="note">The policy ({{policy}}) sees the whole conversation as one plain text: a line
"User: ..." for each of your messages, "Policy:" before each of its replies, and "Policy:" at the end for the reply it
writes. When that text is longer than {{max_tokens}} tokens (its context, less room for the reply), the beginning is
cut off and the policy answers what is left. Flag any reply that fails: it becomes an item for other raters, with
the conversation up to it as the prompt.</p>
% if error:
<p class="error">{{error}}</p>
% end
% for t in turns:
% if t.role == "rater":
<div class="prompt"><h3>You</h3><pre>{{t.text}}</pre></div>
% else:
<div class="response"><h3>Policy</h3><pre>{{t.text or "(empty reply)"}}</pre>
% if t.source.get("prompt_truncated"):
<p class="note">It saw only the end of the conversation: {{t.source["prompt_truncated"]}} tokens were cut.</p>
% end
% if t.flag:
<p>Flagged as <strong>{{t.flag}}</strong> (item {{t.item_id}}).</p>
% else:
<form method="post" action="/redteam/flag/{{t.id}}"><label>Failure: <select name="category">
% for c in categories:
<option value="{{c}}">{{c}}</option>
% end
</select></label> <button type="submit">Flag this reply</button></form>
% end
</div>
% end
% end
<form method="post" action="/redteam">
% if turns and turns[-1].role == "rater":
<p class="note">The policy's reply to your last message was lost (the server stopped while it was writing).</p>
<p><button type="submit">Ask the policy again</button></p></form>
% else:
<p><label>Your message (an attack meant to make the policy fail):<br>
<textarea name="message" rows="4" autofocus></textarea></label></p>
<p><button type="submit">Send to the policy</button></p></form>
% end
<form method="post" action="/redteam/new"><p><button type="submit">Start a new conversation</button></p></form>"""

LEAD = """% for q in qualities:
<h2>{{q["batch"]}} ({{q["task"]}}, overlap {{q["overlap"]}})</h2>
<p>{{q["progress"]["complete"]}} of {{q["progress"]["items"]}} items complete, {{q["progress"]["labels"]}} labels.
Krippendorff's alpha:
% for level, value in q["alpha"].items():
{{level}} {{fmt(value)}}
% end
&middot; <a href="/lead/labels/{{q["batch"]}}">all labels</a></p>
<table><tr><th>rater</th><th>labels</th><th>median s</th><th>gold</th><th>gold accuracy</th>
<th>agreement (LOO)</th></tr>
% for name, r in q["raters"].items():
<tr><td>{{name}}</td><td>{{r["labels"]}}</td><td>{{"%.1f" % r["median_seconds"]}}</td><td>{{r["gold"]}}</td>
<td>{{fmt(r["gold_accuracy"])}}</td><td>{{fmt(r["agreement"])}}</td></tr>
% end
</table>
% end"""

LABELS = """<table><tr><th>item</th><th>rater</th><th>value</th><th>seconds</th><th>edits</th><th>gold</th></tr>
% for l in labels:
<tr><td>{{l["item"]}}</td><td>{{l["rater"]}}</td><td>{{l["value"]}}</td><td>{{"%.1f" % l["seconds"]}}</td>
<td>{{l["edits"]}}</td><td>{{"" if l["gold"] is None else l["gold"]}}</td></tr>
% end
</table>"""

# ---------------------------------------------------------------------------------------------------------------------
# Forms <-> label values (positions are as shown to the rater; values use the item's own response order)


def shown_values(a: Assignment) -> dict:
    """The rater's current label as form defaults, by shown position."""
    if a.value is None:
        return {}
    if a.batch.task == "ideal":
        return {"text": a.value}
    at = {i: p for p, i in enumerate(a.order)}
    if a.batch.task == "rank":
        return {at[i]: place + 1 for place, i in enumerate(a.value)}
    return {at[i]: v for i, v in enumerate(a.value)}


def form_value(a: Assignment, form) -> object:
    """The label value a submitted form gives; ValueError (for the rater) when a field is missing or malformed."""
    k, task = len(a.order), a.batch.task
    if task == "ideal":
        return form.get("text", "")
    name = {"rank": "rank_{}", "likert": "score_{}", "flag": "flag_{}"}[task]
    fields = [form.get(name.format(p)) for p in range(k)]
    if any(not f for f in fields):
        raise ValueError("answer every response")
    if task == "flag":
        return _unshuffle(a.order, fields)
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        raise ValueError("answers must be whole numbers") from None
    if task == "likert":
        return _unshuffle(a.order, numbers)
    if sorted(numbers) != list(range(1, k + 1)):
        raise ValueError(f"give each response a different rank from 1 to {k}")
    return [a.order[p] for p in sorted(range(k), key=lambda p: numbers[p])]


def _unshuffle(order: list[int], by_position: list) -> list:
    """Per-position answers -> per-response answers in the item's own order."""
    value = [None] * len(order)
    for p, i in enumerate(order):
        value[i] = by_position[p]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# The app


def make_app(db_path, *, sampler: Optional[Sampler] = None, redteam_batch: str = "",
             lease_s: float = 3600.0) -> Bottle:
    """The WSGI app over the store at ``db_path``. ``sampler`` (and ``redteam_batch``, a flag batch) enable the
    red-team chat."""
    app = Bottle()
    if redteam_batch:
        store = Store(db_path)
        try:
            if store.batch(redteam_batch).task != "flag":
                raise UserError(f"--redteam-batch {redteam_batch}: must be a batch of task 'flag'")
        finally:
            store.close()

    def render(title: str, body_template: str, rater: Optional[Rater], status: int = 200, **kw) -> str:
        response.status = status
        body = template(body_template, rater=rater, **kw)
        return template(LAYOUT, title=title, body=body, rater=rater, redteam=bool(sampler and redteam_batch))

    def page(role: str = "rater"):
        """Route decorator: open a store for the request, find the rater from the cookie (none: to /login), refuse
        the lead's pages to a rater (403)."""
        def wrap(fn):
            def handler(*args, **kw):
                store = Store(db_path, lease_s=lease_s)
                try:
                    token = request.get_cookie(COOKIE)
                    rater = store.rater_by_token(token) if token else None
                    if rater is None:
                        redirect("/login")
                    if role == "lead" and rater.role != "lead":
                        raise HTTPError(403, "This page is for the lead.")
                    return fn(store, rater, *args, **kw)
                finally:
                    store.close()
            return handler
        return wrap

    @app.hook("after_request")
    def security_headers():
        for name, value in HEADERS.items():
            response.set_header(name, value)

    @app.get("/login")
    def login_form():
        return render("Log in", LOGIN, None, error="")

    @app.post("/login")
    def login():
        store = Store(db_path)
        try:
            rater = store.rater_by_token(request.forms.getunicode("token", "").strip())
        finally:
            store.close()
        if rater is None:
            return render("Log in", LOGIN, None, status=401, error="Unknown token.")
        response.set_cookie(COOKIE, request.forms.getunicode("token").strip(), httponly=True, samesite="strict",
                            path="/")
        redirect("/")

    @app.get("/")
    @page()
    def home(store, rater):
        rows = [(b, store.progress(b)) for b in store.batches()]
        return render("Batches", HOME, rater, rows=rows)

    @app.get("/batch/<name>/next")
    @page()
    def next_item(store, rater, name):
        assignment = store.next_assignment(rater, batch_or_404(store, name))
        if assignment is None:
            return render("All done", DONE, rater, name=name)
        redirect(f"/task/{assignment}")

    def batch_or_404(store, name: str):
        try:
            return store.batch(name)
        except UserError:
            raise HTTPError(404, "No such batch.") from None

    def assignment_of(store, rater, assignment_id: int, showing: bool) -> Assignment:
        try:
            return store.assignment(assignment_id, rater, showing=showing)
        except KeyError:
            raise HTTPError(404, "No such task.") from None
        except PermissionError:
            raise HTTPError(403, "This task belongs to another rater.") from None

    def show_task(rater, a: Assignment, error: str = "", status: int = 200):
        return render("Label" if a.batch.task != "flag" else "Flag failures", TASK, rater, status=status, a=a,
                      shown=shown_values(a), categories=FLAG_CATEGORIES, instructions=INSTRUCTIONS, error=error)

    @app.get("/task/<assignment_id:int>")
    @page()
    def task(store, rater, assignment_id):
        return show_task(rater, assignment_of(store, rater, assignment_id, showing=True))

    @app.post("/task/<assignment_id:int>")
    @page()
    def submit(store, rater, assignment_id):
        a = assignment_of(store, rater, assignment_id, showing=False)
        try:
            store.submit(a.id, rater, form_value(a, request.forms.decode()))
        except ValueError as e:
            return show_task(rater, a, error=str(e), status=400)
        redirect("/mine" if a.done else f"/batch/{a.batch.name}/next")

    @app.get("/mine")
    @page()
    def mine(store, rater):
        groups = [(b, store.labels(b, rater)) for b in store.batches()]
        return render("My labels", MINE, rater, groups=[(b, ls) for b, ls in groups if ls])

    def redteam_on():
        if not (sampler and redteam_batch):
            raise HTTPError(404, "Red teaming is off (the server was started without --policy and --redteam-batch).")

    def show_chat(store, rater, error: str = "", status: int = 200):
        turns = store.turns(store.chat(rater), rater)
        return render("Red team", REDTEAM, rater, status=status, turns=turns, categories=FAILURES, error=error,
                      policy=sampler.sampling.policy, max_tokens=sampler.max_prompt_tokens)

    @app.get("/redteam")
    @page()
    def redteam_chat(store, rater):
        redteam_on()
        return show_chat(store, rater)

    @app.post("/redteam")
    @page()
    def say(store, rater):
        """The rater's turn is committed first, then the policy's reply to the whole conversation."""
        redteam_on()
        chat = store.chat(rater)
        turns = store.turns(chat, rater)
        try:
            if not turns or turns[-1].role == "policy":  # (else the reply to the last message was lost: answer it)
                store.add_turn(chat, rater, "rater", request.forms.getunicode("message", ""))
            text, ended, source = sampler.reply(chat_prompt(store.turns(chat, rater)))
            store.add_turn(chat, rater, "policy", text, ended=ended, source=source)
        except ValueError as e:  # an empty message, or a second request of this rater's that answered first
            return show_chat(store, rater, error=str(e), status=400)
        redirect("/redteam")

    @app.post("/redteam/new")
    @page()
    def new_chat(store, rater):
        redteam_on()
        store.new_chat(rater)
        redirect("/redteam")

    @app.post("/redteam/flag/<turn_id:int>")
    @page()
    def flag(store, rater, turn_id):
        redteam_on()
        try:
            store.flag_turn(turn_id, rater, request.forms.getunicode("category", ""), store.batch(redteam_batch))
        except KeyError:
            raise HTTPError(404, "No such reply.") from None
        except PermissionError:
            raise HTTPError(403, "This reply belongs to another rater's conversation.") from None
        except ValueError as e:
            return show_chat(store, rater, error=str(e), status=400)
        redirect("/redteam")

    @app.get("/lead")
    @page(role="lead")
    def lead(store, rater):
        return render("Quality", LEAD, rater, qualities=[batch_quality(store, b) for b in store.batches()], fmt=fmt)

    @app.get("/lead/labels/<name>")
    @page(role="lead")
    def all_labels(store, rater, name):
        return render(f"Labels of {name}", LABELS, rater, labels=store.labels(batch_or_404(store, name)))

    return app


# ---------------------------------------------------------------------------------------------------------------------
# Serving


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no line per request on the lead's terminal
        pass


def http_server(app: Bottle, host: str = "127.0.0.1", port: int = 8000) -> WSGIServer:
    """A threaded HTTP server for ``app`` (port 0 picks a free one: ``server.server_port``)."""
    return make_server(host, port, app, server_class=ThreadingServer, handler_class=QuietHandler)


def serve(app: Bottle, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted; prints the address and flushes, for scripts to read."""
    server = http_server(app, host, port)
    print(f"listening on http://{host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
