"""The Python examples of the README and of the docs run as written (GPU-only ones skipped). The README's blocks
share one namespace, in order; each docs file's blocks share another, so a docs page stands on its own."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# docs pages with runnable examples -> what their output must contain (None: they may print nothing, e.g. the C++
# example where no compiler is present)
DOCS_WITH_EXAMPLES = {"large_models.md": "['layer.0', 'layer.1']", "backends.md": None,
                      "evaluation.md": "mia_auc {'loss': ", "trainer.md": "G-effects at steps [0, 2, 4]"}


def run_blocks(path: pathlib.Path) -> int:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    runnable = [b for b in blocks if not b.startswith("# needs a GPU")]
    namespace = {}
    for block in runnable:
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - the docs are ours
    return len(runnable)


def test_readme_stays_short():
    # what a newcomer reads first, in minutes: the details live in docs/ and benchmarks/README.md
    assert len(README.read_text().splitlines()) <= 300


def test_readme_examples_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    assert run_blocks(README) >= 8
    out = capsys.readouterr().out
    assert "torch.Size([2, 16]) torch.float32" in out
    assert "'forget':" in out and "'retain':" in out  # the profiler example printed both G-effects


@pytest.mark.parametrize("name", DOCS_WITH_EXAMPLES)
def test_docs_examples_run(name, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run_blocks(ROOT / "docs" / name) >= 1
    expected = DOCS_WITH_EXAMPLES[name]
    assert expected is None or expected in capsys.readouterr().out
