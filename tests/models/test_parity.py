"""Exactness: our forward against transformers' own OPT and Llama models on the same weights.

Checkpoints are saved with save_pretrained and read back through model.path, as a user would.
float32, greedy, 32 new tokens, prompts of different lengths left padded: identical tokens and
logits within 1e-4 (absolute) at every generated step.
"""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.engine import Callbacks, Engine
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.weights import LocalWeights
from tests.conftest import LLAMA_CONFIGS, OPT_CONFIGS, left_padded_prompts

GEN_LEN = 32
LOGIT_ATOL = 1e-4
LENGTHS = [10, 7, 4, 9, 12, 3]


class LogitRecorder(Callbacks):
    def __init__(self):
        self.logits = {}

    def on_logits(self, token, batch, logits):
        self.logits[(token, batch)] = logits.clone()

    def stacked(self, num_batches: int) -> torch.Tensor:
        """(num_prompts, gen_len, vocab) in prompt order."""
        steps = [torch.cat([self.logits[(i, k)] for k in range(num_batches)])
                 for i in range(GEN_LEN)]
        return torch.stack(steps, dim=1)


def reference(model, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_LEN,
                             min_new_tokens=GEN_LEN, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", [*OPT_CONFIGS, *LLAMA_CONFIGS])
@pytest.mark.parametrize("schedule,gpu_batch_size,num_gpu_batches",
                         [("zigzag", 6, 1), ("zigzag", 3, 2), ("row_by_row", 2, 3)])
def test_tokens_and_logits_match_transformers(hf_checkpoint, name, schedule, gpu_batch_size,
                                              num_gpu_batches):
    path, model = hf_checkpoint(name)
    ids, mask = left_padded_prompts(LENGTHS, model.config.vocab_size, model.config.pad_token_id)
    ref_tokens, ref_logits = reference(model, ids, mask)
    assert ref_tokens.unique().numel() > 10, "the reference must vary its tokens to prove much"

    recorder = LogitRecorder()
    weights = LocalWeights(path)
    policy = Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches)
    engine = Engine(weights.spec, weights, policy, schedule=schedule, callbacks=recorder)
    ours = engine.generate(ids, mask, GEN_LEN)

    assert torch.equal(ours.output_ids, ref_tokens)
    torch.testing.assert_close(recorder.stacked(num_gpu_batches), ref_logits, atol=LOGIT_ATOL,
                               rtol=0)


def test_spec_read_from_config_matches_model(hf_checkpoint):
    path, model = hf_checkpoint("llama-gqa")
    spec = LocalWeights(path).spec
    assert (spec.family, spec.num_layers, spec.hidden) == ("llama", 3, 72)
    assert (spec.num_heads, spec.num_kv_heads, spec.rope_theta) == (6, 2, 5000.0)
    assert spec.weight_bytes(4) == sum(p.numel() for p in model.parameters()) * 4
