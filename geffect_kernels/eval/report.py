"""``report.md``, plots and CSV tables from a run folder's files (what `geffect report RUN_DIR` re-makes).

A run folder is either a demo output (``results/summary.json``, ``results/trajectories.json`` and one
``runs/<objective>/`` per unlearning run) or a single training run (``metrics.jsonl``, ``config.json`` and
optionally ``geffects.json`` and ``eval.json``). Everything here only reads those files.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..atomic_files import atomic_write_text
from .run_files import (check_name, check_number, check_summaries, check_timing, check_trajectories, folder_inside,
                        markdown, read_json, save_figure, write_csv, write_json)

SUMMARY_COLUMNS = ["forget_quality", "model_utility",
                   *(f"{s}_{m}" for s in ("forget", "retain", "real_authors", "world")
                     for m in ("probability", "rouge_l", "truth"))]
# membership inference and memorization: their own table (``mia_auc`` flattened to one column per attack)
PRIVACY_COLUMNS = ["privleak", "mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k", "mia_auc_min_k++",
                   "forget_exact_memorization", "forget_extraction_strength"]
_SEEDED = re.compile(r"(.+)-seed(\d+)")


def _write_csv(path, rows, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, rows, columns)


def _fmt(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"


def _spread(values):
    """``mean [min, max]`` over seeds, or the one value."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(float(np.mean(values)))} [{_fmt(min(values))}, {_fmt(max(values))}]"


def _layer_index(group):
    match = re.fullmatch(r"layer\.(\d+)", group)
    return int(match.group(1)) if match else None


def split_run_name(name) -> tuple[str, int | None]:
    """``"npo-seed2"`` -> ``("npo", 2)``; a name without a seed suffix -> ``(name, None)``."""
    match = _SEEDED.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def _by_model(names):
    """``{model: [run names]}``, runs of one model (several seeds) together, in first-seen order."""
    groups = {}
    for name in names:
        groups.setdefault(split_run_name(name)[0], []).append(name)
    return groups


def find_runs(run_dir: Path) -> dict[str, Path]:
    """``{name: folder}`` of the training runs under ``run_dir`` (or ``run_dir`` itself); each name a safe file-name
    part (`check_name`: the report names files after it)."""
    if (run_dir / "runs").is_dir():
        return {check_name(p.name, "run folder", run_dir / "runs"): p for p in sorted((run_dir / "runs").iterdir())
                if (p / "metrics.jsonl").is_file()}
    if (run_dir / "metrics.jsonl").is_file():
        config = read_json(run_dir / "config.json", {})
        name = config.get("objective", run_dir.name) if isinstance(config, dict) else None
        return {check_name(name, "objective", run_dir / "config.json"): run_dir}
    raise FileNotFoundError(f"{run_dir} holds neither runs/ nor metrics.jsonl: not a geffect run folder")


def _histories(runs):
    from ..geffect import GEffectHistory
    histories = {name: GEffectHistory.from_json(path / "geffects.json") for name, path in runs.items()
                 if (path / "geffects.json").is_file()}
    for name, history in histories.items():
        for risk in history.risks:  # plots are named after them
            check_name(risk, "risk", runs[name] / "geffects.json")
    return histories


RETAIN_TERMS_FILE = "retain_terms.json"  # a case-study run's retain-term G-effects (train/run_demo.py writes it)


def _retain_term_histories(runs):
    """{run: {term: GEffectHistory}} of the runs whose folder has `RETAIN_TERMS_FILE` (the demo's case study)."""
    from ..geffect import GEffectHistory

    out = {}
    for name, path in runs.items():
        data = read_json(path / RETAIN_TERMS_FILE) if (path / RETAIN_TERMS_FILE).is_file() else None
        if not isinstance(data, dict):
            continue
        terms = {}
        for term, history in data.items():
            check_name(term, "retain term", path / RETAIN_TERMS_FILE)
            try:
                terms[term] = GEffectHistory.from_dict(history)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path / RETAIN_TERMS_FILE}: retain term {term!r} is not a G-effect history "
                                 f"({err})") from None
            for risk in terms[term].risks:
                check_name(risk, "risk", path / RETAIN_TERMS_FILE)
        out[name] = terms
    return out


def _sums(history) -> dict:
    return {risk: float(np.sum(history.per_step(risk))) for risk in ("forget", "retain") if risk in history.risks}


def _case_study_section(histories, terms, results, plots):
    """The paper's case-study table: Σ e over the recorded steps of each objective and of each retain term beside it,
    mean [min, max] over seeds; heatmaps of the retain terms' retaining G-effect per layer (first seed)."""
    from ..geffect.plot import plot_heatmap

    by_model = _by_model(terms)
    term_names = list(dict.fromkeys(t for run in terms.values() for t in run))
    rows, csv_rows = [], []
    for model, names in by_model.items():
        cells = [_spread([_sums(histories[n]).get(r) for n in names if n in histories]) for r in ("forget", "retain")]
        for term in term_names:
            per_seed = [_sums(terms[n][term]) for n in names if term in terms[n]]
            cells += [_spread([s.get(r) for s in per_seed]) for r in ("forget", "retain")]
        rows.append(f"| {markdown(model)} | " + " | ".join(cells) + " |")
        for n in names:
            for term, history in [("objective", histories.get(n)), *[(t, terms[n].get(t)) for t in term_names]]:
                if history is not None:
                    csv_rows.append({"objective": model, "seed": split_run_name(n)[1], "term": term, **{
                        f"sum_e_{risk}": value for risk, value in _sums(history).items()}})
    _write_csv(results / "case_study.csv", csv_rows, ["objective", "seed", "term", "sum_e_forget", "sum_e_retain"])
    header = " | ".join(f"{markdown(t)} term Σ e_forget | {markdown(t)} term Σ e_retain" for t in term_names)
    lines = ["## The paper's case study: objectives and retain terms", "",
             "The unlearning (e_forget) and retaining (e_retain) G-effects of each case-study objective and, on the "
             "same run, of each retain term (NLL; KL and RR to the starting model, RR at the objective's layer or one "
             "scaled with depth), summed over the recorded steps (the objective's every few steps, the terms' every "
             "few probes); mean [min, max] over seeds. Every run trains with the NLL term; the KL and RR columns say "
             "what those terms' gradients would do at the same parameters. `results/case_study.csv` has each seed.",
             "", f"| objective | objective Σ e_forget | objective Σ e_retain | {header} |",
             "|---" * (3 + 2 * len(term_names)) + "|", *rows, ""]
    for model, names in by_model.items():
        for term, history in terms[names[0]].items():
            if "retain" in history.risks and len(history):
                path = plots / f"{model}_{term}_term_heatmap_retain.png"
                plot_heatmap(history, "retain", path)
                lines.append(f"![{markdown(model)} {markdown(term)} term retaining G-effect per layer]"
                             f"(plots/{path.name})")
    lines += ["", "(Heatmaps: the first seed of each objective, each retain term's retaining G-effect per layer.)", ""]
    return lines


def _layer_table(histories):
    """Rows (objective, seed, group, risk, sum over recorded steps)."""
    return [{"objective": split_run_name(name)[0], "seed": split_run_name(name)[1], "group": group, "risk": risk,
             "sum": float(np.sum(h.per_step(risk, group)))}
            for name, h in histories.items() for risk in h.risks for group in h.groups]


def _plot_tradeoff(trajectories, summaries, path):
    from ..geffect.plot import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(dict.fromkeys(t["objective"] for t in trajectories))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per objective in both panels
    for name in names:
        seeds = list(dict.fromkeys(t.get("seed") for t in trajectories if t["objective"] == name))
        for k, seed in enumerate(seeds):  # one line per seed, labelled once
            points = [t for t in trajectories if t["objective"] == name and t.get("seed") == seed]
            axes[0].plot([p["probe_forget_probability"] for p in points],
                         [p["probe_retain_probability"] for p in points], marker=".", color=colors[name],
                         label=name if k == 0 else None, alpha=0.8)
    axes[0].set(xlabel="forget answer probability", ylabel="retain answer probability",
                title="during unlearning (start: target model)")
    axes[0].invert_xaxis()
    utility = "model_utility" if any("model_utility" in s for s in summaries.values()) else None
    for name, s in summaries.items():
        model = split_run_name(name)[0]
        y = s.get(utility) if utility else s.get("retain_probability")
        if y is None or "forget_probability" not in s:
            continue
        axes[1].scatter(s["forget_probability"], y, color=colors.get(model, "black"))
        if split_run_name(name)[1] in (None, 0):
            axes[1].annotate(model, (s["forget_probability"], y), fontsize=8)
    axes[1].set(xlabel="forget answer probability", ylabel=(utility or "retain_probability").replace("_", " "),
                title="final models (one point per seed)")
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _seed_checks(seed_runs, histories, trajectories, terms=None):
    """``{observation letter: Check}`` for one seed's runs (``{objective: run name}``), where measurable;
    a check that cannot be computed from these numbers is reported as such."""
    from . import observations as obs

    checks = {}

    def attempt(letter, make):
        try:
            checks[letter] = make()
        except ValueError as err:
            checks[letter] = obs.Check(obs.CLAIMS[letter], None, f"not measurable: {err}")

    # the paper's observations are about the objectives themselves, not their guided variants
    runs = {o: histories[n] for o, n in seed_runs.items() if n in histories and "+" not in o}
    if "ga" in runs and "retain" in runs["ga"].risks:
        attempt("a", lambda: obs.ga_retaining_negative(runs["ga"].per_step("retain")))
    for letter, risk in (("b", "forget"), ("c", "retain")):
        per_layer = {o: [h.per_step(risk, g) for g in sorted((g for g in h.groups if _layer_index(g) is not None),
                                                            key=_layer_index)]
                     for o, h in runs.items() if risk in h.risks}
        if per_layer and all(per_layer.values()):
            attempt(letter, lambda per_layer=per_layer, risk=risk: obs.shallow_layers_dominate(per_layer, risk))
    npo = [t for t in trajectories if t["objective"] == "npo" and "probe_npo_weights" in t]
    if npo:
        attempt("d", lambda: obs.npo_weights_shrink([t["step"] for t in npo],
                                                    [float(np.mean(t["probe_npo_weights"])) for t in npo]))
        attempt("e", lambda: obs.npo_spares_damaging_instances(
            [(t["probe_npo_weights"], t["probe_instance_damage"]) for t in npo]))
    if trajectories and all(o in seed_runs for o in obs.TOKEN_WEIGHTED + obs.BASELINES):
        attempt("f", lambda: obs.token_weighted_damage_less(trajectories))
    sums = {o: _sums(h) for o, h in runs.items() if o in obs.CASE_STUDY}
    if "ga" in sums and "po" in sums:
        attempt("h", lambda: obs.po_unlearns_weaker(sums))
    if "ga" in sums and "rmu" in sums:
        attempt("i", lambda: obs.rmu_retains_better(sums))
    term_sums = {o: {t: _sums(h) for t, h in terms[n].items()} for o, n in seed_runs.items()
                 if terms and n in terms and "+" not in o}
    if term_sums:
        attempt("j", lambda: obs.nll_term_against_unlearning(term_sums))
        attempt("k", lambda: obs.kl_rr_protect_less(term_sums))
    for variant in (o for o in seed_runs if "+" in o):
        try:
            checks[f"g {variant}"] = obs.guidance_damage_less(trajectories, variant)
        except ValueError as err:
            checks[f"g {variant}"] = obs.Check(f"{variant}: {obs.CLAIMS['g']}", None, f"not measurable: {err}")
    return checks


def _observations(runs, histories, trajectories, terms=None):
    """One bullet per observation (the claim, each seed's numbers, the verdict over seeds at the end) and
    ``{letter: verdict}``."""
    from .observations import CLAIMS, verdict

    seeds = {}
    for name in runs:
        objective, seed = split_run_name(name)
        seeds.setdefault(seed, {})[objective] = name
    per_seed = {seed: _seed_checks(seed_runs, histories, [t for t in trajectories if t.get("seed") == seed], terms)
                for seed, seed_runs in seeds.items()}
    lines, verdicts = [], {}
    guided = list(dict.fromkeys(key for c in per_seed.values() for key in c if key.startswith("g ")))
    for letter in [*"abcdef", *guided, *"hijk"]:
        checks = {seed: c[letter] for seed, c in per_seed.items() if letter in c}
        if not checks:
            continue
        verdicts[letter] = verdict(list(checks.values()))
        evidence = "; ".join(c.evidence if seed is None or len(checks) == 1 else f"seed {seed}: {c.evidence}"
                             for seed, c in checks.items())
        label, claim = (letter[0], next(iter(checks.values())).claim) if letter in guided else (letter, CLAIMS[letter])
        lines.append(f"- ({label}) **{claim}**: {evidence} — {verdicts[letter]}.")
    return lines, verdicts


def flat_summary(summary) -> dict:
    """A summary's numbers as one flat mapping: ``mia_auc`` as ``mia_auc_<attack>``, ``muse`` as ``muse_<metric>``;
    reasons (``missing``) and anything else that is not a number left out."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict) and key != "missing":
            out.update({f"{key}_{k}": v for k, v in flat_summary(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def _table(summaries, columns, groups):
    lines = ["| model | " + " | ".join(markdown(c.replace("_", " ")) for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    return lines + [f"| {markdown(model)} | "
                    + " | ".join(_spread([summaries[n].get(c) for n in names]) for c in columns) + " |"
                    for model, names in groups.items()]


def _missing_lines(raw):
    """One bullet per metric that some model lacks, with the reason its summary gives."""
    reasons = {}
    for name, summary in raw.items():
        labels = [(metric.replace("_", " "), why) for metric, why in (summary.get("missing") or {}).items()]
        labels += [(f"{key} {metric}", why) for key, part in summary.items() if isinstance(part, dict)
                   for metric, why in (part.get("missing") or {}).items()]  # e.g. "muse knowmem_r"
        for label in labels:
            reasons.setdefault(label, []).append(markdown(split_run_name(name)[0]))
    return [f"- {markdown(label)} not computed for {', '.join(dict.fromkeys(models))}: {markdown(why)}."
            for (label, why), models in reasons.items()]


def _summary_section(raw, results):
    """TOFU table, membership-inference table (mean [min, max] over seeds) and the CSV files behind them."""
    summaries = {name: flat_summary(s) for name, s in raw.items()}
    groups = _by_model(summaries)
    extra = [k for s in summaries.values() for k in s if k not in SUMMARY_COLUMNS + PRIVACY_COLUMNS]
    columns = [c for c in [*SUMMARY_COLUMNS, *dict.fromkeys(extra), *PRIVACY_COLUMNS]
               if any(c in s for s in summaries.values())]
    muse_columns = [c for c in columns if c.startswith("muse_")]
    tofu_columns = [c for c in columns if c not in PRIVACY_COLUMNS and c not in muse_columns]
    privacy_columns = [c for c in columns if c in PRIVACY_COLUMNS]
    means = [{"model": model, "seeds": len(names),
              **{c: float(np.mean([summaries[n][c] for n in names if c in summaries[n]]))
                 for c in columns if any(c in summaries[n] for n in names)}} for model, names in groups.items()]
    _write_csv(results / "summary.csv", means, ["model", "seeds", *columns])
    _write_csv(results / "summary_seeds.csv", [{"model": split_run_name(n)[0], "seed": split_run_name(n)[1], **s}
                                               for n, s in summaries.items()], ["model", "seed", *columns])
    several = any(len(names) > 1 for names in groups.values())
    lines = ["## Results (TOFU metrics)", ""]
    if several:
        lines += ["Unlearned models: mean [min, max] over the seeds (same target, different batch order and "
                  "initial randomness); target and retain-only models are trained once.", ""]
    lines += _table(summaries, tofu_columns, groups)
    lines += ["", "Forget quality: KS-test p-value of forget-set truth ratios against the retain-only model "
              "(higher = closer to never having seen the forget authors). Model utility: TOFU's harmonic mean of "
              "nine numbers, probability, ROUGE-L and truth score on the retain, real-authors and world-fact sets "
              "(with fewer sets the harmonic mean is named after them). Probabilities are length-normalized "
              "(real authors and world facts: normalized over the options); ROUGE-L is the `rouge-score` recall "
              "(Porter stemming) of greedy answers.", ""]
    if privacy_columns:
        lines += ["## Membership inference and memorization", ""]
        lines += _table(summaries, privacy_columns, groups)
        lines += ["", "MIA AUC: forget (label 0) against holdout (label 1) per attack, open-unlearning's convention "
                  "(1: the forget answers look far more like training data than the holdout ones; 0.5: no "
                  "difference). Privleak: MUSE's, (AUC' − AUC'_retain) / AUC'_retain × 100 with AUC' = 1 − the "
                  "min-k% AUC (k = 0.4), relative to the retain-only model: near 0 is what retraining gives, "
                  "negative means the forget set still looks memorized. Exact memorization and extraction strength: "
                  "open-unlearning's, from the teacher-forced argmax on the forget answers. Details: "
                  "docs/evaluation.md.", ""]
    if muse_columns:
        lines += ["## MUSE", ""]
        lines += _table(summaries, muse_columns, groups)
        lines += ["", "MUSE's metrics on its corpus files (× 100 for verbmem and knowmem: mean ROUGE-L F1 of greedy "
                  "continuations and few-shot answers); privleak and AUCs on its privleak texts as above. Details: "
                  "docs/evaluation.md.", ""]
    missing = _missing_lines(raw)
    if missing:
        lines += ["Not computed:", "", *missing, ""]
    return lines


def _geffect_section(histories, results, plots):
    from ..geffect.plot import plot_cumulative

    _write_csv(results / "geffect_layers.csv", _layer_table(histories), ["objective", "seed", "group", "risk", "sum"])
    lines = ["## G-effects", "",
             "e = ∇(objective)ᵀ∇(NLL risk), recorded every few steps at the parameters the step starts from. "
             "Negative unlearning G-effect: the forget NLL rises (forgetting); negative retaining G-effect: "
             "the retain NLL rises (damage). Sums over the recorded steps; mean [min, max] over seeds.", "",
             "| objective | seeds | recorded steps | Σ e_forget | Σ e_retain | steps with e_retain < 0 |",
             "|---|---|---|---|---|---|"]
    for model, names in _by_model(histories).items():
        hs = [histories[n] for n in names]
        e_r = [h.per_step("retain") if "retain" in h.risks else [] for h in hs]
        lines.append(f"| {markdown(model)} | {len(hs)} | {len(hs[0])} | "
                     f"{_spread([sum(h.per_step('forget')) for h in hs])} | "
                     f"{_spread([sum(v) for v in e_r if v])} | "
                     f"{_spread([float(sum(x < 0 for x in v)) for v in e_r if v])} |")
        for n, h in zip(names, hs):
            _write_csv(results / f"geffects_{n}.csv", h.rows(), ["step", "group", "risk", "value", "cumulative"])
    first = {model: histories[names[0]] for model, names in _by_model(histories).items()}  # first seed's
    plot_cumulative(first, plots / "cumulative_geffects.png")
    lines += ["", "![cumulative G-effects](plots/cumulative_geffects.png)", ""]
    for model, h in first.items():
        h.plot(plots, prefix=model)
        lines += [f"![{markdown(model)} unlearning G-effect per layer](plots/{model}_heatmap_forget.png)"]
        if "retain" in h.risks:
            lines += [f"![{markdown(model)} retaining G-effect per layer](plots/{model}_heatmap_retain.png)"]
    if any(len(names) > 1 for names in _by_model(histories).values()):
        lines += ["", "(Curves and heatmaps: the first seed of each objective.)"]
    lines.append("")
    return lines


def _timing_line(timing):
    machine = f" on {timing['machine']}" if timing.get("machine") else ""
    load = (f"; load average {timing['load_before']:.2f} before, {timing['load_after']:.2f} after"
            if "load_before" in timing else "")
    cpu = f" (CPU time {timing['cpu_seconds']:.0f} s)" if "cpu_seconds" in timing else ""
    return f"Wall-clock: {timing['seconds']:.0f} s{cpu}{machine}, {timing['torch_threads']} torch threads{load}."


HEADLINE = (("forget_quality", "forget quality"), ("model_utility", "model utility"),
            ("forget_probability", "forget probability"), ("retain_probability", "retain probability"),
            ("privleak", "privleak"))


def headline(run_dir) -> list[str]:
    """Short lines for the terminal: per unlearned model the main TOFU numbers (mean [min, max] over seeds),
    then each observation's verdict (from the files `make_report` wrote)."""
    from .observations import CLAIMS

    results = Path(run_dir) / "results"
    summaries = {name: flat_summary(s) for name, s in read_json(results / "summary.json").items()}
    verdicts = read_json(results / "observations.json")
    shown = [(key, label) for key, label in HEADLINE
             if key in dict(HEADLINE[:4]) or any(key in s for s in summaries.values())]
    lines = [f"{model}: " + ", ".join(f"{label} {_spread([summaries[n].get(key) for n in names])}"
                                      for key, label in shown)
             for model, names in _by_model(summaries).items() if model not in ("target", "retain_only")]
    note = quick_note(run_dir)
    verdict_lines = {letter: f"({letter}) {CLAIMS[letter]}: {v}" for letter, v in verdicts.items() if letter in CLAIMS}
    guided = [f"{letter[2:]} {v}" for letter, v in verdicts.items() if letter.startswith("g ")]
    if guided:  # one line for every guided variant, in its letter's place
        verdict_lines["g"] = f"(g) {CLAIMS['g']}: " + "; ".join(guided)
    verdict_lines = [verdict_lines[letter] for letter in sorted(verdict_lines)]
    return lines + verdict_lines + ([note] if note else [])


def quick_note(run_dir) -> str | None:
    """A warning for a `geffect demo --quick` folder: its model and run are too small for the layer observations."""
    settings = Path(run_dir) / "demo_settings.json"
    if not settings.is_file():
        return None
    s = read_json(settings)
    if not isinstance(s, dict) or not s.get("quick"):
        return None
    for key in ("layers", "unlearn_steps", "seeds"):
        check_number(s.get(key), key, settings)
    half = s["layers"] // 2
    return (f"note: a --quick run ({s['layers']} layers, {s['unlearn_steps']} unlearning steps, {s['seeds']} "
            f"seed(s)) is too small to decide (b) and (c), which compare {half} shallow with {half} deep "
            f"layer(s); `geffect demo` runs the full setting")


def make_report(run_dir) -> Path:
    """Write ``report.md``, ``plots/*.png`` and ``results/*.csv`` for ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    results, plots = run_dir / "results", run_dir / "plots"
    summaries = check_summaries(read_json(results / "summary.json", {}), results / "summary.json")
    if not summaries and (run_dir / "eval.json").is_file():
        summaries = check_summaries({next(iter(runs)): read_json(run_dir / "eval.json")}, run_dir / "eval.json")
    trajectories = check_trajectories(read_json(results / "trajectories.json", []), results / "trajectories.json")
    timing = read_json(results / "timing.json")
    timing = timing and check_timing(timing, results / "timing.json")
    histories = _histories(runs)
    terms = _retain_term_histories(runs)
    results, plots = folder_inside(run_dir, "results"), folder_inside(run_dir, "plots")  # checked: now write

    lines = [f"# G-effect unlearning report: {markdown(run_dir.resolve().name)}", ""]
    if summaries:
        lines += _summary_section(summaries, results)
    if histories:
        lines += _geffect_section(histories, results, plots)
    if terms:
        lines += _case_study_section(histories, terms, results, plots)
    if trajectories and summaries:
        _write_csv(results / "trajectories.csv", trajectories,
                   ["objective", "seed", "step", "probe_forget_probability", "probe_retain_probability"])
        _plot_tradeoff(trajectories, summaries, plots / "tradeoff.png")
        lines += ["## Forget vs retain trade-off", "", "![trade-off](plots/tradeoff.png)", ""]
    observations, verdicts = _observations(runs, histories, trajectories, terms)
    write_json(results / "observations.json", verdicts)
    if observations:
        note = quick_note(run_dir)
        lines += ["## The paper's observations, checked on this run's numbers", "",
                  "Each ends with its verdict from this run's numbers; with several seeds an observation holds only "
                  "when it holds for every seed.", "", *observations, "", *([f"**{note}**", ""] if note else [])]
    if timing:
        lines += [_timing_line(timing), ""]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def write_profile(results: dict, out_dir: Path) -> str:
    """CSV/JSON and a per-layer bar chart of one G-effect measurement per objective; returns a printed table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"objective": name, "group": group, "risk": risk, "value": value}
            for name, r in results.items() for group, risks in [("total", r.total), *r.by_group.items()]
            for risk, value in risks.items()]
    _write_csv(out_dir / "profile.csv", rows, ["objective", "group", "risk", "value"])
    write_json(out_dir / "profile.json", {n: r.to_dict() for n, r in results.items()})
    risks = list(dict.fromkeys(risk for r in results.values() for risk in r.total))
    groups = list(dict.fromkeys(g for r in results.values() for g in r.by_group))
    from ..geffect.plot import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(len(risks), 1, figsize=(max(6, 0.5 * len(groups) * len(results)), 3.2 * len(risks)),
                             squeeze=False)
    width = 0.8 / len(results)
    for ax, risk in zip(axes[:, 0], risks):
        for k, (name, r) in enumerate(results.items()):
            ax.bar(np.arange(len(groups)) + k * width, [r.by_group.get(g, {}).get(risk, 0.0) for g in groups],
                   width, label=name)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(ylabel="G-effect", title=f"{risk} risk")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "profile.png", dpi=110)
    plt.close(fig)
    lines = ["objective  " + "  ".join(f"{'e_' + risk:>12}" for risk in risks)]
    lines += [f"{name:<10} " + "  ".join(f"{r.total.get(risk, float('nan')):12.4g}" for risk in risks)
              for name, r in results.items()]
    return "\n".join(lines + [f"per-layer values: {out_dir / 'profile.csv'}, plot: {out_dir / 'profile.png'}"])
