"""User models (P-RLHF.md §2): map user indices to T_u soft-prompt vectors of the LM's hidden size d.

Index 0 is the generic user e_0, used for unseen users and trained by the (1 - alpha) term of the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from prlhf.users.defaults import USER_MODELS  # noqa: F401  (re-exported)

# Per-user tables are sparse embeddings: a step reads and updates only the rows of users in its batch (see
# prlhf.train.optim), so its cost does not grow with the number of users.
SPARSE_USER_TABLES = True


def init_soft_tokens(shape: tuple[int, ...], input_embeddings: torch.Tensor | None, init: str,
                     generator: torch.Generator) -> torch.Tensor:
    """Initial values: copies of randomly sampled vocabulary embeddings (the authors' default) or U(-0.5, 0.5)."""
    if init == "vocab":
        if input_embeddings is None:
            raise ValueError("init='vocab' needs the LM's input embedding matrix")
        vocab, d = input_embeddings.shape
        n = int(torch.Size(shape).numel()) // d  # shape's trailing dims hold whole d-vectors
        rows = torch.randint(0, vocab, (n,), generator=generator)
        return input_embeddings.detach()[rows].float().reshape(shape).clone()
    if init == "uniform":
        return torch.rand(shape, generator=generator) - 0.5
    if init == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown init {init!r}: expected 'vocab', 'uniform' or 'zeros'")


class UserModel(nn.Module):
    """Base class: forward(user_idx (B,)) -> soft tokens (B, T_u, d)."""

    kind: str = ""

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int):
        super().__init__()
        self.num_users, self.num_tokens, self.hidden_size = num_users, num_tokens, hidden_size

    def config(self) -> dict:
        return {"kind": self.kind, "num_users": self.num_users, "num_tokens": self.num_tokens,
                "hidden_size": self.hidden_size}

    def code_parameters(self) -> list[nn.Parameter]:
        """Per-user parameters that are O(1) codes rather than soft tokens (they may learn at their own rate)."""
        return []


class UniformUserModel(UserModel):
    """Every user is the same user: no soft tokens at all, so P-DPO reduces exactly to vanilla DPO."""

    kind = "uniform"

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, **_):
        super().__init__(num_users, 0, hidden_size)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(user_idx.shape[0], 0, self.hidden_size, device=user_idx.device)


class IndividualUserModel(UserModel):
    """e_i = e_0 + o_i for seen users i = 1..N, and e_0 for the generic user (additive, as in the authors' code)."""

    kind = "individual"

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, **_):
        super().__init__(num_users, num_tokens, hidden_size)
        g = torch.Generator().manual_seed(seed)
        self.generic = nn.Parameter(init_soft_tokens((num_tokens, hidden_size), input_embeddings, init, g))
        offsets = init_soft_tokens((num_users + 1, num_tokens * hidden_size), input_embeddings, init, g)
        offsets[0] = 0.0  # row 0 is the generic user: no offset, and it receives no gradient (see forward)
        self.offsets = nn.Embedding(num_users + 1, num_tokens * hidden_size, _weight=offsets, sparse=sparse)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        b = user_idx.shape[0]
        offset = self.offsets(user_idx).view(b, self.num_tokens, self.hidden_size)  # (B, T_u, d)
        offset = offset * (user_idx != 0).to(offset.dtype)[:, None, None]
        return self.generic.unsqueeze(0) + offset  # (B, T_u, d)


class ClusterUserModel(UserModel):
    """Low-rank model: K prototypes V_k (T_u x d); e_i = sum_k softmax(w_i)_k V_k; w_0 is the generic user."""

    kind = "cluster"

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *, num_clusters: int = 4,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, logit_std: float = 0.1, **_):
        super().__init__(num_users, num_tokens, hidden_size)
        self.num_clusters = num_clusters
        g = torch.Generator().manual_seed(seed)
        self.prototypes = nn.Parameter(
            init_soft_tokens((num_clusters, num_tokens, hidden_size), input_embeddings, init, g))
        # Random logits break the symmetry between prototypes from the first step; small ones start every user
        # near an even mix of them.
        self.weights = nn.Embedding(num_users + 1, num_clusters, sparse=sparse,
                                    _weight=logit_std * torch.randn(num_users + 1, num_clusters, generator=g))

    def config(self) -> dict:
        return {**super().config(), "num_clusters": self.num_clusters}

    def code_parameters(self) -> list[nn.Parameter]:
        return [self.weights.weight]  # mixing logits: a user picks a cluster only once they differ by O(1)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        mix = torch.softmax(self.weights(user_idx), dim=-1)  # (B, K)
        return torch.einsum("bk,ktd->btd", mix, self.prototypes)  # (B, T_u, d)


class LowRankUserModel(UserModel):
    """Individual model with low-rank offsets: e_i = e_0 + reshape(U v_i), v_i in R^r, U shared (T_u*d x r).

    Memory is N*r + T_u*d*r instead of N*T_u*d: a million users at r = 8 take 32 MB, where the individual table
    of a 576-wide LM with T_u = 10 would take 23 GB. v_0 = 0 is the generic user.
    """

    kind = "lowrank"

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *, rank: int = 8,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, **_):
        super().__init__(num_users, num_tokens, hidden_size)
        self.rank = rank
        g = torch.Generator().manual_seed(seed)
        self.generic = nn.Parameter(init_soft_tokens((num_tokens, hidden_size), input_embeddings, init, g))
        # U's columns start as soft-token sets like the others, scaled so that U v (v ~ N(0, I)) has their size.
        up = init_soft_tokens((rank, num_tokens * hidden_size), input_embeddings, init, g) / rank ** 0.5
        self.up = nn.Parameter(up.T.contiguous())  # (T_u*d, r)
        vectors = torch.randn(num_users + 1, rank, generator=g)
        vectors[0] = 0.0
        self.vectors = nn.Embedding(num_users + 1, rank, _weight=vectors, sparse=sparse)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank}

    def code_parameters(self) -> list[nn.Parameter]:
        return [self.vectors.weight]  # v_i ~ N(0, I) at the start

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        v = self.vectors(user_idx) * (user_idx != 0).to(self.up.dtype)[:, None]  # (B, r)
        offset = (v @ self.up.T).view(-1, self.num_tokens, self.hidden_size)    # (B, T_u, d)
        return self.generic.unsqueeze(0) + offset


_CLASSES = {c.kind: c for c in (UniformUserModel, IndividualUserModel, ClusterUserModel, LowRankUserModel)}


def build_user_model(kind: str, num_users: int, num_tokens: int, hidden_size: int, **kwargs) -> UserModel:
    if kind not in _CLASSES:
        raise ValueError(f"unknown user model {kind!r}: expected one of {', '.join(USER_MODELS)}")
    return _CLASSES[kind](num_users, num_tokens, hidden_size, **kwargs)


def user_model_from_config(config: dict) -> UserModel:
    """Rebuild an (uninitialised) user model from `UserModel.config()`, to load saved weights into."""
    config = dict(config)
    kind = config.pop("kind")
    extra = {"init": "zeros"}
    if kind == "cluster":
        extra["num_clusters"] = config.pop("num_clusters")
    if kind == "lowrank":
        extra["rank"] = config.pop("rank")
    return build_user_model(kind, config["num_users"], config["num_tokens"], config["hidden_size"], **extra)
