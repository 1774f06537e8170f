"""logit_transform(config): every model family's logit post-processing, checked against the
model's own forward (a tiny model built from its transformers config) where one can be built."""

from __future__ import annotations

import pytest
import torch
import transformers

from kdkernels.hf.logit_transform import apply_logit_transform
from kdkernels.integrations.hf import logit_transform

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)

# family -> (config class, its logit options, expected (scale, softcap))
FAMILIES = {
    "cohere": ("CohereConfig", dict(logit_scale=0.25), (0.25, None)),
    "cohere2": ("Cohere2Config", dict(logit_scale=0.25), (0.25, None)),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0), (0.25, None)),
    "granitemoe": ("GraniteMoeConfig", dict(logits_scaling=4.0, num_local_experts=2,
                                            num_experts_per_tok=1), (0.25, None)),
    "falcon_h1": ("FalconH1Config", dict(lm_head_multiplier=0.5), (0.5, None)),
    # logits_scaling = hidden_size / dim_model_base = 32 / 8: hidden states divided by 4
    "minicpm3": ("MiniCPM3Config", dict(dim_model_base=8, **MLA), (0.25, None)),
    "hyperclovax": ("HyperCLOVAXConfig", dict(logits_scaling=0.5), (0.5, None)),
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=2.0, head_dim=16), (1.0, 2.0)),
    "llama": ("LlamaConfig", {}, (1.0, None)),
}


def _config(family: str):
    name, options, _ = FAMILIES[family]
    return getattr(transformers, name)(**TINY, **options)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transform_read_from_config(family):
    assert logit_transform(_config(family)) == FAMILIES[family][2]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transform_matches_model_forward(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids).last_hidden_state
        raw = hidden @ model.get_output_embeddings().weight.T
    scale, softcap = logit_transform(model.config)
    assert scale != 1.0 or softcap is not None or family == "llama"
    torch.testing.assert_close(apply_logit_transform(raw, scale, softcap), logits,
                               rtol=1e-5, atol=1e-6)


def test_output_multiplier_before_softcap_from_text_config():
    # Muse Glimmer (multimodal): the text config holds both; the scale goes before the softcap.
    config = transformers.MuseGlimmerConfig()
    text = config.get_text_config()
    assert logit_transform(config) == (text.output_multiplier, text.final_logit_softcapping)


def test_multimodal_text_config_keeps_hyperclovax_rule():
    config = transformers.HyperCLOVAXVisionV2Config(text_config={"model_type": "hyperclovax",
                                                                "logits_scaling": 0.5})
    assert logit_transform(config) == (0.5, None)


def test_unset_scale_means_unscaled():
    config = transformers.CohereConfig(**TINY)
    config.logit_scale = None  # Cohere Compass checkpoints without a scale
    assert logit_transform(config) == (1.0, None)


@pytest.mark.parametrize("attr,value", [("logits_scaling", 0.0), ("logit_scale", -1.0),
                                        ("lm_head_multiplier", float("nan"))])
def test_bad_scale_names_the_attribute(attr, value):
    config = transformers.LlamaConfig(**TINY)
    setattr(config, attr, value)
    with pytest.raises(ValueError, match=f"config.{attr} of the 'llama' model"):
        logit_transform(config)


def test_not_a_config():
    with pytest.raises(ValueError, match="config must be a Hugging Face PretrainedConfig"):
        logit_transform({"logit_scale": 2.0})
