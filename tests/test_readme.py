"""The README's Python examples run as written (in a temporary folder)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = _python_blocks()[index]
    monkeypatch.chdir(tmp_path)
    ns = {}
    if "deployed = spvit.deploy(pruned)" in code:  # the deployment snippet continues the API example
        exec(compile(_python_blocks()[0], "README-api", "exec"), ns)
    exec(compile(code, f"README-block-{index}", "exec"), ns)
