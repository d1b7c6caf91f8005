"""Evaluation: the defenses x attacks grid (:mod:`.grid`, shardable), its results (:mod:`.report`, mergeable), the
adaptive attack variants (:mod:`.adaptive`) and the paper's tables (:mod:`.tables`)."""

from .grid import (
    CLEAN,
    AttackSetting,
    evaluate,
    grid,
    load_dataset,
    parse_shard,
    video_masks,
)
from .report import Report, merge_reports
from .tables import (
    is_frame_report,
    markdown_table,
    report_markdown,
    save_markdown,
    table3,
    table3_rows,
    table4,
    table4_rows,
    table5a,
    table5a_rows,
)  # fmt: skip

__all__ = [
    "CLEAN", "AttackSetting", "evaluate", "grid", "load_dataset", "parse_shard", "video_masks", "Report", "merge_reports",
    "is_frame_report",
    "markdown_table", "report_markdown", "save_markdown", "table3", "table3_rows", "table4", "table4_rows", "table5a",
    "table5a_rows",
]  # fmt: skip
