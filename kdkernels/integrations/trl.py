"""KDDistillationTrainer: TRL's DistillationTrainer with kdkernels' fused loss.

    from trl import DistillationConfig
    from kdkernels.integrations.trl import KDDistillationTrainer

    trainer = KDDistillationTrainer(model=student, teacher_model=teacher,
                                    args=DistillationConfig(beta=0.5, ...),
                                    train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

Everything TRL does stays TRL's: on-policy generation (transformers or vLLM), tool calls and
their masks, multimodal inputs, the DDP/FSDP/DeepSpeed forward redirection, num_items_in_batch,
the entropy metric. Only the loss changes: TRL's chunked `_chunked_divergence_loss` becomes
``fused_linear_kd_loss`` (kdkernels.integrations.trl_loss.fused_divergence_loss), with TRL's
conventions (jsd beta 0 = forward KL, 1 = reverse KL, no T**2 unless scale_by_t2=True; the
temperature is TRL's args.temperature) and each model's logit scale and softcap read by
kdkernels.integrations.hf.logit_transform.

Sparse (top-k) teachers: DistillationTrainer always scores with a local teacher model and has
no hook for teacher log-probs; TRL's top-k path is the separate, experimental
trl.experimental.server_distillation.ServerDistillationTrainer, which this class does not cover.

Importing this module never fails: without a suitable trl, TRL_MISSING says what was found and
what is needed, and constructing KDDistillationTrainer raises ImportError with that text.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hf.logit_transform import logit_transform
from .trl_check import trl_class_problem
from .trl_loss import check_extra_options, extra_options, fused_divergence_loss

# DistillationTrainer's methods this class overrides or calls (present since trl 1.16).
_TRL_HOOKS = ("_compute_loss", "_get_last_hidden_state")
# The multimodal fields TRL's generation step leaves in a micro-batch for the backbones.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _trl_problem() -> str | None:
    """Why trl cannot be used here, naming the version found and the one needed; None if it can."""
    return trl_class_problem("KDDistillationTrainer", "trl", ("DistillationTrainer",), _TRL_HOOKS)


TRL_MISSING = _trl_problem()
if TRL_MISSING is None:
    from trl import DistillationTrainer as _Base
else:  # keeps this module importable (docs, tests); construction raises TRL_MISSING
    _Base = object


class KDDistillationTrainer(_Base):  # type: ignore[misc, valid-type]
    """trl.DistillationTrainer whose loss is kdkernels' fused_linear_kd_loss.

    Takes DistillationTrainer's arguments, plus the loss options TRL's do not set
    (trl_loss.extra_options(): every KDOptions field but beta, temperature, the logit
    transforms and the contract's): divergence (default: the generalised JSD with
    args.beta), skew, alpha, scale_by_t2 (default False, as in TRL), kd_weight, ce_weight
    (a hard-label term on the sampled completion tokens; default 0), impl, chunk_size,
    max_workspace_bytes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if TRL_MISSING is not None:
            raise ImportError(TRL_MISSING)
        loss_options = {k: kwargs.pop(k) for k in extra_options() if k in kwargs}
        self.kd_options = check_extra_options(loss_options)
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("KDDistillationTrainer needs teacher_model (a causal LM sharing "
                             "the student's vocabulary)")

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's _compute_loss with the fused loss: the same inputs, backbones and masks, and
        the same return value (loss, detached entropy sum, valid count)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool outputs inside a completion are not trained on
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep,
                                             **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():  # through the teacher's wrapper, so FSDP/DeepSpeed gather it
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, keep, **multimodal)

        head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        device = head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(f"the student's lm_head is on {device} but the teacher's is on "
                             f"{teacher_head.weight.device}; place both on one device in their "
                             "device_map")
        # The heads go as they are: fused_divergence_loss gathers ZeRO-3 and FSDP2 ones
        # (engine_heads), and TRL's compute_loss runs this inside the student wrapper's forward.
        scale, softcap = logit_transform(unwrapped_student.config)
        t_scale, t_softcap = logit_transform(unwrapped_teacher.config)
        loss, entropy_sum, n_valid = fused_divergence_loss(
            hidden.to(device), teacher_hidden.to(device), head.weight, teacher_head.weight,
            loss_mask.to(device), self.beta, num_items_in_batch=num_items_in_batch,
            student_lm_head_bias=head.bias, teacher_lm_head_bias=teacher_head.bias,
            student_logit_scale=scale, teacher_logit_scale=t_scale,
            student_final_logit_softcapping=softcap, teacher_final_logit_softcapping=t_softcap,
            temperature=self.temperature, labels=inputs["completion_ids"].to(device),
            **self.kd_options)
        return loss, entropy_sum, n_valid

