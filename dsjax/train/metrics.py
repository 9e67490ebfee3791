"""Run outputs: outputs/<run>/metrics.csv, training_log.json, training_config.json and loss.png."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

METRIC_COLUMNS = [
    "step",
    "loss",
    "ce_loss",
    "mtp_loss",
    "balance_loss",
    "val_loss",
    "val_bpb",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "expert_imbalance",
    "tokens_seen",
    "elapsed_sec",
]


class MetricsWriter:
    """Appends one CSV row per log interval (train columns averaged over the interval) or eval.

    A fresh run never truncates an existing metrics.csv (the CLI refuses to reuse a
    run name; this is the last guard). On resume, rows past the checkpoint are
    dropped (they are recomputed) by rewriting the file atomically. `complete` says
    whether the rows reach back to the run's start, the condition for rewriting
    training_log.json and loss.png from them.
    """

    def __init__(self, out_dir: Path, resume: bool, enabled: bool = True, columns: list[str] | None = None):
        self.out_dir = Path(out_dir)
        self.columns = list(columns or METRIC_COLUMNS)  # another stage (GRPO) writes its own columns
        self.csv_path = self.out_dir / "metrics.csv"
        self.log_path = self.out_dir / "training_log.json"
        self.rows: list[dict] = []
        self.complete = not resume
        self.enabled = enabled  # in a multi-host run only the primary process writes files
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.csv_path.is_file():
            with open(self.csv_path) as f:
                self.rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
        elif not resume:
            if self.csv_path.is_file() and len(self.csv_path.read_text().splitlines()) > 1:
                raise FileExistsError(
                    f"{self.csv_path} already holds a run's metrics; refusing to start over it "
                    "(use --resume, a new --run-name, or --overwrite)"
                )
            _write_rows_atomic(self.csv_path, [], self.columns)

    @property
    def first_step(self):
        return self.rows[0]["step"] if self.rows else None

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows past the checkpoint being resumed (they will be recomputed)."""
        self.rows = [r for r in self.rows if isinstance(r.get("step"), int) and r["step"] <= step]
        self.complete = bool(self.rows)  # a missing or emptied metrics.csv cannot speak for the steps before
        if not self.enabled:
            return
        _write_rows_atomic(self.csv_path, self.rows, self.columns)

    def write(self, row: dict) -> None:
        clean = {k: row.get(k, "") for k in self.columns}
        self.rows.append(clean)
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(clean)

    def write_log(self, summary: dict) -> None:
        if not self.enabled:
            return
        _write_atomic(self.log_path, json.dumps({"summary": summary, "history": self.rows}, indent=2, default=float))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_rows_atomic(path: Path, rows: list[dict], columns: list[str] = METRIC_COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def _parse(value: str):
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def plot_losses(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["ce_loss"]) for r in rows if isinstance(r.get("ce_loss"), (int, float))]
    total = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss (next token, nats)", color="tab:blue", alpha=0.9)
    if total and total != train:
        ax.plot(*zip(*total), "--", label="train objective (+ MTP + balance)", color="tab:blue", alpha=0.35)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (next token, nats)", color="tab:orange")
        bpb = [(s, r["val_bpb"]) for r in rows for s in [r["step"]] if isinstance(r.get("val_bpb"), (int, float))]
        if bpb:
            ax.annotate(f"val {bpb[-1][1]:.3f} bits/byte", xy=val[-1], xytext=(-120, 30), textcoords="offset points",
                        arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # savefig picks the format from the suffix
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
