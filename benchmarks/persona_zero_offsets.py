"""Diagnostic: `prlhf bench persona` P-DPO individual with zero-initialised per-user offsets (every seen user starts
at the generic embedding e_0) and user-model learning rate 3e-3, on SmolLM2-135M at the default data size.

    python benchmarks/persona_zero_offsets.py OUT

The offsets are zeroed after the library builds the user model (no option for it exists: this is a probe, not a
feature). Results: benchmarks/results/persona_smollm2_zero_offsets/.
"""

import sys
from pathlib import Path

import torch

import prlhf.users.models as user_models
from prlhf.bench.persona import run_persona_bench

_build = user_models.IndividualUserModel.__init__


def _zero_offsets(self, *args, **kwargs):
    _build(self, *args, **kwargs)
    with torch.no_grad():
        self.offsets.weight.zero_()


if __name__ == "__main__":
    user_models.IndividualUserModel.__init__ = _zero_offsets
    run_persona_bench(Path(sys.argv[1]), model="smollm2-135m", threads=2, methods=["p_dpo_individual"], epochs=4,
                      user_tokens=4, curve_points=4, user_lr=3e-3)
