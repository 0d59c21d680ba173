"""The layers of the project: the scripts (train_sft.py, train_rm.py, train_ppo.py, redteam.py) on top, the library
minirlhf/ below them, kernels/ at the bottom. No module of the library or of the kernels imports a script, at the top of
the file or inside a function: the library is what the scripts share, and a script is run, never imported (the demo
runs them as commands)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("*.py")} - {"setup"}  # train_sft, train_rm, train_ppo, redteam


def imported_modules(path: pathlib.Path) -> set[str]:
    """The top-level names of every module ``path`` imports (``import a.b``, ``from a.b import c`` -> "a")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_or_kernel_module_imports_a_script():
    files = sorted(ROOT.glob("minirlhf/**/*.py")) + sorted(ROOT.glob("kernels/**/*.py"))
    assert any(p.parts[-2:] == ("demo", "pipeline.py") for p in files)  # the walk reaches subpackages
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & SCRIPTS) for p in files}
    assert {p: s for p, s in offenders.items() if s} == {}


def test_imported_modules_sees_imports_inside_functions(tmp_path):
    """The check itself can fail: an import hidden in a function body counts."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from train_ppo import reference_logprobs\n    import redteam.x\n")
    assert imported_modules(module) & SCRIPTS == {"train_ppo", "redteam"}
