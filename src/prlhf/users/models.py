"""User models (P-RLHF.md §2): map user indices to T_u soft-prompt vectors of the LM's hidden size d.

Index 0 is the generic user e_0, used for unseen users and trained by the (1 - alpha) term of the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prlhf.users.covotes import kmeans

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
    """Base class: forward(user_idx (B,)) -> soft tokens (B, T_u, d).

    A kind owns its row semantics, so that the code that edits users (prlhf.runs.users) and fits new ones
    (prlhf.train.adapt) needs no switch on the kind: which state-dict entry is the per-user table of rows
    (`row_key`, (N+1, R), row 0 = the generic user), which entries all users share (`shared_keys`), how a row
    becomes soft tokens (`embed_rows`), which row starts a new user at the generic user (`generic_row`), which
    row has the mean embedding of several users (`mean_row`) and, where it exists, the row of a given embedding
    under this model's shared parameters (`rows_for_embeddings`).
    """

    kind: str = ""
    row_key: str | None = None         # None: the kind has no per-user parameters (uniform)
    shared_keys: tuple[str, ...] = ()
    rows_are_codes = False             # rows are O(1) codes (mixing logits, low-rank vectors), not soft tokens

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int):
        super().__init__()
        self.num_users, self.num_tokens, self.hidden_size = num_users, num_tokens, hidden_size

    def config(self) -> dict:
        """Everything `from_config` needs to rebuild the module (weights apart)."""
        return {"kind": self.kind, "num_users": self.num_users, "num_tokens": self.num_tokens,
                "hidden_size": self.hidden_size}

    @classmethod
    def from_config(cls, config: dict) -> UserModel:
        """An uninitialised module of this kind, to load saved weights into."""
        fields = {k: v for k, v in config.items() if k != "kind"}
        return cls(fields.pop("num_users"), fields.pop("num_tokens"), fields.pop("hidden_size"), init="zeros",
                   **fields)

    def code_parameters(self) -> list[nn.Parameter]:
        """Per-user parameters that are O(1) codes rather than soft tokens (they may learn at their own rate)."""
        return [self.get_parameter(self.row_key)] if self.rows_are_codes else []

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, R) rows -> (B, T_u, d) soft tokens over this model's shared parameters."""
        raise TypeError(f"the {self.kind!r} user model has no per-user rows")

    def generic_row(self) -> torch.Tensor:
        """(R,) the row a new user starts from to begin at the generic user e_0."""
        raise TypeError(f"the {self.kind!r} user model has no per-user rows")

    @staticmethod
    def mean_row(rows: torch.Tensor) -> torch.Tensor:
        """(n, R) -> (R,) a row whose embedding is the mean of the n users' embeddings."""
        return rows.mean(0)  # right for every kind whose embedding is linear in its row

    def rows_for_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """(n, T_u, d) embeddings -> (n, R) rows giving them here, or None when a row cannot be carried over to
        other shared parameters (a user imported from another run)."""
        return None


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
    row_key, shared_keys = "offsets.weight", ("generic",)  # rows: (N+1, T_u*d) offsets o_i

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, factors: torch.Tensor | None = None, **_):
        super().__init__(num_users, num_tokens, hidden_size)
        g = torch.Generator().manual_seed(seed)
        self.generic = nn.Parameter(init_soft_tokens((num_tokens, hidden_size), input_embeddings, init, g))
        if factors is None:
            offsets = init_soft_tokens((num_users + 1, num_tokens * hidden_size), input_embeddings, init, g)
        else:  # o_i = f_i B: users who vote alike start alike, each row about the size of a random one
            r = factors.shape[1]
            basis = init_soft_tokens((r, num_tokens * hidden_size), input_embeddings, init, g) / r ** 0.5
            offsets = factors.float() @ basis  # (N+1, T_u*d)
        offsets[0] = 0.0  # row 0 is the generic user: no offset, and it receives no gradient (see forward)
        self.offsets = nn.Embedding(num_users + 1, num_tokens * hidden_size, _weight=offsets, sparse=sparse)

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        offset = self.offsets(user_idx) * (user_idx != 0).to(self.offsets.weight.dtype)[:, None]  # (B, T_u*d)
        return self.embed_rows(offset)

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.generic.unsqueeze(0) + rows.view(-1, self.num_tokens, self.hidden_size)  # (B, T_u, d)

    def generic_row(self) -> torch.Tensor:
        return torch.zeros(self.num_tokens * self.hidden_size)  # o = 0 is e_0

    def rows_for_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.generic.detach().unsqueeze(0)).reshape(embeddings.shape[0], -1)  # o = e - e_0


class ClusterUserModel(UserModel):
    """Low-rank model: K prototypes V_k (T_u x d); e_i = sum_k softmax(w_i)_k V_k; w_0 is the generic user."""

    kind = "cluster"
    row_key, shared_keys = "weights.weight", ("prototypes",)  # rows: (N+1, K) mixture logits w_i
    rows_are_codes = True  # a user picks a cluster only once their logits differ by O(1)

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *, num_clusters: int = 4,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, logit_std: float = 0.1, factors: torch.Tensor | None = None,
                 **_):
        super().__init__(num_users, num_tokens, hidden_size)
        self.num_clusters = num_clusters
        g = torch.Generator().manual_seed(seed)
        self.prototypes = nn.Parameter(
            init_soft_tokens((num_clusters, num_tokens, hidden_size), input_embeddings, init, g))
        # Random logits break the symmetry between prototypes from the first step; small ones start every user
        # near an even mix of them.
        logits = logit_std * torch.randn(num_users + 1, num_clusters, generator=g)
        if factors is not None and num_clusters > 1:
            logits += covote_cluster_logits(factors, num_clusters, g)
        self.weights = nn.Embedding(num_users + 1, num_clusters, sparse=sparse, _weight=logits)

    def config(self) -> dict:
        return {**super().config(), "num_clusters": self.num_clusters}

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        return self.embed_rows(self.weights(user_idx))

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        mix = torch.softmax(rows, dim=-1)  # (B, K)
        return torch.einsum("bk,ktd->btd", mix, self.prototypes)  # (B, T_u, d)

    def generic_row(self) -> torch.Tensor:
        return self.weights.weight[0].detach().float().clone()  # w_0, trained as the generic user

    @staticmethod
    def mean_row(rows: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.softmax(rows, dim=-1).mean(0))  # softmax(log p) = p: the mean mixture


class LowRankUserModel(UserModel):
    """Individual model with low-rank offsets: e_i = e_0 + reshape(U v_i), v_i in R^r, U shared (T_u*d x r).

    Memory is N*r + T_u*d*r instead of N*T_u*d: a million users at r = 8 take 32 MB, where the individual table
    of a 576-wide LM with T_u = 10 would take 23 GB. v_0 = 0 is the generic user.
    """

    kind = "lowrank"
    row_key, shared_keys = "vectors.weight", ("generic", "up")  # rows: (N+1, r) vectors v_i
    rows_are_codes = True  # v_i ~ N(0, vector_std^2 I) at the start

    def __init__(self, num_users: int, num_tokens: int, hidden_size: int, *, rank: int = 8,
                 input_embeddings: torch.Tensor | None = None, init: str = "vocab", seed: int = 0,
                 sparse: bool = SPARSE_USER_TABLES, vector_std: float = 1.0, factors: torch.Tensor | None = None,
                 **_):
        super().__init__(num_users, num_tokens, hidden_size)
        self.rank = rank
        g = torch.Generator().manual_seed(seed)
        self.generic = nn.Parameter(init_soft_tokens((num_tokens, hidden_size), input_embeddings, init, g))
        # U's columns start as soft-token sets like the others, scaled so that U v (v ~ N(0, I)) has their size.
        up = init_soft_tokens((rank, num_tokens * hidden_size), input_embeddings, init, g) / rank ** 0.5
        self.up = nn.Parameter(up.T.contiguous())  # (T_u*d, r)
        vectors = torch.randn(num_users + 1, rank, generator=g) * vector_std
        if factors is not None:  # the leading dimensions start at the co-vote factors, the rest as before
            q = min(rank, factors.shape[1])
            vectors[:, :q] = factors[:, :q].float() * vector_std
        vectors[0] = 0.0
        self.vectors = nn.Embedding(num_users + 1, rank, _weight=vectors, sparse=sparse)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank}

    def forward(self, user_idx: torch.Tensor) -> torch.Tensor:
        return self.embed_rows(self.vectors(user_idx) * (user_idx != 0).to(self.up.dtype)[:, None])  # v_0 = 0

    def embed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        offset = (rows @ self.up.T).view(-1, self.num_tokens, self.hidden_size)  # (B, T_u, d)
        return self.generic.unsqueeze(0) + offset

    def generic_row(self) -> torch.Tensor:
        return torch.zeros(self.rank)  # v = 0 is e_0


def covote_cluster_logits(factors: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """(N+1, r) co-vote factors -> (N+1, K) logits putting each user who has factors on their k-means cluster's
    prototype with weight 0.9 (the rest shared evenly); users without factors, and the generic user, get 0."""
    logits = torch.zeros(factors.shape[0], num_clusters)
    has = factors.abs().sum(1) > 0
    has[0] = False
    if has.sum() >= num_clusters:
        assign = kmeans(factors[has].float(), num_clusters, generator)
        logits[has.nonzero().squeeze(1), assign] = math.log(0.9 * (num_clusters - 1) / 0.1)
    return logits


class RowsOverShared(nn.Module):
    """Trainable rows for new users over a frozen user model's shared parameters (few-shot fitting), indexed by
    the new users' own index 0..n-1."""

    def __init__(self, frozen: UserModel, init_rows: torch.Tensor):
        super().__init__()
        self.frozen = frozen
        self.kind, self.num_tokens, self.hidden_size = frozen.kind, frozen.num_tokens, frozen.hidden_size
        self.rows = nn.Parameter(init_rows.clone())  # (n, R)

    def forward(self, local_idx: torch.Tensor) -> torch.Tensor:
        return self.frozen.embed_rows(self.rows[local_idx])  # (B, T_u, d)


KINDS: dict[str, type[UserModel]] = {c.kind: c for c in (UniformUserModel, IndividualUserModel, ClusterUserModel,
                                                          LowRankUserModel)}


def user_model_class(kind: str) -> type[UserModel]:
    if kind not in KINDS:
        raise ValueError(f"unknown user model {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def build_user_model(kind: str, num_users: int, num_tokens: int, hidden_size: int, **kwargs) -> UserModel:
    return user_model_class(kind)(num_users, num_tokens, hidden_size, **kwargs)


def user_model_from_config(config: dict) -> UserModel:
    """Rebuild an (uninitialised) user model from `UserModel.config()`, to load saved weights into."""
    return user_model_class(config["kind"]).from_config(config)
