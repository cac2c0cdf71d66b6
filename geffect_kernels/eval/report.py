"""``report.md``, plots and CSV tables from a run folder's files (what `geffect report RUN_DIR` re-makes).

A run folder is either a demo output (``results/summary.json``, ``results/trajectories.json`` and one
``runs/<objective>/`` per unlearning run) or a single training run (``metrics.jsonl``, ``config.json`` and
optionally ``geffects.json`` and ``eval.json``). Everything here only reads those files.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

SUMMARY_COLUMNS = ["forget_quality", "model_utility", "forget_probability", "forget_rouge_l", "forget_truth",
                   "retain_probability", "retain_rouge_l", "retain_truth", "world_probability", "world_rouge_l",
                   "world_truth"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _write_csv(path, rows, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"


def _layer_index(group):
    match = re.fullmatch(r"layer\.(\d+)", group)
    return int(match.group(1)) if match else None


def find_runs(run_dir: Path) -> dict[str, Path]:
    """``{name: folder}`` of the training runs under ``run_dir`` (or ``run_dir`` itself)."""
    if (run_dir / "runs").is_dir():
        return {p.name: p for p in sorted((run_dir / "runs").iterdir()) if (p / "metrics.jsonl").is_file()}
    if (run_dir / "metrics.jsonl").is_file():
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        return {config.get("objective", run_dir.name): run_dir}
    raise FileNotFoundError(f"{run_dir} holds neither runs/ nor metrics.jsonl: not a geffect run folder")


def _histories(runs):
    from ..geffect import GEffectHistory
    return {name: GEffectHistory.from_json(path / "geffects.json") for name, path in runs.items()
            if (path / "geffects.json").is_file()}


def _layer_table(histories):
    """Rows (objective, group, risk, sum over recorded steps)."""
    return [{"objective": name, "group": group, "risk": risk, "sum": float(np.sum(h.per_step(risk, group)))}
            for name, h in histories.items() for risk in h.risks for group in h.groups]


def _plot_cumulative(histories, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, risk, title in zip(axes, ("forget", "retain"), ("unlearning G-effect (forget NLL)",
                                                          "retaining G-effect (retain NLL)")):
        for name, h in histories.items():
            if risk in h.risks:
                ax.plot(h.steps, h.cumulative(risk), marker=".", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="step", ylabel="cumulative G-effect (recorded steps)", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(trajectories, summaries, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(dict.fromkeys(t["objective"] for t in trajectories))
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per objective in both panels
    for name in names:
        points = [t for t in trajectories if t["objective"] == name]
        axes[0].plot([p["probe_forget_probability"] for p in points], [p["probe_retain_probability"] for p in points],
                     marker=".", label=name, color=colors[name])
    axes[0].set(xlabel="forget answer probability", ylabel="retain answer probability",
                title="during unlearning (start: target model)")
    axes[0].invert_xaxis()
    for name, s in summaries.items():
        axes[1].scatter(s["forget_probability"], s["model_utility"], color=colors.get(name, "black"))
        axes[1].annotate(name, (s["forget_probability"], s["model_utility"]), fontsize=8)
    axes[1].set(xlabel="forget answer probability", ylabel="model utility", title="final models")
    axes[1].invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retain_at_forget_level(trajectories, level):
    """Per objective, the retain probability where its forget probability first falls to ``level``
    (linear interpolation between probes); None when it never gets there."""
    out = {}
    for name in dict.fromkeys(t["objective"] for t in trajectories):
        points = [(t["probe_forget_probability"], t["probe_retain_probability"])
                  for t in trajectories if t["objective"] == name]
        out[name] = None
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if f0 >= level >= f1:
                out[name] = r0 if f0 == f1 else r0 + (r1 - r0) * (f0 - level) / (f0 - f1)
                break
    return out


def _observations(trajectories, histories, layer_rows):
    lines = []
    ga = histories.get("ga")
    if ga is not None and "retain" in ga.risks:
        values = ga.per_step("retain")
        negative = sum(v < 0 for v in values)
        holds = sum(values) < 0
        lines.append(f"- **GA's retaining G-effect is negative** — {'holds' if holds else 'does not hold'} here: "
                     f"summed over {len(values)} recorded steps e_r = {_fmt(sum(values))}, negative at "
                     f"{negative}/{len(values)} of them.")
    for risk, label in (("forget", "unlearning"), ("retain", "retaining")):
        parts = []
        for name in histories:
            rows = [r for r in layer_rows if r["objective"] == name and r["risk"] == risk]
            blocks = [r for r in rows if _layer_index(r["group"]) is not None]
            if blocks:
                top, top_block = max(rows, key=lambda r: abs(r["sum"])), max(blocks, key=lambda r: abs(r["sum"]))
                where = "shallow" if _layer_index(top_block["group"]) < len(blocks) / 2 else "deep"
                parts.append(f"{name}: {top['group']} overall ({_fmt(top['sum'])}), {top_block['group']} among the "
                             f"blocks ({where} half, {_fmt(top_block['sum'])})")
        if parts:
            lines.append(f"- **Which layers carry the largest {label} G-effects** (largest |sum over recorded "
                         f"steps|): " + "; ".join(parts) + ". The paper uses layer-wise G-effects to locate where "
                         "unlearning acts; see the heatmaps above.")
    names = list(dict.fromkeys(t["objective"] for t in trajectories))
    if "ga" in names and trajectories:
        start = next(t["probe_forget_probability"] for t in trajectories if t["step"] == 0)
        reached = {n: min(t["probe_forget_probability"] for t in trajectories if t["objective"] == n) for n in names}
        level = max(reached.values())  # the deepest forgetting every objective reaches
        if level < 0.95 * start:
            at = retain_at_forget_level(trajectories, level)
            others = [n for n in names if n != "ga" and at[n] is not None]
            better = [n for n in others if at[n] > at["ga"]]
            table = ", ".join(f"{n} {_fmt(at[n])}" for n in names if at[n] is not None)
            worse = [n for n in others if n not in better]
            verdict = "holds" if not worse else \
                f"holds for {', '.join(better) or 'none of them'}, not for {', '.join(worse)}"
            lines.append(f"- **NPO and the token-weighted objectives damage retention less than GA at a matched forget "
                         f"level** — {verdict}: at forget probability {_fmt(level)} (from {_fmt(start)}) the retain "
                         f"probability is {table}.")
        else:
            lines.append(f"- **Matched forget level**: not comparable here; the weakest objective only lowered the "
                         f"forget probability from {_fmt(start)} to {_fmt(level)}.")
    return lines


def make_report(run_dir) -> Path:
    """Write ``report.md``, ``plots/*.png`` and ``results/*.csv`` for ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    results, plots = run_dir / "results", run_dir / "plots"
    results.mkdir(exist_ok=True)
    plots.mkdir(exist_ok=True)
    summary_file = results / "summary.json"
    summaries = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if not summaries and (run_dir / "eval.json").is_file():
        summaries = {next(iter(runs)): json.loads((run_dir / "eval.json").read_text())}
    traj_file = results / "trajectories.json"
    trajectories = json.loads(traj_file.read_text()) if traj_file.is_file() else []
    histories = _histories(runs)
    layer_rows = _layer_table(histories)

    lines = [f"# G-effect unlearning report: {run_dir.name}", ""]
    if summaries:
        _write_csv(results / "summary.csv", [{"model": m, **s} for m, s in summaries.items()],
                   ["model", *SUMMARY_COLUMNS])
        columns = [c for c in SUMMARY_COLUMNS if any(c in s for s in summaries.values())]
        lines += ["## Results (TOFU metrics)", "",
                  "| model | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_fmt(s.get(c)) for c in columns) + " |" for m, s in summaries.items()]
        lines += ["", "Forget quality: KS-test p-value of forget-set truth ratios against the retain-only model "
                  "(higher = closer to never having seen the forget authors). Model utility: harmonic mean of "
                  "probability, ROUGE-L and truth score on the retain and world-fact sets. Probabilities are "
                  "length-normalized; ROUGE-L is the recall of greedy answers.", ""]
    if histories:
        _write_csv(results / "geffect_layers.csv", layer_rows, ["objective", "group", "risk", "sum"])
        lines += ["## G-effects", "",
                  "e = ∇(objective)ᵀ∇(NLL risk), recorded every few steps at the parameters the step starts from. "
                  "Negative unlearning G-effect: the forget NLL rises (forgetting); negative retaining G-effect: "
                  "the retain NLL rises (damage).", "",
                  "| objective | recorded steps | Σ e_forget | Σ e_retain | steps with e_retain < 0 |", "|---|---|---|---|---|"]
        for name, h in histories.items():
            h.to_csv(results / f"geffects_{name}.csv")
            e_r = h.per_step("retain") if "retain" in h.risks else []
            lines.append(f"| {name} | {len(h)} | {_fmt(sum(h.per_step('forget')))} | "
                         f"{_fmt(sum(e_r)) if e_r else '–'} | {sum(v < 0 for v in e_r)}/{len(e_r)} |")
            h.plot(plots, prefix=name)
        _plot_cumulative(histories, plots / "cumulative_geffects.png")
        lines += ["", "![cumulative G-effects](plots/cumulative_geffects.png)", ""]
        for name in histories:
            lines += [f"![{name} unlearning G-effect per layer](plots/{name}_heatmap_forget.png)"]
            if "retain" in histories[name].risks:
                lines += [f"![{name} retaining G-effect per layer](plots/{name}_heatmap_retain.png)"]
        lines.append("")
    if trajectories and summaries:
        _write_csv(results / "trajectories.csv", trajectories,
                   ["objective", "step", "probe_forget_probability", "probe_retain_probability"])
        _plot_tradeoff(trajectories, summaries, plots / "tradeoff.png")
        lines += ["## Forget vs retain trade-off", "", "![trade-off](plots/tradeoff.png)", ""]
    observations = _observations(trajectories, histories, layer_rows)
    if observations:
        lines += ["## The paper's observations, checked on this run's numbers", "", *observations, ""]
    timing = results / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        lines += [f"Wall-clock: {t['seconds']:.0f} s on {t['torch_threads']} torch threads (CPU).", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def write_profile(results: dict, out_dir: Path) -> str:
    """CSV/JSON and a per-layer bar chart of one G-effect measurement per objective; returns a printed table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"objective": name, "group": group, "risk": risk, "value": value}
            for name, r in results.items() for group, risks in [("total", r.total), *r.by_group.items()]
            for risk, value in risks.items()]
    _write_csv(out_dir / "profile.csv", rows, ["objective", "group", "risk", "value"])
    (out_dir / "profile.json").write_text(json.dumps({n: r.to_dict() for n, r in results.items()}, indent=1))
    risks = list(dict.fromkeys(risk for r in results.values() for risk in r.total))
    groups = list(dict.fromkeys(g for r in results.values() for g in r.by_group))
    plt = _pyplot()
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
    fig.savefig(out_dir / "profile.png", dpi=110)
    plt.close(fig)
    lines = ["objective  " + "  ".join(f"{'e_' + risk:>12}" for risk in risks)]
    lines += [f"{name:<10} " + "  ".join(f"{r.total.get(risk, float('nan')):12.4g}" for risk in risks)
              for name, r in results.items()]
    return "\n".join(lines + [f"per-layer values: {out_dir / 'profile.csv'}, plot: {out_dir / 'profile.png'}"])
