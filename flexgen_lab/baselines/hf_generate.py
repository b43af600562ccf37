"""Baseline `system=hf`: transformers' own model and `generate`, everything resident.

It runs on the very weights the engine uses (dummy weights are copied into the HF model), so
its tokens are the engine's reference and its throughput the benchmark's yardstick.

    python -m flexgen_lab run system=hf model=opt-1.3b
"""

from __future__ import annotations

import time

import torch

from flexgen_lab.engine.engine import Generation
from flexgen_lab.models import families
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import part_names


def hf_config(spec: ModelSpec):
    """A transformers config with the spec's shapes."""
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  max_position_embeddings=spec.max_positions, pad_token_id=spec.pad_token_id,
                  bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                  tie_word_embeddings=spec.tie_embeddings)
    if spec.family == "opt":
        from transformers import OPTConfig

        return OPTConfig(ffn_dim=spec.ffn, word_embed_proj_dim=spec.hidden,
                         do_layer_norm_before=True, **common)
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, **dict(spec.rope_scaling)}
    return LlamaConfig(intermediate_size=spec.ffn, num_key_value_heads=spec.num_kv_heads,
                       rms_norm_eps=spec.norm_eps, rope_parameters=rope,
                       attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias,
                       head_dim=spec.head_dim, **common)


def hf_model(spec: ModelSpec, weights, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """transformers' CausalLM for `spec`, holding exactly the weight source's tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype)
    family = families.get(spec.family)
    state = {}
    for part, j in part_names(spec):
        for name, tensor in weights.part(part, j, dtype).items():
            key_part = "embed" if name.startswith("embed") else part
            state[family.hf_key(name, key_part, j)] = tensor
    if spec.tie_embeddings:
        state["lm_head.weight"] = state[family.hf_key("embed_tokens.weight", "embed")]
    model.load_state_dict(state, strict=True, assign=True)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:  # a non-persistent buffer: rebuild it off the meta device
        model.model.rotary_emb = type(rotary)(config=model.config)
    if spec.tie_embeddings:
        model.tie_weights()
    return model.to(device).eval()


class _StepClock:
    """A generate() streamer marking when each token arrives (the first put is the prompt)."""

    def __init__(self, sync):
        self.sync = sync
        self.times: list[float] = []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_len: int,
             batch_size: int, device: torch.device | None = None) -> Generation:
    """Greedy generation of exactly gen_len tokens per prompt, batch by batch, timed as ours.
    `device` is where inputs go (by default the first parameter's: a dispatched model's may be
    on the meta device, offloaded)."""
    device = device or next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    outputs, prefill_s, decode_s = [], 0.0, 0.0
    for s in range(0, input_ids.shape[0], batch_size):
        clock = _StepClock(sync)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids[s:s + batch_size].to(device),
                                 attention_mask=attention_mask[s:s + batch_size].to(device),
                                 max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False,
                                 eos_token_id=None, streamer=clock)
        # times[0]: prompt accepted, times[1]: first token out (prefill), times[-1]: last token
        prefill_s += clock.times[1] - start
        decode_s += clock.times[-1] - clock.times[1]
        outputs.append(out[:, input_ids.shape[1]:].cpu())
    return Generation(torch.cat(outputs), prefill_s, decode_s)
