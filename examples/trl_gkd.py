"""TRL's GKDTrainer with kdkernels' fused JSD instead of its materialised-logits loss.

GKD (Agarwal et al., on-policy distillation) samples student completions in training_step
(with probability lmbda) and scores them with a generalised JSD between teacher and student over
the tokens whose label is not -100. This subclass keeps all of that and replaces only
compute_loss: both models' final hidden states go to fused_linear_kd_loss(divergence="jsd",
beta=self.beta), so neither [tokens x vocab] logits tensor is built. TRL's conventions are kept:
beta 0 = forward KL, beta 1 = reverse KL, temperature 1 in the loss (GKD's temperature is the
sampling temperature), the sum over kept tokens / num_items_in_batch when the Trainer gives it;
each model's logit scale and softcap come from kdkernels.integrations.hf.logit_transform.

GKDTrainer lives in trl.experimental.gkd since trl 1.x (older releases: trl.GKDTrainer). For
TRL's main distillation trainer see kdkernels.integrations.trl.KDDistillationTrainer.

    python examples/trl_gkd.py --teacher Qwen/Qwen2.5-1.5B-Instruct \
        --student Qwen/Qwen2.5-0.5B-Instruct --max-steps 100
"""

from __future__ import annotations

import argparse
import importlib.metadata

import torch

from kdkernels import fused_linear_kd_loss
from kdkernels.hf import models
from kdkernels.hf.logit_transform import loss_transform_options


def _find_gkd():
    """(GKDConfig, GKDTrainer, None), or (None, None, why not: the trl found, what is needed)."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None, None, ("trl is not installed; this example needs trl with GKDTrainer "
                            "(trl>=1.16: pip install 'kdkernels[trl]')")
    errors = []
    for where in ("trl.experimental.gkd", "trl"):  # current home first, then trl < 1.0's
        try:
            module = importlib.import_module(where)
            return module.GKDConfig, module.GKDTrainer, None
        except (ImportError, AttributeError) as err:
            errors.append(f"{where}: {type(err).__name__}: {err}")
    return None, None, (f"trl {version} is installed but has no GKDTrainer/GKDConfig in "
                        f"trl.experimental.gkd or trl ({'; '.join(errors)}); this example "
                        "needs trl>=1.16")


GKDConfig, GKDTrainer, TRL_MISSING = _find_gkd()


def _final_hidden(model, inputs):
    """Final hidden states through the model's own forward, where accelerate's mixed-precision
    autocast and the DDP/FSDP hooks live, as in GKDTrainer; logits for one position only."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]


def _head(model, dtype):
    """The LM head in the hidden states' dtype (the autocast dtype under mixed precision, where
    GKDTrainer's lm_head runs in it too)."""
    weight, bias = models.head(model)
    if weight.dtype != dtype:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return weight, bias


class FusedGKDTrainer(GKDTrainer or object):  # type: ignore[misc]
    """GKDTrainer whose loss is the fused generalised JSD (same value, no logits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden = _final_hidden(model, inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = _final_hidden(self.teacher_model, inputs)
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        weight, bias = _head(student, hidden.dtype)
        t_weight, t_bias = _head(teacher, teacher_hidden.dtype)
        # Position i predicts token i + 1; labels of -100 (prompt, padding) are left out, as in
        # GKDTrainer.compute_loss (which no longer slices by the batch's prompt width).
        loss = fused_linear_kd_loss(
            hidden[:, :-1], weight, teacher_hidden[:, :-1], t_weight, inputs["labels"][:, 1:],
            student_bias=bias, teacher_bias=t_bias, divergence="jsd", beta=self.beta,
            num_items=None if num_items_in_batch is None else float(num_items_in_batch),
            **loss_transform_options(student.config, teacher.config))
        return (loss, None) if return_outputs else loss


def main() -> None:
    if TRL_MISSING:
        raise SystemExit(TRL_MISSING)
    from datasets import Dataset
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
    trainer = FusedGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher),
        args=GKDConfig(output_dir=args.output, max_steps=args.max_steps, lmbda=0.5, beta=0.5,
                       per_device_train_batch_size=2, report_to=[]),
        processing_class=tok, train_dataset=Dataset.from_list(train))
    trainer.train()


if __name__ == "__main__":
    main()
