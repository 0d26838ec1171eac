"""Training metrics with the field's names, plus per-user summaries (never one key per user)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from prlhf.losses import PreferenceLossOutput
from prlhf.safe_io import atomic_write_text


def batch_metrics(out: PreferenceLossOutput, chosen_logps: torch.Tensor | None, rejected_logps: torch.Tensor | None,
                  generic: PreferenceLossOutput | None) -> dict[str, torch.Tensor]:
    """Means over the batch as 0-d tensors on the batch's device (read back later, all at once); `logps/*` only for a
    policy (a reward model has rewards, already under `rewards/*`)."""
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {
        "loss": out.losses.mean(),
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracies": (margins > 0).float().mean(),
    }
    if chosen_logps is not None and rejected_logps is not None:
        metrics["logps/chosen"] = chosen_logps.detach().mean()
        metrics["logps/rejected"] = rejected_logps.detach().mean()
    if generic is not None:
        generic_correct = generic.chosen_rewards > generic.rejected_rewards
        metrics["generic/rewards/accuracies"] = generic_correct.float().mean()
        metrics["generic/loss"] = generic.losses.mean()
    return metrics


def as_floats(metrics: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Many dicts of 0-d tensors -> floats, with one copy to the host."""
    if not metrics:
        return []
    values = torch.stack([v.detach().double() for m in metrics for v in m.values()]).tolist()
    out, at = [], 0
    for m in metrics:
        out.append(dict(zip(m, values[at:at + len(m)])))
        at += len(m)
    return out


class PerUserAccuracy:
    """Running per-user share of pairs with positive implicit-reward margin, summarised as mean and worst."""

    def __init__(self):
        self.correct: dict[int, float] = defaultdict(float)
        self.total: dict[int, int] = defaultdict(int)

    def update(self, user_idx: torch.Tensor, margins: torch.Tensor) -> None:
        for u, ok in zip(user_idx.tolist(), (margins > 0).tolist()):
            self.correct[u] += ok
            self.total[u] += 1

    def summary(self, prefix: str = "users") -> dict[str, float]:
        if not self.total:
            return {}
        acc = [self.correct[u] / self.total[u] for u in self.total]
        return {f"{prefix}/mean_accuracy": sum(acc) / len(acc), f"{prefix}/worst_accuracy": min(acc),
                f"{prefix}/count": float(len(acc))}


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in sorted(keys)}


class TrainMetrics:
    """The metrics.jsonl rows: batch metrics averaged over the logging window, per-user accuracy over the
    epoch so far (summarised), all computed from the examples of every process. `with_logps=False` for a reward
    model, whose per-sequence outputs are rewards, not log-probs.

    Nothing is read back from the device per micro-batch: `update` keeps the detached per-example tensors, and
    `flush` (at logging, checkpoints and epoch ends: points every process reaches together) gathers them from
    every process and copies them to the host once. `step_was_finite` is the one host read per optimizer step."""

    def __init__(self, with_logps: bool = True):
        self.window: list[dict[str, float]] = []  # one entry per micro-batch of the logging window
        self.per_user, self.with_logps = PerUserAccuracy(), with_logps
        self.pending: list[list[torch.Tensor]] = []  # per micro-batch: this process's per-example tensors
        self.nonfinite: torch.Tensor | None = None  # on the device: a loss of this optimizer step was not finite

    def update(self, out: PreferenceLossOutput, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               generic: PreferenceLossOutput | None, user_idx: torch.Tensor) -> None:
        tensors = [*out, chosen_logps, rejected_logps, user_idx, *(generic if generic is not None else ())]
        self.pending.append([t.detach() for t in tensors])
        bad = ~torch.isfinite(out.losses.detach()).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad

    def step_was_finite(self, accelerator) -> bool:
        """Were all losses since the last call finite, on every process (the same answer everywhere)?"""
        if self.nonfinite is None:
            return True
        bad, self.nonfinite = accelerator.gather(self.nonfinite.reshape(1)), None
        return not bool(bad.any())

    def flush(self, accelerator) -> None:
        """Count the pending micro-batches: every process's rows of each, in process order (as `gather` orders
        them). `gather`, not `gather_for_metrics`: the duplicates Accelerate pads into an uneven last batch are
        trained on too, so the metrics describe exactly the examples the gradient saw."""
        if not self.pending:
            return
        sizes = [len(batch[0]) for batch in self.pending]  # rows per micro-batch, the same on every process
        columns = [accelerator.gather(torch.cat([batch[k] for batch in self.pending]).contiguous())
                   for k in range(len(self.pending[0]))]  # each (P * sum(sizes),)
        processes = columns[0].shape[0] // sum(sizes)
        means, users, margins = [], [], []
        at = 0
        for size in sizes:  # micro-batch j = its rows of process 0, then of process 1, ...
            mb = [c.view(processes, -1)[:, at:at + size].reshape(-1) for c in columns]
            at += size
            out, (chosen, rejected, user_idx) = PreferenceLossOutput(*mb[:3]), mb[3:6]
            generic = PreferenceLossOutput(*mb[6:9]) if len(mb) > 6 else None  # alpha < 1 keeps 9 tensors
            logps = (chosen, rejected) if self.with_logps else (None, None)
            means.append(batch_metrics(out, *logps, generic))
            users.append(user_idx)
            margins.append(out.chosen_rewards - out.rejected_rewards)
        self.window += as_floats(means)
        self.per_user.update(torch.cat(users).cpu(), torch.cat(margins).cpu())
        self.pending = []

    def row(self, accelerator) -> dict[str, float]:
        """Summarise and start a new logging window."""
        self.flush(accelerator)
        row = {**mean_of(self.window), **self.per_user.summary("train_users")}
        self.window = []
        return row

    def new_epoch(self, accelerator) -> None:
        self.flush(accelerator)  # the ending epoch's micro-batches still count in the next row's window
        self.per_user = PerUserAccuracy()

    def state_dict(self) -> dict:
        """The epoch's per-user counts (JSON), so a resumed run reports the same per-user accuracy; call `flush`
        first."""
        if self.pending:
            raise RuntimeError("TrainMetrics.state_dict before flush: pending micro-batches would be lost")
        return {"correct": dict(self.per_user.correct), "total": dict(self.per_user.total)}

    def load_state_dict(self, state: dict) -> None:
        self.per_user = PerUserAccuracy()
        self.per_user.correct.update({int(u): c for u, c in state["correct"].items()})
        self.per_user.total.update({int(u): n for u, n in state["total"].items()})


def tracker_names(report_to: str) -> list[str]:
    """`--report-to` -> Accelerate's `log_with`; auto = TensorBoard when it is installed, else nothing."""
    from accelerate.utils import is_tensorboard_available

    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    return [] if report_to == "none" else [report_to]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop metrics.jsonl rows after `last_step`: a run killed between logging and checkpointing logged steps
    that its resume will run (and log) again, and a row cut short by a kill while it was being appended."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if _logged_step(line) <= last_step]
        atomic_write_text(path, "".join(row + "\n" for row in rows))  # a kill here keeps the whole old log


def _logged_step(line: str) -> float:
    """The row's step; inf (so the row is dropped) for a partial last line."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
