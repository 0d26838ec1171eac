"""AdamW that touches only the user rows present in a batch, and gradient clipping that understands them.

With a dense user table, every step would allocate an (N, T_u*d) gradient and AdamW would move every user's row
through momentum (and weight decay) even when that user was not in the batch: a cost that grows with N and a
silent change to other users. The user tables are therefore `nn.Embedding(sparse=True)`; for a sparse gradient
this optimizer is a *lazy* AdamW: only the rows present are read and written, each row keeps its own step count
(so its bias correction is the one it would have alone), and weight decay applies only when the row is updated.
Dense parameters (LoRA, e_0, prototypes, up-projections) get torch's AdamW update, fused (one kernel for all of
a group's tensors) where torch has a fused kernel for their device and dtype, else multi-tensor (foreach): no
per-parameter Python loop and no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adamw import adamw


class RowSparseAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, group)
                else:
                    dense.append(p)
            if dense:
                self._dense_step(dense, group)
        return loss

    def _dense_step(self, params: list[torch.Tensor], group: dict) -> None:
        """torch's AdamW (its public functional form) on a group's dense parameters, all at once."""
        (b1, b2), fused = group["betas"], fused_adamw_supported(params)
        for p in params:  # the fused kernel reads the step count on p's device, the foreach one on the host
            state, step_device = self.state[p], p.device if fused else torch.device("cpu")
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != step_device:  # e.g. a checkpoint saved on another device
                state["step"] = state["step"].to(step_device)
        states = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], foreach=not fused, fused=fused, amsgrad=False, beta1=b1, beta2=b2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _sparse_step(self, p: torch.Tensor, group: dict) -> None:
        """Lazy AdamW on the rows of a 2-D table that appear in the sparse gradient."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()  # (R,), (R, D)
        steps = state["row_step"][rows] + 1
        state["row_step"][rows] = steps
        m = state["exp_avg"][rows].lerp_(values, 1 - b1)
        v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        bc1, bc2 = 1 - b1 ** steps[:, None], 1 - b2 ** steps[:, None]
        update = (m / bc1) / ((v / bc2).sqrt() + eps)
        new_rows = p[rows] * (1 - lr * wd) - lr * update
        p.index_copy_(0, rows, new_rows.to(p.dtype))


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Like torch.nn.utils.clip_grad_norm_, but sparse gradients count (and are scaled) by their stored rows."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [(g.coalesce().values() if g.is_sparse else g).norm(2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))  # for a sparse gradient this scales its stored values
    return total


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW needs every tensor on one device type it has a kernel for, in a floating dtype."""
    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() and not p.is_complex() for p in params))
