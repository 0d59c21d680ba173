"""``make demo``: the whole of RLHF on real human feedback, kept apart from the library it demonstrates.

* :mod:`minirlhf.demo.data` fetches and checks the human-rated movie sentences and writes the JSONL files the scripts
  read (``python -m minirlhf.demo.data``);
* :mod:`minirlhf.demo.pipeline` runs every stage as the command a user would type (``python -m train_sft ...``, one
  process per stage), judges the result and writes the report (``python -m minirlhf.demo``, see its docstring).

Nothing in the library imports this package, and this package never imports a script: it runs them.
"""
