"""docs/PYTHON_API.md: every ```python block runs, in order, in one namespace, in a temporary
folder (what a reader pasting them into one Python session would see)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

DOC = REPO / "docs" / "PYTHON_API.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_blocks_are_found():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nb\n```\n") == ["a = 1\n"]


def test_every_code_block_of_the_python_api_doc_runs(
    data_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METARUN_DATA", str(data_dir))
    monkeypatch.setenv("METARUN_CACHE", str(cache_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "python_api_doc"}
    try:
        for number, block in enumerate(python_blocks(DOC.read_text()), start=1):
            try:
                exec(compile(block, f"{DOC.name}, block {number}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"block {number} of {DOC.name} failed:\n{block}") from err
    finally:
        torch.set_num_threads(threads)
    # What the blocks say they did.
    assert (tmp_path / "runs" / "protonet_tiny" / "results.json").is_file()
    assert namespace["model"].iteration > 0 and namespace["scores"].shape == (40, 4)
    assert namespace["result"]["accuracy"]["queries"] == 40
    assert (tmp_path / "digits.csv").is_file() and (tmp_path / "digits.json").is_file()
