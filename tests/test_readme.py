"""The README stays true: every command it shows parses with its script's own parser (no renamed or removed flag), and
every row of its equation index names code and tests that exist. The commands themselves run in the subprocess tests
(test_matrix.py, test_learn.py, test_sample.py, ...); this module only keeps the text from drifting away from them."""
import ast
import importlib
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUATIONS = os.path.join(ROOT, "..", "shared", "EQUATIONS.md")


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def commands():
    """(script, argv) of every `python X.py ...` line in the README's code blocks, comments and env prefixes dropped."""
    found, inside = [], False
    for line in readme().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
                found.append((words[1], words[2:]))
    return found


def parser_of(script):
    sys.path.insert(0, os.path.join(ROOT, os.path.dirname(script)))
    try:
        module = importlib.import_module(os.path.basename(script)[:-3])
    finally:
        sys.path.pop(0)
    return module.build_parser() if hasattr(module, "build_parser") else None


def test_the_readme_shows_the_commands_a_user_takes():
    scripts = {script for script, _ in commands()}
    assert {"train.py", "sample.py", "evaluate.py", "figures.py", "toy2d.py"} <= scripts, scripts
    assert ("train.py", ["--dataset", "cifar10"]) in commands()  # the main job, verbatim
    assert ("train.py", ["--recipe", "digits"]) in commands()


@pytest.mark.parametrize("script,argv", commands(), ids=lambda c: c if isinstance(c, str) else " ".join(c)[:60])
def test_every_readme_command_parses(script, argv):
    assert os.path.isfile(os.path.join(ROOT, script)), script
    parser = parser_of(script)
    if parser is None:  # a script with positional files only (benchmarks/digits_score.py)
        return
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # an unknown or renamed flag: argparse's exit 2
        pytest.fail(f"README: python {script} {' '.join(argv)} no longer parses (exit {e.code})")


# ----------------------------------------------------------------------------------------------------------------
# The equation index
# ----------------------------------------------------------------------------------------------------------------

def index_rows():
    text = readme()
    table = text[text.index("## Equation index"):]
    table = table[:table.index("\n## ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| id ")]


def references(cell):
    """(file, name or None) of each `file.py:name` / `name` / `file.py` in a cell; a bare name belongs to the last
    file (and class) named before it; flags and calls (`train.py --task ddgan`, `f(order=1)`) keep only the name."""
    out, file, owner = [], None, None
    for ref in re.findall(r"`([^`]+)`", cell):
        ref = ref.split(" ")[0].split("(")[0]
        if ref.startswith("--"):
            continue
        if ".py" in ref:
            file, _, name = ref.partition(":")
            owner = name.rsplit(".", 1)[0] if "." in name else None
        else:
            name = f"{owner}.{ref}" if owner else ref
        out.append((file, name or None))
    return out


def test_the_index_covers_every_equation_id():
    rows = index_rows()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) and len(ids) >= 40, ids
    if not os.path.isfile(EQUATIONS):
        pytest.skip("../shared/EQUATIONS.md is not beside this checkout")
    with open(EQUATIONS) as f:
        wanted = set(re.findall(r"^\s*-\s+\*\*([A-Z]{1,2}\d+)\b", f.read(), flags=re.M))
    assert wanted and wanted <= set(ids), sorted(wanted - set(ids))


def test_every_index_row_names_code_that_exists():
    sys.path.insert(0, ROOT)
    for row in index_rows():
        refs = references(row[2])
        assert refs, row
        for file, name in refs:
            assert os.path.isfile(os.path.join(ROOT, file)), (row[0], file)
            if name is None:
                continue
            module = importlib.import_module(file[:-3])
            # a bare name after `file.py:Class.method` is the class's, or else the module's
            for candidate in (name, name.rsplit(".", 1)[-1]):
                obj = module
                for part in candidate.split("."):
                    obj = getattr(obj, part, None)
                if obj is not None:
                    break
            assert obj is not None, f"{row[0]}: {file}:{name} does not exist"


def test_every_index_row_names_tests_that_exist():
    defined = {}
    for row in index_rows():
        refs = references(row[3])
        assert refs, row
        for file, name in refs:
            path = os.path.join(ROOT, "tests", file)
            assert os.path.isfile(path), (row[0], file)
            if file not in defined:
                with open(path) as f:
                    defined[file] = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
            assert name is None or name in defined[file], f"{row[0]}: tests/{file}:{name} does not exist"
