import math

import pytest
import torch

from prlhf.data.collate import IGNORE_INDEX
from prlhf.model.logprobs import sequence_logps


def test_one_token_shift_and_masking():
    """Vocab 2, uniform logits except position 1, which puts log-odds log(3) on token 1: p(token 1) = 3/4.
    labels: [-100, 1, 1] -> tokens 1 and 2 are scored by logits at positions 0 and 1:
    log(1/2) + log(3/4)."""
    logits = torch.zeros(1, 3, 2)
    logits[0, 1, 1] = math.log(3)
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(0.75))


def test_masked_positions_do_not_count():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert torch.equal(sequence_logps(logits, labels), torch.zeros(2))


def test_shape_errors():
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
