"""TRL's GKDTrainer with kdkernels' fused JSD instead of its materialised-logits loss.

GKD (Agarwal et al., on-policy distillation) samples student completions in training_step
and scores them with a generalised JSD between teacher and student over the completion
tokens. This subclass keeps all of that and replaces only compute_loss: both models' final
hidden states go to fused_linear_kd_loss(divergence="jsd", beta=self.beta), so neither
[tokens x vocab] logits tensor is built. TRL's convention (jsd with beta 0 = forward KL,
beta 1 = reverse KL, mean over completion tokens with label != -100) is kdkernels' too.

    python examples/trl_gkd.py --teacher Qwen/Qwen2.5-1.5B-Instruct \
        --student Qwen/Qwen2.5-0.5B-Instruct --max-steps 100
"""

from __future__ import annotations

import argparse

import torch

from kdkernels import fused_linear_kd_loss
from kdkernels.train import models

try:
    from trl import GKDConfig, GKDTrainer
except ImportError as err:  # keep the module importable for its docs and tests
    GKDTrainer = object
    GKDConfig = None
    TRL_MISSING = f"trl is not installed ({err}); pip install trl"
else:
    TRL_MISSING = None


class FusedGKDTrainer(GKDTrainer):  # type: ignore[misc, valid-type]
    """GKDTrainer whose loss is the fused generalised JSD (same value, no logits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_len = inputs["prompts"].shape[1]
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            hidden = models.base_model(unwrapped)(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                use_cache=False).last_hidden_state
        else:  # DDP/FSDP: through the wrapper (its hooks), logits for one position only
            hidden = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        with torch.no_grad():
            teacher_hidden = models.hidden_states_masked(self.teacher_model, inputs["input_ids"],
                                                         inputs["attention_mask"])
        # Position i predicts token i + 1: the completion's predictions start at prompt_len - 1.
        weight, bias = models.head(unwrapped)
        t_weight, t_bias = models.head(self.teacher_model)
        loss = fused_linear_kd_loss(
            hidden[:, prompt_len - 1:-1], weight, teacher_hidden[:, prompt_len - 1:-1], t_weight,
            inputs["labels"][:, prompt_len:], student_bias=bias, teacher_bias=t_bias,
            divergence="jsd", beta=self.beta, student_softcap=models.softcap(unwrapped),
            teacher_softcap=models.softcap(self.teacher_model))
        return (loss, None) if return_outputs else loss


def main() -> None:
    if TRL_MISSING:
        raise SystemExit(TRL_MISSING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--output", default="gkd-run")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.student)
    prompts = ["Write a Python function that reverses a string.",
               "Explain what a hash map is in one paragraph."] * 32
    train = [{"messages": [{"role": "user", "content": q},
                           {"role": "assistant", "content": "Sure."}]} for q in prompts]
    from datasets import Dataset

    trainer = FusedGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher),
        args=GKDConfig(output_dir=args.output, max_steps=args.max_steps, lmbda=0.5, beta=0.5,
                       per_device_train_batch_size=2, report_to=[]),
        processing_class=tok, train_dataset=Dataset.from_list(train))
    trainer.train()


if __name__ == "__main__":
    main()
