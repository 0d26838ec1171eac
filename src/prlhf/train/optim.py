"""AdamW that touches only the user rows present in a batch, and gradient clipping that understands them.

With a dense user table, every step would allocate an (N, T_u*d) gradient and AdamW would move every user's row
through momentum (and weight decay) even when that user was not in the batch: a cost that grows with N and a
silent change to other users. The user tables are therefore `nn.Embedding(sparse=True)`; for a sparse gradient
this optimizer is a *lazy* AdamW: only the rows present are read and written, each row keeps its own step count
(so its bias correction is the one it would have alone), and weight decay applies only when the row is updated.
Dense parameters (LoRA, e_0, prototypes, up-projections) get the standard AdamW update.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"].item()
        grad = p.grad
        if wd:
            p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))

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
