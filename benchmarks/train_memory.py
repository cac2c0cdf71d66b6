"""Peak resident memory of `train` on CPU, each case in a fresh process, next to the memory plan's figure.

    python benchmarks/train_memory.py plan-check   # scaled Llamas: measured peak vs `memory_plan` (within 20%)
    python benchmarks/train_memory.py references   # the reference's cost: LoRA/full, GA/NPO/GA+KL, checkpointing
    python benchmarks/train_memory.py references --code DIR --label "COMMIT, before" --append   # another checkout
    python benchmarks/train_memory.py replan CSV   # a CSV's plan columns from this checkout's plan

A case's process builds a random-weight Llama from its config, makes random forget and retain sequences, notes its
resident memory (the baseline: torch, transformers and the data), restarts the kernel's peak counter (VmHWM) and
runs `train` (float32, no run folder). It reports the peak above the baseline with the model (``peak_mib``: what
the plan counts) and above the model already built (``above_start_mib``: the issue's "peak above start"), and
whether every LoRA ``lora_B`` moved from zero. Rows go to benchmarks/results/<mode>.csv with the provenance.

glibc raises its mmap threshold (up to 32 MiB) as mapped blocks are freed, after which freed blocks below it stay
in the heap and in the resident set: the peak then counts memory no tensor holds. The workers fix the threshold at
``MMAP_THRESHOLD`` (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the live tensors as the plan counts them;
``--glibc-default`` measures with glibc's own (the ``malloc`` column says which).
"""
import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# --code DIR: measure another checkout's geffect_kernels (e.g. a commit before a change) with these cases
sys.path[:0] = [os.environ.get("GEFFECT_CODE", str(HERE.parent)), str(HERE)]

# layers, hidden, intermediate, heads, vocabulary
ISSUE_SHAPE = (8, 1024, 2816, 16, 32000)  # 642 MiB in float32
MMAP_THRESHOLD = 1 << 20
SCALED = {"L4-H512": (4, 512, 1408, 8, 32000), "L8-H1024": ISSUE_SHAPE, "L12-H768-V8k": (12, 768, 2048, 12, 8000)}


def _mib(field) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(case: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from geffect_kernels.data.prompts import EncodedSet
    from geffect_kernels.train import TrainConfig, train
    from geffect_kernels.train.lora import add_lora

    layers, hidden, inter, heads, vocab = case["shape"]
    torch.manual_seed(0)
    n, tokens = case["batch"], case["tokens"]
    ids = torch.randint(0, vocab, (2, n, tokens)).tolist()
    forget, retain = (EncodedSet([{"input_ids": row, "labels": row} for row in side], 0) for side in ids)
    config = TrainConfig(objective=case["objective"], retain_objective=case["retain"], steps=case.get("steps", 2),
                         batch_size=n, lr=1e-4, progress=False, checkpoint_every=1000, out_dir=None,
                         **({"gradient_checkpointing": True} if case.get("checkpointing") else {}))
    _warm_up(vocab)
    base = _mib("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=heads, tie_word_embeddings=False))
    if case.get("lora_r"):
        model = add_lora(model, r=case["lora_r"], targets=["q_proj", "v_proj"])
    start = _mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts at the current RSS
    train(model, forget, retain if case["retain"] != "none" else None, config)
    peak = _mib("VmHWM")
    moved = None
    if case.get("lora_r"):
        moved = all(bool(p.detach().abs().sum() > 0) for name, p in model.named_parameters() if "lora_B" in name)
    return {"peak_mib": round(peak - base, 1), "above_start_mib": round(peak - start, 1),
            "model_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
            "every_lora_b_moved": moved}


def _warm_up(vocab):
    """Load what a first call loads (the kernels' extension, peft, autograd's threads) before the baseline: the
    plan counts tensors, not code."""
    import peft  # noqa: F401
    import torch

    from geffect_kernels.objectives import unlearning_loss
    from geffect_kernels.retain import kl_loss

    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 5))
    (unlearning_loss("ga", hidden, weight, labels, shift=True) + kl_loss(hidden, weight, hidden.detach(),
                                                                          weight.detach(), labels)).backward()


def planned_mib(case: dict) -> float:
    from geffect_kernels.train.memory_plan import ModelShape, PlanSettings, plan

    layers, hidden, inter, heads, vocab = case["shape"]
    shape = ModelShape(layers, hidden, inter, heads, heads, hidden // heads, vocab, False)
    settings = PlanSettings(objective=case["objective"], retain_objective=case["retain"], batch_size=case["batch"],
                            seq_len=case["tokens"], n_forget=case["batch"], lora_r=case.get("lora_r"),
                            gradient_checkpointing=bool(case.get("checkpointing")), device="cpu")
    return round(plan(shape, settings).peak / 2**20, 1)


def run_case(case: dict, code=None, glibc_default=False) -> dict:
    env = {**os.environ, **({"GEFFECT_CODE": str(Path(code).resolve())} if code else {})}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run([sys.executable, __file__, "worker", json.dumps(case)], capture_output=True, text=True,
                          timeout=1800, env=env)
    if done.returncode:
        raise RuntimeError(f"case {case['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(mode: str) -> list[dict]:
    if mode == "plan-check":
        out = []
        for label, shape in SCALED.items():
            for lora_r, objective, checkpointing in ((None, "ga", False), (8, "ga", False), (8, "npo", False),
                                                     (None, "ga", True), (8, "ga", True)):
                name = f"{label} {'LoRA' if lora_r else 'full'} {objective}{' ckpt' if checkpointing else ''}"
                out.append({"name": name, "shape": shape, "batch": 4, "tokens": 128, "objective": objective,
                            "retain": "nll", "lora_r": lora_r, "checkpointing": checkpointing})
        return out
    base = {"shape": ISSUE_SHAPE, "batch": 4, "tokens": 64}
    rows = [("LoRA, GA", 8, "ga", "nll"), ("LoRA, NPO", 8, "npo", "nll"), ("LoRA, GA + KL retain", 8, "ga", "kl"),
            ("full, GA", None, "ga", "nll"), ("full, NPO", None, "npo", "nll"),
            ("full, GA + KL retain", None, "ga", "kl")]
    out = [{**base, "name": name, "lora_r": r, "objective": obj, "retain": retain} for name, r, obj, retain in rows]
    for checkpointing in (False, True):
        out.append({**base, "tokens": 256, "name": f"LoRA, GA, 256 tokens{', checkpointing' if checkpointing else ''}",
                    "lora_r": 8, "objective": "ga", "retain": "nll", "checkpointing": checkpointing})
    return out


def replan(path: Path):
    """Recompute a CSV's plan columns with this checkout's plan (the measured columns stay; ``plan_commit`` says
    which plan)."""
    from provenance import commit

    by_name = {case["name"]: case for mode in ("plan-check", "references") for case in cases(mode)}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        case = {**by_name[row["case"]], "tokens": int(row["tokens"]), "batch": int(row["sequences"])}
        row["plan_mib"] = planned_mib(case)
        row["plan_vs_measured"] = round(row["plan_mib"] / float(row["peak_mib"]), 3)
        row["plan_commit"] = commit()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main():
    if sys.argv[1] == "worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    if sys.argv[1] == "replan":  # replan CSV
        replan(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["plan-check", "references"])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--csv", help="default: benchmarks/results/train_memory_<mode>.csv")
    parser.add_argument("--code", help="the geffect_kernels checkout to measure (default: this one)")
    parser.add_argument("--label", default="", help="the code column: what --code is (e.g. 'a7da2b4, before')")
    parser.add_argument("--glibc-default", action="store_true", help="glibc's dynamic mmap threshold in the workers")
    parser.add_argument("--append", action="store_true", help="add the rows to the CSV instead of replacing it")
    args = parser.parse_args()
    from provenance import stamp

    path = Path(args.csv or HERE / "results" / f"train_memory_{args.mode.replace('-', '_')}.csv")
    rows = []
    for case in cases(args.mode):
        if args.only and args.only not in case["name"]:
            continue
        try:
            result = run_case(case, args.code, args.glibc_default)
        except RuntimeError as err:  # e.g. a setting the --code checkout does not have
            print(f"skipped: {str(err).splitlines()[0]} {str(err).strip().splitlines()[-1]}", flush=True)
            continue
        plan_mib = planned_mib(case)
        row = {"case": case["name"], "code": args.label or "this commit",
               "malloc": "glibc default" if args.glibc_default else f"mmap threshold {MMAP_THRESHOLD >> 20} MiB",
               "shape": "x".join(map(str, case["shape"])), "sequences": case["batch"],
               "tokens": case["tokens"], **result, "plan_mib": plan_mib,
               "plan_vs_measured": round(plan_mib / result["peak_mib"], 3), **stamp(),
               "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    append = args.append and path.is_file()
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
