"""The GPU suite's records: one CSV row per measurement, appended and flushed as soon as it is measured (a part
killed by its timeout loses nothing it measured), every failure as a row of its own, and the compact table
printed at the end of a run.

Every row carries the machine (GPU name, or the CPU for a smoke run), the commit and the UTC time.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import math
import pathlib
import traceback

import provenance

FIELDS = ["part", "case", "provider", "objective", "dtype", "shape", "status", "loss_rel_err", "dh_rel_err",
          "dw_rel_err", "tolerance", "ms_median", "ms_p20", "ms_p80", "peak_mib", "note", "machine", "commit", "utc"]
TABLE_LIMIT = 12_000  # characters of the final table (what a device call's output tail keeps)


class Recorder:
    """Appends rows of one part to ``path`` (the header only when the file is new)."""

    def __init__(self, path, part):
        self.path = pathlib.Path(path)
        self.part = part
        self.machine = provenance.machine()
        self.commit = provenance.commit()

    def row(self, **fields):
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown CSV fields {sorted(unknown)}")
        row = {**dict.fromkeys(FIELDS, ""), "part": self.part, **{k: _text(v) for k, v in fields.items()},
               "machine": self.machine, "commit": self.commit,
               "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        shown = {k: v for k, v in row.items() if v and k not in ("part", "machine", "commit", "utc")}
        print("  " + " | ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    @contextlib.contextmanager
    def case(self, **ids):
        """Run one case; any exception (out of memory, a compile error, a wrong shape) becomes an ``error`` row
        carrying ``ids`` and the run goes on with the next case."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is a result to record, not a reason to stop
            traceback.print_exc()
            self.row(**ids, status="error", note=f"{type(exc).__name__}: {str(exc).strip()}"[:300])
        finally:
            gc.collect()
            _empty_cuda_cache()


def _empty_cuda_cache():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _text(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def read_rows(path):
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _cell(x, fmt):
    return "-" if math.isnan(x) else format(x, fmt)


def table(rows, parts=()):
    """The compact summary: parts (exit code, seconds), correctness, speed with ratios to the floors, overhead."""
    lines = []
    if parts:
        lines.append("parts: " + ", ".join(f"{p['part']} exit {p['exit']} in {p['seconds']}s/{p['limit']}s"
                                           for p in parts))
    if rows:
        lines.append(f"machine: {rows[0]['machine']}; commit {rows[0]['commit']}")
    checks = [r for r in rows if r["part"] == "correctness" or (r["part"] in ("logits", "geffect", "stats")
                                                                 and r["ms_median"] == "" and r["status"] != "error")]
    if checks:
        bad = sum(r["status"] not in ("ok", "skipped") for r in checks)
        lines.append(f"\ncorrectness vs float64 ({len(checks)} cases, {bad} not ok): case provider obj dtype "
                     "status loss dh dW tol")
        for r in checks:
            lines.append(f"  {r['case'][:34]:34s} {r['provider'][:12]:12s} {r['objective']:6s} {r['dtype']:8s} "
                         f"{r['status'][:8]:8s} {_cell(_num(r['loss_rel_err']), '.1e'):>7s} "
                         f"{_cell(_num(r['dh_rel_err']), '.1e'):>7s} {_cell(_num(r['dw_rel_err']), '.1e'):>7s} "
                         f"{r['tolerance']}" + (f"  {r['note'][:90]}" if r["status"] not in ("ok",) else ""))
    timed = [r for r in rows if r["part"] in ("speed", "logits", "overhead", "stats") and r["ms_median"] != ""]
    for shape in dict.fromkeys(r["shape"] for r in timed):
        here = [r for r in timed if r["shape"] == shape]
        floor3 = next((_num(r["ms_median"]) for r in here if r["provider"].startswith("floor")), math.nan)
        # xliger: against Liger's fused linear cross-entropy, for KL rows against its fused JSD
        liger = {name: next((_num(r["ms_median"]) for r in here if r["provider"] == name), math.nan)
                 for name in ("liger bf16 acc", "liger jsd beta=1")}
        lines.append(f"\n{shape}: provider obj ms [p20-p80] MiB x3mm x4pass xliger (kl: x liger jsd)")
        for r in here:
            t = _num(r["ms_median"])
            yardstick = liger["liger jsd beta=1" if r["objective"] == "kl" else "liger bf16 acc"]
            lines.append(f"  {r['provider'][:24]:24s} {r['objective']:6s} {t:9.3f} "
                         f"[{_cell(_num(r['ms_p20']), '.2f')}-{_cell(_num(r['ms_p80']), '.2f')}] "
                         f"{r['peak_mib'] or '-':>7s} {_cell(t / floor3, '.2f'):>5s} "
                         f"{_cell(t / (floor3 * 4 / 3), '.2f'):>5s} {_cell(t / yardstick, '.2f'):>5s}"
                         + (f"  {r['note'][:60]}" if r["note"] else ""))
    lines += _large_model_lines([r for r in rows if r["part"] in ("geffect", "fsdp") and r["ms_median"] != ""])
    failed = [r for r in rows if r["part"] in ("speed", "overhead", "geffect", "fsdp")
              and r["status"] not in ("ok", "skipped", "FAIL")]
    if failed:
        lines.append("\nspeed cases that failed:")
        lines += [f"  {r['shape'][:30]} {r['provider']} {r['objective']}: {r['note'][:120]}" for r in failed]
    skipped = sorted({r["provider"] for r in rows if r["status"] == "skipped"})
    if skipped:
        lines.append("\nskipped (not installed / not available): " + ", ".join(skipped))
    return _bounded("\n".join(lines))


def _large_model_lines(timed):
    """Per part and shape: each method's time and peak memory, and both as ratios to the first row (the
    training step, or the single-process step)."""
    lines = []
    for part, shape in dict.fromkeys((r["part"], r["shape"]) for r in timed):
        here = [r for r in timed if (r["part"], r["shape"]) == (part, shape)]
        t0, m0 = _num(here[0]["ms_median"]), _num(here[0]["peak_mib"])
        lines.append(f"\n{part} {shape}: method ms MiB (time, memory vs {here[0]['case']})")
        for r in here:
            t, m = _num(r["ms_median"]), _num(r["peak_mib"])
            lines.append(f"  {r['case'][:24]:24s} {t:10.1f} {_cell(m, '.0f'):>8s} {_cell(t / t0, '.2f'):>6s}x "
                         f"{_cell(m / m0, '.2f'):>6s}x")
    return lines


def _bounded(text):
    if len(text) <= TABLE_LIMIT:
        return text
    note = "\n... (table cut at {} characters; every row is in the CSV)".format(TABLE_LIMIT)
    return text[:TABLE_LIMIT - len(note)].rsplit("\n", 1)[0] + note
