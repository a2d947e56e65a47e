"""Per-epoch metrics of a run: JSONL and CSV files, accuracy plots, optional TensorBoard."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one record per epoch to ``metrics.jsonl`` and rewrites ``metrics.csv``.

    The JSONL file is the record (one JSON object per line, keys may grow as methods add
    terms); the CSV is a convenience view with the union of the keys as columns.

    Args:
        directory: the run directory.
        history: records of earlier epochs (a resumed run), rewritten so the files match the
            checkpoint being resumed (epochs after it are dropped).
        tensorboard: also write scalars with torch.utils.tensorboard (needs ``tensorboard``).
    """

    def __init__(
        self,
        directory: Path,
        history: list[dict[str, Any]] | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.directory = directory
        self.records: list[dict[str, Any]] = list(history or [])
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory / "tensorboard"))
        self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.directory / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._write_csv()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _rewrite(self) -> None:
        with open(self.directory / "metrics.jsonl", "w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for record in self.records:
            columns += [k for k in record if k not in columns]
        with open(self.directory / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self.records)


def accuracy_keys(record: dict[str, Any]) -> list[str]:
    """The accuracy columns of a record: "acc" (the trained model) first, then branches."""
    keys = [k for k in record if k.startswith("acc")]
    return sorted(keys, key=lambda k: (k != "acc", k))


def plot_accuracy(
    records: list[dict[str, Any]], path: Path, title: str, labels: dict[str, str] | None = None
) -> None:
    """Test accuracy per epoch of the trained model and of every branch the method tracks.

    Like the BWRF paper's figure of the MP models against the LP backbone during training:
    one line per model, the trained one drawn thickest; constant references (the frozen FP
    partner) dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in accuracy_keys(records[-1]) if records else []:
        values = [r.get(key, math.nan) for r in records]
        style = {"linewidth": 2.5} if key == "acc" else {"linewidth": 1.2}
        if key in ("acc_fp", "acc_teacher"):
            style["linestyle"] = "--"
        ax.plot(epochs, values, marker="o", markersize=3, label=labels.get(key, key), **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
