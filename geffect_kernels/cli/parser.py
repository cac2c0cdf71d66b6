"""The ``geffect`` command line: its sub-commands, flags and defaults (parsing needs no torch)."""
from __future__ import annotations

import argparse

from .commands import cmd_build, cmd_demo, cmd_profile, cmd_report
from .defaults import MAX_NEW_TOKENS, OBJECTIVE_NAMES, RETAIN_NAMES, TRAIN_DEFAULTS
from .errors import CLIError
from .train_command import cmd_train


class _Parser(argparse.ArgumentParser):
    """A bad flag is bad input like any other: one line and exit 1 (argparse would print the usage, exit 2)."""

    def error(self, message):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="geffect", description="LLM unlearning with G-effect profiling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end demo on a tiny Llama (CPU, a few minutes)",
                       description="Fine-tune a tiny Llama on fictitious authors, unlearn 10%% of them with ga, "
                                   "npo, wga, tnpo and wtnpo while profiling G-effects, evaluate TOFU-style and "
                                   "write report.md, plots and CSV/JSON.")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer steps (under a minute)")
    p.add_argument("--seeds", type=int, help="unlearning runs per objective from the same target, reported as mean "
                                             "and range (default: 3, --quick: 1)")
    p.add_argument("--out", default="geffect-demo", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    objective_help = f"unlearning objective(s): {', '.join(OBJECTIVE_NAMES)}"
    d = TRAIN_DEFAULTS
    p = sub.add_parser("train", help="unlearn on a local HF model and TOFU-format files",
                       description="One unlearning run per objective on a local Hugging Face causal LM. Settings "
                                   "come from flags or a YAML --config (flags win); writes OUT/runs/<objective>/ "
                                   "(metrics.jsonl, checkpoint, model/) and OUT/report.md. A rerun resumes. "
                                   "The defaults shown are this project's; --preset official replaces those not "
                                   "given.")
    p.add_argument("--model", help="Hugging Face model directory (the starting model)")
    p.add_argument("--forget", help="forget set (TOFU-format .json/.jsonl)")
    p.add_argument("--retain", help="retain set (TOFU-format .json/.jsonl)")
    p.add_argument("--objective", nargs="+", choices=OBJECTIVE_NAMES, metavar="NAME",
                   help=f"{objective_help} (default: {d['objective']})")
    p.add_argument("--retain-objective", choices=RETAIN_NAMES,
                   help=f"retain term: nll, kl, rr (the activations of the objective's layer, else one scaled with "
                        f"depth, kept at the starting model's) or none (default: {d['retain_objective']})")
    p.add_argument("--alternate", metavar="FILE",
                   help="substitute answers for the forget questions (po, dpo): TOFU's idontknow.jsonl (a refusal "
                        "per line, one drawn per question with --seed) or a TOFU-format file with an answer per "
                        "question")
    p.add_argument("--primal-dual", type=float, metavar="EPS",
                   help="PDU: keep the retain loss at most EPS, its weight a dual variable (starting at the retain "
                        "weight, λ ← max(0, λ + (retain loss − EPS)) after each step; logged as 'dual')")
    p.add_argument("--config", help="YAML file with any of these settings (model, forget, retain, objective, "
                                    "steps, lr, batch_size, ...)")
    p.add_argument("--out", default="geffect-run", help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default: {d['steps']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default: {d['lr']})")
    p.add_argument("--batch-size", type=int, help=f"samples per micro-batch, per side (default: {d['batch_size']})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {d['grad_accum']})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"linear warm-up steps, then linear decay to 0 (default: {d['warmup_steps']})")
    p.add_argument("--seed", type=int, help=f"sets the batch order and the initial state (default: {d['seed']})")
    p.add_argument("--geffect-every", type=int,
                   help=f"record G-effects every k steps, 0: never (default: {d['geffect_every']})")
    p.add_argument("--hparam", nargs="*", metavar="NAME=VALUE",
                   help="objective hyper-parameters, e.g. beta=0.5 (default: each objective's, docs/DESIGN.md §3)")
    p.add_argument("--guidance", choices=["rectify", "instance"],
                   help="G-effect-guided steps (needs the nll retain term): 'rectify' removes, layer by layer, the "
                        "forget gradient's component along the retain gradient where they conflict; 'instance' "
                        "weights forget samples by their retaining G-effect (default: plain steps; docs/guidance.md)")
    p.add_argument("--guidance-temperature", type=float, help="instance weighting's temperature (default: 1)")
    p.add_argument("--stop-when", metavar="RULES",
                   help="stop on the recorded G-effects (needs --geffect-every), e.g. 'retain_ratio<-0.5' or "
                        "'forget_fraction<0.2'; several rules separated by commas (default: run all --steps; "
                        "docs/guidance.md)")
    p.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: no limit)")
    p.add_argument("--nproc", type=int, help="shard over N local processes (FSDP2; launches torchrun); "
                                             "--batch-size stays the global batch (default: one process, or "
                                             "torchrun's world size when started under torchrun)")
    p.add_argument("--allow-reshard", action="store_true",
                   help="resume a checkpoint written by another number of processes")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="the loaded weights' dtype (default float32); trained weights stay float32 (LoRA adapters, "
                        "or full fine-tuning's master weights) and the forward computes in it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in the backward (non-reentrant: LoRA adapters train)")
    p.add_argument("--reference-device", choices=["cpu"],
                   help="keep a full fine-tuning KL reference on the CPU (default: the model's device)")
    p.add_argument("--plan", action="store_true",
                   help="print the expected peak memory per device (one device and --nproc or 8 FSDP2 ranks) "
                        "and train nothing")
    p.add_argument("--lora-r", type=int, help="train rank-R LoRA adapters instead of all weights; saves the adapter "
                                              "(default: all weights)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (default: 2 × rank)")
    p.add_argument("--lora-targets", type=lambda s: [t for t in s.split(",") if t], metavar="NAME,NAME",
                   help="modules that get adapters, e.g. q_proj,v_proj (default: peft's for the architecture)")
    p.add_argument("--eval", action="store_true",
                   help="TOFU metrics afterwards on the forget and retain sets (and --real-authors, --world); "
                        "model_utility needs all three utility sets, else the harmonic mean is named after the sets")
    p.add_argument("--real-authors", help="real-authors set for --eval (TOFU-format, with perturbed answers)")
    p.add_argument("--world", help="world-facts set for --eval (TOFU-format, with perturbed answers)")
    p.add_argument("--retain-eval-set", metavar="FILE",
                   help="utility set for --eval instead of the --retain training file (TOFU: retain_perturbed)")
    p.add_argument("--holdout", metavar="FILE", help="for --eval: questions the model never saw (TOFU: holdout10); "
                                                     "membership-inference AUC of forget against it, and privleak")
    p.add_argument("--retain-model", metavar="DIR", help="for --eval: the model trained without the forget set, "
                                                         "evaluated on the same sets (forget quality, privleak)")
    p.add_argument("--retain-eval", metavar="FILE",
                   help="for --eval: the retain model's saved evaluation instead of --retain-model (this project's "
                        "results/retain_model_eval.json, or TOFU's eval_log_forget.json)")
    p.add_argument("--eval-size", type=int, metavar="N",
                   help="for --eval: score the first N items of each set (TOFU scores 300; default: all)")
    p.add_argument("--muse", metavar="DIR", help="for --eval: MUSE's verbmem, knowmem and privleak on a corpus folder "
                                                 "in MUSE's layout (verbmem/, knowmem/, privleak/)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"greedy generation length for --eval's ROUGE-L, at most the model's positions after the "
                        f"prompt (default: {MAX_NEW_TOKENS}, as TOFU)")
    p.add_argument("--preset", help="'official': every setting not given (flag or --config) as the official "
                                    "G-effect scripts run it (default: none, this project's settings; "
                                    "docs/conventions.md)")
    p.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--resume", action="store_true",
                        help="continue a run's checkpoint even under other settings (the learning rate follows "
                             "the new schedule from the next step; a larger --steps extends the run)")
    choice.add_argument("--overwrite", action="store_true", help="start over, replacing the runs' checkpoints, "
                                                                 "logs and models")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("profile", help="G-effect table and plots for a model, objectives and data (no training)",
                       description="Measure each objective's G-effects on the forget NLL (and the retain NLL with "
                                   "--retain), per layer, at the model's current parameters.")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--forget", required=True, help="forget set (TOFU-format)")
    p.add_argument("--retain", help="retain set (TOFU-format)")
    p.add_argument("--objective", nargs="+", default=["ga"], choices=OBJECTIVE_NAMES, metavar="NAME",
                   help=f"{objective_help} (default: ga)")
    p.add_argument("--reference", help="reference model directory (tnpo, wtnpo, npo)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--samples", type=int, default=16, help="samples per side (default: %(default)s)")
    p.add_argument("--groups", default="layer", choices=["layer", "component", "parameter"],
                   help="what each G-effect sums over: a layer, a component or a parameter (default: %(default)s)")
    p.add_argument("--hparam", nargs="*", metavar="NAME=VALUE",
                   help="objective hyper-parameters, e.g. beta=0.5 (default: each objective's)")
    p.add_argument("--out", default="geffect-profile", help="output folder (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="re-make report.md and plots from a run folder's logs",
                       description="Rebuild report.md, plots/ and results/*.csv of a demo or train output folder.")
    p.add_argument("run_dir", help="a folder written by `geffect demo` or `geffect train`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("build", help="build the C++/CUDA extension now (otherwise built on first use)",
                       description="Compile the csrc extension with ninja and print what was built.")
    p.set_defaults(func=cmd_build)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="on an error, print the full traceback too (also: GEFFECT_DEBUG=1)")
    return parser
