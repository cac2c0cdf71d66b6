"""The example programs under python/ run as the README says and print what they promise, so they cannot rot."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from geffect_kernels import OBJECTIVES, hf
from geffect_kernels.geffect import GEffectProfiler
from ranks import run_ranks
from test_cli import make_workspace

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"[-+]?\d+\.\d+(?:e[-+]\d+)?"


def run_example(name, *args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "python" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_objective_prints_a_finite_row_per_objective_and_the_retain_losses():
    out = run_example("every_objective.py")
    for name in [*OBJECTIVES, "kl", "rmu", "rr"]:
        assert re.search(rf"^{name}\s+{NUMBER}", out, re.M), f"no row for {name}:\n{out}"
    assert "nan" not in out and "inf" not in out


def test_unlearning_loop_lowers_the_forget_log_likelihood_and_logs_geffects():
    out = run_example("unlearning_loop.py")
    before, after = map(float, re.search(rf"log-prob: ({NUMBER}) -> ({NUMBER})", out).groups())
    assert after < before  # NPO pushed the forget set's likelihood down
    assert len(re.findall(r"^step\s+\d+\s+e_forget", out, re.M)) == 4  # every 5 of 20 steps


def test_profile_local_model_writes_its_csv_and_plot(tmp_path):
    w = make_workspace(tmp_path)
    run_example("profile_local_model.py", w / "model", w / "forget.json", w / "retain.json", tmp_path / "out")
    assert (tmp_path / "out" / "profile.png").stat().st_size > 0
    header, *rows = (tmp_path / "out" / "profile.csv").read_text().splitlines()
    assert rows and all(name in "\n".join(rows) for name in ("ga", "npo", "wga", "tnpo", "wtnpo")), header


@pytest.mark.usefixtures("one_thread")
def test_sharded_geffects_prints_one_process_geffects_on_rank_0():
    rank0, rank1 = run_ranks([ROOT / "python" / "sharded_geffects.py"], world=2, timeout=300)
    total, layer0 = map(ast.literal_eval, rank0.splitlines())
    assert rank1 == ""
    torch.manual_seed(0)  # the example's model and batches, unsharded in this process
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4)).eval()
    forget = {"input_ids": torch.randint(0, 100, (6, 16))}
    retain = {"input_ids": torch.randint(0, 100, (6, 16))}
    with torch.no_grad():
        ref = hf.token_logprobs(model, forget)
    want = GEffectProfiler(model, groups="layer").measure_unlearning("npo", forget, retain, ref_logprobs=ref)
    for got, expected in ((total, want.total), (layer0, want.by_group["layer.0"])):
        assert got.keys() == expected.keys() == {"forget", "retain"}
        for risk in got:  # float32 sums in another order on each rank
            assert abs(got[risk] - expected[risk]) <= 1e-5 * abs(expected[risk]) + 1e-7 * abs(want.total["forget"])
