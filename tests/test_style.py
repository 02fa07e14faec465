"""The house rules a reader relies on that ruff does not check: no function in mea/ runs past 60 lines unless a
comment on its first line says why (`# long because ...`)."""
import ast
from pathlib import Path

MEA = Path(__file__).resolve().parents[1] / "mea"
LONGEST = 60


def long_functions(source: str) -> list[str]:
    lines = source.splitlines()
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > LONGEST
            and "# long because" not in lines[node.lineno - 1]]


def test_the_check_finds_a_long_function_and_accepts_one_that_says_why():
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST))
    assert long_functions(f"def f():\n{body}") == [f"f ({LONGEST + 1} lines)"]
    assert long_functions(f"def f():  # long because one table is one block\n{body}") == []
    assert long_functions(f"def f():\n{body[:-len(body.splitlines()[-1]) - 1]}") == []


def test_no_function_in_mea_is_longer_than_60_lines_unless_it_says_why():
    found = {str(path.relative_to(MEA.parent)): long for path in sorted(MEA.rglob("*.py")) if (long := long_functions(path.read_text()))}
    assert not found, f"split these, or say why on the def line: {found}"
