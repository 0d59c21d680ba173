"""Configuration for the scripts: one ``@dataclass`` per script turned into argparse flags, and one error type for
mistakes in the user's input.

Every field of a config dataclass is declared with :func:`option`, whose ``help`` becomes the flag's ``--help`` text, so
the dataclass is the single place a setting is named, typed, defaulted and explained::

    @dataclass
    class Config:
        \"\"\"Train a reward model.\"\"\"          # becomes the --help description
        lr: float = option(1e-5, "peak learning rate of AdamW")
        bf16: bool = option(True, "bf16 autocast on CUDA")   # --bf16 / --no-bf16

    if __name__ == "__main__":
        run(main, Config)                        # parse, call main(cfg), print UserError as one line, exit 2

A :class:`UserError` is for what the user can fix (a missing file, a bad record, a wrong flag): the CLI prints it as a
single line and exits non-zero, without a traceback. Bugs still raise ordinary exceptions with their traceback.
"""
import argparse
import dataclasses
import importlib
import importlib.util
import os
import pathlib
import sys
import typing
from typing import Any, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input (path, data, flag), or a fault the program detected and explains. Shown as one
    line by :func:`run`; exit status ``exit_code``."""

    exit_code = 2


def option(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None, group: Optional[str] = None) -> Any:
    """A dataclass field with its ``--help`` text, optional choices, and the ``--help`` group it is listed under
    (fields without one are listed first, as the essentials)."""
    metadata = {"help": help, "choices": choices, "group": group}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> Any:
    """``Optional[int]`` -> int; other annotations unchanged."""
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except an empty one (a required path, an optional list): "(default: )" says
    nothing."""

    def _get_help_string(self, action):
        if action.default in ("", None) or action.default == []:
            return action.help
        return super()._get_help_string(action)


LAST_GROUP = "run"  # the run layer's flags (output folder, resume, seed, device) close every --help


def build_parser(cls: type, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (``field_name`` -> ``--field-name``)."""
    required = [f for f in dataclasses.fields(cls) if f.metadata.get("help", "").startswith("(required)")]
    usage = " ".join(["%(prog)s", *(f"--{f.name.replace('_', '-')} {f.name.upper()}" for f in required), "[options]"])
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=(cls.__doc__ or "").strip(),
                                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    names = dict.fromkeys(f.metadata.get("group") for f in dataclasses.fields(cls))  # in order of appearance
    order = [None] + [n for n in names if n not in (None, LAST_GROUP)] + [n for n in names if n == LAST_GROUP]
    groups = {n: parser.add_argument_group(n or "essentials") for n in order}
    for f in dataclasses.fields(cls):
        group = groups[f.metadata.get("group")]
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=default, help=help_text,
                               action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            group.add_argument(flag, dest=f.name, default=default, help=help_text, type=item, nargs="*")
        else:
            group.add_argument(flag, dest=f.name, default=default, help=help_text, type=kind,
                                choices=f.metadata.get("choices"))
    return parser


def parse_args(cls: type[T], argv: Optional[Sequence[str]] = None) -> T:
    """Parse command-line flags into an instance of the config dataclass ``cls``. Run as ``python -m package.module``,
    the usage line says so (argparse alone would name the file, ``generate.py``); a package run this way is named, not
    its ``__main__.py``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None else "__main__"
    prog = f"python -m {name}" if argv is None and name != "__main__" else None
    namespace = build_parser(cls, prog).parse_args(argv)
    return cls(**vars(namespace))


def run(main: Callable[[T], Any], cls: type[T], argv: Optional[Sequence[str]] = None) -> Any:
    """Entry point of every script: parse flags, call ``main(cfg)``; a :class:`UserError` is printed as one line and
    the process exits with its ``exit_code`` (2; a run stopped by a signal 128 + its number, after saving: see
    :mod:`minirlhf.run`). Ctrl-C before a run began exits with 130; a closed output pipe with 141, quietly."""
    cfg = parse_args(cls, argv)
    try:
        return main(cfg)
    except UserError as e:
        print(f"{'error: ' if e.exit_code == 2 else ''}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout piped into a reader that stopped early (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(141)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as a plain JSON-able dict (stored in checkpoints)."""
    return dataclasses.asdict(cfg)


def load_function(spec: str, flag: str) -> Callable:
    """A user's Python function named on the command line as ``module:function`` (importable from the current
    directory or PYTHONPATH) or ``path/to/file.py:function``, e.g. ``--reward my_rewards:positivity``. Errors name
    ``flag``."""
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise UserError(f"{flag} {spec!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = pathlib.Path(module_name)
            if not path.is_file():
                raise UserError(f"{flag} {spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # user modules live where the user runs, not beside the script
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{flag} {spec}: cannot import {module_name} ({e})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {module_name} has no function {fn_name!r}")
    return fn
