"""Training metrics: one JSON object per line in ``metrics.jsonl`` and a loss-curve PNG.

Only rank 0 writes. A resumed run first drops the lines logged after its checkpoint's step,
so the file always describes one consistent run, and an incomplete last line (a process killed,
or a disk that filled up, while writing it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be read; the message names the line."""


class MetricsLog:
    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.png = Path(run_dir) / "loss.png"
        self.enabled = enabled

    def truncate_after(self, step: int) -> str | None:
        """Keep only records of steps <= ``step`` (resuming from that step). An unreadable last
        line is dropped (returns a warning saying so); an unreadable line before it raises
        MetricsError naming it (it is not the trace of an interrupted write)."""
        if not self.enabled or not self.path.exists():
            return None
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records, warning = [], None
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                records.append((line, record["step"]))
            except (ValueError, TypeError, KeyError) as exc:
                if number < len(lines):
                    raise MetricsError(f"{self.path} line {number} is not a metrics record ({exc}); "
                                       "repair or remove that line") from exc  # fmt: skip
                warning = f"dropped the incomplete last line of {self.path} ({line[:40]!r})"
        kept = [line for line, logged in records if logged <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return warning

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self) -> None:
        """Loss curve (training loss per logged step, evaluation loss per evaluation)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], label="train")
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("SONAR-LLM training")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(self.png.stem + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png)
