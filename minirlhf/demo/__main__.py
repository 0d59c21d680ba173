"""``python -m minirlhf.demo`` (what ``make demo`` runs): the pipeline of :mod:`minirlhf.demo.pipeline`."""
from minirlhf.config import run
from minirlhf.demo.pipeline import Config, main

run(main, Config)
