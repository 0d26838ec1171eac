"""Training metrics stay on the device until a log step, and then come out as if each micro-batch had been
gathered and averaged on its own (the logged numbers do not depend on when they are read)."""

import math

import pytest
import torch

from prlhf.losses import PreferenceLossOutput
from prlhf.train.metrics import TrainMetrics


class FakeProcesses:
    """`gather` of P processes in process order; process p's rows are the caller's plus 10 * p."""

    def __init__(self, processes: int):
        self.processes, self.calls = processes, 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([t + 10 * p for p in range(self.processes)])


def micro_batch(seed: int, rows: int):
    g = torch.Generator().manual_seed(seed)
    out = PreferenceLossOutput(*(torch.randn(rows, generator=g) for _ in range(3)))
    generic = PreferenceLossOutput(*(torch.randn(rows, generator=g) for _ in range(3)))
    chosen, rejected = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    users = torch.randint(1, 4, (rows,), generator=g)
    return out, chosen, rejected, generic, users


def test_a_logging_window_is_the_mean_of_its_micro_batches_over_every_process():
    acc = FakeProcesses(2)
    metrics = TrainMetrics()
    batches = [micro_batch(seed, rows) for seed, rows in ((0, 4), (1, 4), (2, 3))]  # an uneven last batch
    for b in batches:
        metrics.update(*b)
    assert acc.calls == 0  # nothing gathered (nor read back) per micro-batch
    row = metrics.row(acc)
    losses = [torch.cat([b[0].losses + 10 * p for p in range(2)]).mean().item() for b in batches]
    assert math.isclose(row["loss"], sum(losses) / 3, rel_tol=1e-12)
    # process p's rewards are shifted alike, so its margins are process 0's
    margins = [(b[0].chosen_rewards - b[0].rejected_rewards).repeat(2) for b in batches]
    accuracy = [(m > 0).float().mean().item() for m in margins]
    assert math.isclose(row["rewards/accuracies"], sum(accuracy) / 3, rel_tol=1e-12)
    assert {"generic/loss", "logps/chosen", "train_users/mean_accuracy"} <= row.keys()
    assert metrics.row(acc) == {"train_users/mean_accuracy": row["train_users/mean_accuracy"],
                                "train_users/worst_accuracy": row["train_users/worst_accuracy"],
                                "train_users/count": row["train_users/count"]}  # a new window; the epoch's users


def test_a_non_finite_loss_anywhere_in_an_optimizer_step_is_caught_once_at_its_end():
    acc = FakeProcesses(1)
    metrics = TrainMetrics()
    out, chosen, rejected, generic, users = micro_batch(0, 4)
    bad = PreferenceLossOutput(out.losses.clone().index_fill_(0, torch.tensor([2]), float("nan")), *out[1:])
    metrics.update(bad, chosen, rejected, generic, users)  # the first of two accumulated micro-batches
    metrics.update(out, chosen, rejected, generic, users)
    assert not metrics.step_was_finite(acc)
    metrics.update(out, chosen, rejected, generic, users)
    assert metrics.step_was_finite(acc)  # the next step starts clean


def test_checkpointed_per_user_counts_need_a_flush_first():
    acc = FakeProcesses(1)
    metrics = TrainMetrics()
    metrics.update(*micro_batch(0, 4))
    with pytest.raises(RuntimeError, match="flush"):
        metrics.state_dict()
    metrics.flush(acc)
    assert sum(metrics.state_dict()["total"].values()) == 4
