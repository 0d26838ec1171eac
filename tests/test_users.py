import pytest
import torch

from prlhf.users.models import KINDS, RowsOverShared, build_user_model, user_model_from_config
from prlhf.users.registry import GENERIC_INDEX, UserRegistry


def test_registry_maps_sorted_ids_to_1_based_and_unknown_to_generic(tmp_path, caplog):
    class R:  # minimal record
        def __init__(self, u):
            self.user_id = u

    reg = UserRegistry.from_records([R("bob"), R("alice"), R("bob")])
    assert reg.index("alice") == 1 and reg.index("bob") == 2 and len(reg) == 2
    with caplog.at_level("INFO"):
        assert reg.index("carol") == GENERIC_INDEX == 0
        reg.index("carol")
    assert sum("carol" in m for m in caplog.messages) == 1  # one notice per unseen user, not per lookup
    reg.save(tmp_path / "users.json")
    again = UserRegistry.load(tmp_path / "users.json")
    assert again.user_ids == ["alice", "bob"] and again.index("bob") == 2
    assert torch.equal(again.indices(["bob", "zed", "alice"]), torch.tensor([2, 0, 1]))


def test_individual_is_generic_plus_offset():
    emb = torch.randn(50, 8)
    um = build_user_model("individual", 3, 2, 8, input_embeddings=emb, seed=0)
    out = um(torch.tensor([0, 1, 3]))  # (B, T_u, d)
    assert out.shape == (3, 2, 8)
    assert torch.equal(out[0], um.generic.detach())
    assert torch.allclose(out[1], um.generic + um.offsets.weight[1].view(2, 8))
    # vocab init: the generic tokens are copies of real vocabulary rows
    assert all(any(torch.equal(row, e) for e in emb) for row in um.generic.detach())


def test_individual_gradient_reaches_only_batch_users_and_generic():
    um = build_user_model("individual", 4, 2, 8, init="uniform")
    um(torch.tensor([2, 0])).sum().backward()
    grad = um.offsets.weight.grad
    assert grad.is_sparse  # only the rows of the batch's users are stored (see prlhf.train.optim)
    grad = grad.to_dense()
    assert grad[2].abs().sum() > 0
    assert torch.equal(grad[[0, 1, 3, 4]], torch.zeros(4, 16))  # generic row has no offset; others untouched
    assert um.generic.grad.abs().sum() > 0


def test_cluster_mixes_prototypes_with_softmax_weights():
    um = build_user_model("cluster", 5, 3, 4, num_clusters=2, init="uniform", seed=1)
    idx = torch.tensor([0, 4])
    w = torch.softmax(um.weights.weight[idx], -1)
    expected = w[:, 0, None, None] * um.prototypes[0] + w[:, 1, None, None] * um.prototypes[1]
    assert torch.allclose(um(idx), expected)


def test_cluster_logit_std_sets_how_far_from_an_even_mix_users_start():
    """std 0: every user is the even mix of the prototypes; a large std puts most users near one prototype."""
    even = build_user_model("cluster", 200, 1, 4, num_clusters=2, init="uniform", logit_std=0.0)
    assert torch.equal(torch.softmax(even.weights.weight, -1), torch.full((201, 2), 0.5))
    spread = build_user_model("cluster", 200, 1, 4, num_clusters=2, init="uniform", logit_std=3.0)
    top = torch.softmax(spread.weights.weight, -1).max(-1).values
    assert (top > 0.9).float().mean() > 0.5


def test_lowrank_vector_std_sets_how_far_from_the_generic_user_users_start():
    """The same draw scaled: std 0 puts every user at e_0, and the generic user's vector stays 0."""
    unit = build_user_model("lowrank", 50, 2, 4, rank=3, init="uniform", seed=1)
    small = build_user_model("lowrank", 50, 2, 4, rank=3, init="uniform", seed=1, vector_std=0.1)
    assert torch.allclose(small.vectors.weight, 0.1 * unit.vectors.weight)
    assert torch.equal(small.vectors.weight[0], torch.zeros(3))
    at_generic = build_user_model("lowrank", 50, 2, 4, rank=3, init="uniform", vector_std=0.0)
    idx = torch.arange(51)
    assert torch.allclose(at_generic(idx), at_generic.generic.expand(51, 2, 4))


def test_uniform_has_no_tokens():
    um = build_user_model("uniform", 5, 10, 4)
    assert um.num_tokens == 0 and um(torch.tensor([1, 2])).shape == (2, 0, 4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_round_trip(kind):
    um = build_user_model(kind, 3, 2, 4, num_clusters=3, rank=2, init="uniform")
    again = user_model_from_config(um.config())
    again.load_state_dict(um.state_dict())
    idx = torch.tensor([0, 1, 2, 3])
    assert torch.equal(again(idx), um(idx))


def test_unknown_kind_and_init():
    with pytest.raises(ValueError, match="unknown user model"):
        build_user_model("bogus", 1, 1, 4)
    with pytest.raises(ValueError, match="unknown init"):
        build_user_model("individual", 1, 1, 4, init="bogus")


PERSONALIZED = [k for k, cls in KINDS.items() if cls.row_key is not None]


@pytest.mark.parametrize("kind", PERSONALIZED)
def test_each_kind_owns_its_row_semantics(kind):
    """The contract the code that edits and fits users relies on (prlhf.runs.users, prlhf.train.adapt): a new kind
    passes this test or those commands do not work with it."""
    um = build_user_model(kind, 4, 2, 3, num_clusters=3, rank=2, init="uniform", seed=1)
    with torch.no_grad():
        um.get_parameter(um.row_key)[0] += 0.3  # row 0 must mean the generic user whatever is stored there
    state = um.state_dict()
    rows = state[um.row_key]  # (N+1, R)
    assert rows.shape[0] == um.num_users + 1
    assert set(state) == {um.row_key, *um.shared_keys}  # every entry is the rows or shared
    idx = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(um.embed_rows(rows[idx]), um(idx))  # a row's soft tokens are the user's
        generic = um(torch.tensor([0]))
        torch.testing.assert_close(um.embed_rows(um.generic_row()[None]), generic)  # a new user starts at e_0
        mean = um.embed_rows(um.mean_row(rows[[1, 3]])[None])[0]
        torch.testing.assert_close(mean, um(torch.tensor([1, 3])).mean(0))  # mean row = mean embedding
        carried = um.rows_for_embeddings(um(idx))
        if carried is not None:  # the kind can carry users to other shared parameters: it inverts embed_rows
            torch.testing.assert_close(um.embed_rows(carried), um(idx))
        fitter = RowsOverShared(um, rows[[2, 4]].clone())
        assert torch.equal(fitter(torch.tensor([1, 0])), um(torch.tensor([4, 2])))
    assert [p.shape for p in um.code_parameters()] in ([], [rows.shape])
    again = user_model_from_config(um.config())
    again.load_state_dict(state)
    assert torch.equal(again(idx), um(idx))  # config() is complete


def test_compact_registry_answers_like_the_registry():
    from prlhf.users.registry import CompactRegistry

    ids = [f"u{i * 7919 % 1000:04d}" for i in range(1000)] + ["ü-ñ", "a", "ab"]
    registry = UserRegistry(ids)
    compact = CompactRegistry.of(registry)
    assert len(compact) == len(registry) and compact.user_ids == registry.user_ids
    probes = ids + ["", "zzz", "u", "u00000", "ü"]
    assert [compact.index(u) for u in probes] == [registry._index.get(u, 0) for u in probes]
    assert [u in compact for u in probes] == [u in registry for u in probes]
    assert compact.indices(probes).tolist() == registry.indices(probes).tolist()
    assert compact.nbytes < 20 * len(ids)  # ids are 1-5 bytes: offsets and indices take 4 bytes each
