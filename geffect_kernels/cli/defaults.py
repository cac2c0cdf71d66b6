"""Names and defaults the parser shows without importing torch (tests/test_cli_usage.py checks each against its
source: the catalog, TrainConfig, eval.tofu)."""

OBJECTIVE_NAMES = ("ga", "wga", "satimp", "tnpo", "wtnpo", "npo", "simnpo", "ceu", "undial", "nll", "po", "dpo",
                   "rmu")  # catalog.OBJECTIVES
RETAIN_NAMES = ("nll", "kl", "rr", "none")  # catalog.RETAIN_OBJECTIVES
TRAIN_DEFAULTS = {"objective": "ga", "retain_objective": "nll", "steps": 30, "lr": 1e-5, "batch_size": 8,
                  "grad_accum": 1, "warmup_steps": 0, "seed": 0, "geffect_every": 0}  # TrainConfig's
MAX_NEW_TOKENS = 200  # --eval's default generation length: eval.tofu.MAX_NEW_TOKENS
