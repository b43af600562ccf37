"""Registry of model families: the per-layer functions each architecture provides.

A family module defines: layer_shapes, embedding_shapes, head_shapes (parameter name -> shape),
embed, attention_inputs, attention_output, mlp, head (the forward pieces), attention_scale and
SCORE_SCALE (where the 1/sqrt(d) goes), and hf_key (our names -> checkpoint keys).
"""

from __future__ import annotations

from types import ModuleType

from flexgen_lab.models import llama, opt

FAMILY_MODULES: dict[str, ModuleType] = {"opt": opt, "llama": llama}


def get(family: str) -> ModuleType:
    if family not in FAMILY_MODULES:
        raise ValueError(f"model family {family!r} is not supported; "
                         f"allowed: {sorted(FAMILY_MODULES)}")
    return FAMILY_MODULES[family]


def score_scale(spec) -> float:
    """The scale applied inside q.k^T (OPT pre-scales q, so it uses 1)."""
    fam = get(spec.family)
    return fam.SCORE_SCALE if fam.SCORE_SCALE is not None else fam.attention_scale(spec)
