"""The README's Python examples run as written, in order, sharing one namespace (GPU-only ones skipped)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if not b.startswith("# needs a GPU")]
    assert len(runnable) >= 9
    namespace = {}
    for block in runnable:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    out = capsys.readouterr().out
    assert "torch.Size([2, 16]) torch.float32" in out
    assert "'forget':" in out and "'retain':" in out  # the profiler example printed both G-effects
