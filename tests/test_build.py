"""BUILD declares exactly the package's modules and the test files."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _declared():
  text = (ROOT / "BUILD").read_text()
  declared = set(re.findall(r'"((?:tfg_optim|tests)/[^"%]+\.py)"', text))
  declared |= {f"tests/{name}.py"
               for name in re.findall(r'^    "(test_\w+)",$', text, re.M)}
  return declared, text


def test_build_lists_every_module_and_test():
  declared, _ = _declared()
  actual = {str(path.relative_to(ROOT))
            for folder in ("tfg_optim", "tests")
            for path in (ROOT / folder).rglob("*.py")}
  assert declared == actual


def test_every_test_module_has_a_py_test_target():
  _, text = _declared()
  listed = set(re.findall(r'^    "(test_\w+)",$', text, re.MULTILINE))
  assert listed == {path.stem for path in (ROOT / "tests").glob("test_*.py")}
