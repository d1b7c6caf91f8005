"""The paper's tables from a :class:`~streamguard.evaluation.report.Report`: rich tables and markdown."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import partial
from itertools import product
from pathlib import Path

from rich.table import Table

from ..attacks import MODES
from ..metrics import PixelCounts
from .grid import CLEAN, AttackSetting
from .report import Report, write_atomic

# ---------------------------------------------------------------- tables

METHOD_NAMES = {"pgd": "MPGD", "apgd": "MAPGD", "cw": "MCW"}
TABLE4_ROWS = (
    ("Undefended", "none", None),
    ("GT Mask", "gt", None),
    ("JPEG", "jpeg", None),
    ("Video compression", "h264", None),
    ("PatchZero (DO)", "patchzero", "do"),
    ("PatchZero (BPDA)", "patchzero", "bpda"),
)


def _attack_columns(report: Report) -> list[tuple[str, str, float]]:
    at = report.settings["recipe"]["attack"]
    return [(f"{METHOD_NAMES[m]} {a * 100:g}%", m, a) for m, a in product(at["methods"], at["areas"])]


def _keys(report: Report, method: str, area: float, modes: list[str]) -> list[str]:
    """The attack keys of one column for the given modes, every adaptive variant the grid ran included."""
    variants = report.settings["recipe"]["evaluate"].get("bpda_variants", [])
    keys = [AttackSetting(method, area, m).key for m in modes]
    if "bpda" in modes:
        keys += [AttackSetting(method, area, "bpda", v).key for v in variants]
    return keys


def _pct(value: float | None) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}"


def table4_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 4: top-1 (top-5) accuracy, %.

    Every row shows its worst case: a video counts only if it survives every attack of the column
    the grid ran on that defense (baselines: DO and BPDA; PatchZero BPDA: every adaptive variant).
    """
    columns = _attack_columns(report)
    header = ["Defense", "No attack"] + [name for name, _, _ in columns]
    rows = []
    for label, defense, mode in TABLE4_ROWS:
        if report.accuracy(defense, CLEAN.key) is None:
            continue
        cells = [_cell(report, defense, [CLEAN.key])]
        for _, method, area in columns:
            cells.append(_cell(report, defense, _keys(report, method, area, [mode] if mode else list(MODES))))
        if mode and all(c == "–" for c in cells[1:]) and columns:
            continue
        rows.append([label, *cells])
    return header, rows


def _cell(report: Report, defense: str, attacks: list[str]) -> str:
    top1 = report.worst_accuracy(defense, attacks, 1)
    return "–" if top1 is None else f"{_pct(top1)} ({_pct(report.worst_accuracy(defense, attacks, 5))})"


def variant_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """PatchZero under each adaptive attack, % (top-1; box AP50 for a frame detector): which variant
    is the worst, column by column."""
    variants = report.settings["recipe"]["evaluate"].get("bpda_variants", [])
    columns = _attack_columns(report)
    one, worst = _variant_scores(report)
    header = ["BPDA attack on PatchZero"] + [name for name, _, _ in columns]
    rows = []
    for name in ["", *variants]:
        cells = [_pct(one(AttackSetting(m, a, "bpda", name).key)) for _, m, a in columns]
        if any(c != "–" for c in cells):
            rows.append([name or "BPDA (temperature 4)", *cells])
    if len(rows) > 1:
        rows.append(["worst case (per video)", *(_pct(worst(_keys(report, m, a, ["bpda"]))) for _, m, a in columns)])
    if any("iters100" in v.split("+") for v in variants) and len(rows) > 3:  # how much of the worst case the longer attack alone adds
        iters = report.settings["recipe"]["attack"]["iters"]
        short = [[k for k in _keys(report, m, a, ["bpda"]) if "iters100" not in re.split("[-+]", k)] for _, m, a in columns]
        rows.append([f"worst case without iters100 ({iters} iterations)", *(_pct(worst(k)) for k in short)])
    return header, rows


def _variant_scores(report: Report) -> tuple[Callable[[str], float | None], Callable[[list[str]], float | None]]:
    """PatchZero's score under one attack and its per-video worst case over several: top-1, or AP50."""
    if not is_frame_report(report):
        return partial(report.accuracy, "patchzero"), partial(report.worst_accuracy, "patchzero")

    def ap50(result: dict[str, float] | None) -> float | None:
        return None if result is None else result["ap50"]

    return (lambda key: ap50(report.box_ap("patchzero", key))), (lambda keys: ap50(report.worst_box_ap("patchzero", keys)))


TABLE3_ROWS = (
    ("Undefended", "none", None),
    ("GT Mask", "gt", None),
    ("PatchZero (DO)", "patchzero", "do"),
    ("PatchZero (BPDA)", "patchzero", "bpda"),
)


def is_frame_report(report: Report) -> bool:
    return bool(report.samples) and "frames" in report.samples[0]


def table3_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 3 (per-frame detector): box AP / AP50 / AP75, %, per defense and attack."""
    columns = _attack_columns(report)
    header = ["Defense", "No attack"] + [name for name, _, _ in columns]
    rows = []
    for label, defense, mode in TABLE3_ROWS:
        if not report.records(defense, CLEAN.key):
            continue
        cells = [_ap_cell(report, defense, [CLEAN.key])]
        for _, method, area in columns:
            cells.append(_ap_cell(report, defense, _keys(report, method, area, [mode] if mode else list(MODES))))
        if mode and all(c == "–" for c in cells[1:]) and columns:
            continue
        rows.append([label, *cells])
    return header, rows


def _ap_cell(report: Report, defense: str, attacks: list[str]) -> str:
    worst = report.worst_box_ap(defense, attacks)
    return "–" if worst is None else " / ".join(_pct(worst[k]) for k in ("ap", "ap50", "ap75"))


def table5a_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of Table 5a: PatchZero's pixel metrics per attack setting, per mode and on benign clips, %."""
    header = ["Attack", "Precision", "Recall", "Accuracy", "F1", "FPR"]
    rows = []
    keys_by_mode: dict[str, list[str]] = {m: [] for m in MODES}
    for _, method, area in _attack_columns(report):
        for mode in MODES:
            key = AttackSetting(method, area, mode).key
            if report.records("patchzero", key):
                keys_by_mode[mode].append(key)
                rows.append(_pixel_row(f"{METHOD_NAMES[method]} {area * 100:g}% ({mode.upper()})", report.pixel_counts([key])))
    for mode, keys in keys_by_mode.items():
        if keys:
            rows.append(_pixel_row(f"All {mode.upper()}", report.pixel_counts(keys)))
    if report.records("patchzero", CLEAN.key):
        rows.append(_benign_row(report.pixel_counts([CLEAN.key])))
    return header, rows


def _pixel_row(label: str, c: PixelCounts) -> list[str]:
    return [label, _pct(c.precision), _pct(c.recall), _pct(c.accuracy), _pct(c.f1), _pct(c.fpr)]


def _benign_row(c: PixelCounts) -> list[str]:
    """Clean clips have no patch pixels, so precision and F1 say nothing there; an FPR under 0.1% (a few
    masked pixels, which the other rows' one decimal would show as 0.0) gets two significant digits."""
    fpr = f"{100 * c.fpr:.2g}" if 0 < c.fpr < 1e-3 else _pct(c.fpr)
    return ["Benign (no attack)", "–", "–", _pct(c.accuracy), "–", fpr]


def _rich(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def table4(report: Report) -> Table:
    """Top-1 (top-5) accuracy of every defense under every attack, shaped like the paper's Table 4."""
    return _rich("Table 4: top-1 (top-5) accuracy, %", *table4_rows(report))


def table3(report: Report) -> Table:
    """Box AP / AP50 / AP75 of the per-frame detector behind each defense, shaped like the paper's Table 3."""
    return _rich("Table 3: box AP / AP50 / AP75, %", *table3_rows(report))


def table5a(report: Report) -> Table:
    """PatchZero's pixel precision, recall, accuracy, F1 and false-positive rate, like the paper's Table 5a."""
    return _rich("Table 5a: PatchZero pixel metrics, %", *table5a_rows(report))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def frame_count(report: Report) -> int:
    """Frames per cell: those of each evaluated video, counted once (from whichever defense ran first)."""
    seen: dict[int, int] = {}
    for r in report.samples:
        seen.setdefault(r["video"], len(r["frames"]))
    return sum(seen.values())


def save_markdown(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write :func:`report_markdown` to ``path``."""
    return write_atomic(path, report_markdown(report))


def report_markdown(report: Report) -> str:
    """Both tables as GitHub markdown, for the README."""
    n = len(report.settings.get("videos", []))
    where = f"{report.settings['model']}, {n} videos, seed {report.settings['seed']}"
    if is_frame_report(report):
        frames = frame_count(report)
        parts = [f"**Table 3** — box AP / AP50 / AP75, % ({where}, {frames} frames)\n", markdown_table(*table3_rows(report))]
    else:
        parts = [
            f"**Table 4** — top-1 (top-5) accuracy, % ({where}; each row its worst case per video)\n",
            markdown_table(*table4_rows(report)),
        ]
    header, rows = variant_rows(report)
    if len(rows) > 1:
        score = "box AP50" if is_frame_report(report) else "top-1"
        parts += [f"\n**Adaptive attacks on PatchZero** — {score}, % (each video counts under the attack worst for it)\n",
                  markdown_table(header, rows)]  # fmt: skip
    header, rows = table5a_rows(report)
    if rows:
        parts += ["\n**Table 5a** — PatchZero pixel metrics, %\n", markdown_table(header, rows)]
    return "\n".join(parts)
