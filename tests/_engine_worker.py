"""One rank of a training engine (DDP, DeepSpeed ZeRO-3, FSDP1, FSDP2 on CPU/gloo) running each
trainer integration for 2 SGD steps on tiny Llama models, for tests/test_engines.py.

    torchrun --nproc_per_node 2 -m tests._engine_worker ENGINE OUT   # ENGINE: ddp, zero3, ...
    python -m tests._engine_worker single OUT                        # the reference

Every run sees the same 2 global batches of 4 examples (sequential sampling: rank r gets
examples 2r, 2r + 1 of each batch; the single process gets all 4), so the engines must end at
the single process's weights. Rank 0 saves {trainer: full student state dict} to OUT.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from typing import Any

import torch
from torch import nn

from kdkernels.hf import engine_heads
from kdkernels.integrations.trl_loss import fused_divergence_loss
from tests._dist import exit_worker
from tests._train_helpers import tiny_pair, token_stream
from tests._trl_helpers import prompts, tiny_tokenizer

TRAINERS = ("kd", "topk", "trl", "fused")
# These trainers get models with an LM head of its own; trl keeps the tiny models' tied
# embeddings (whose weight ZeRO-3 may still hold gathered from the embedding), so both head
# layouts meet every engine.
UNTIED = ("kd", "topk", "fused")
GLOBAL_BATCH, STEPS, SEQ, K = 4, 2, 12, 5


def engine_args(engine: str, world: int) -> dict[str, Any]:
    """TrainingArguments for the engine: fp32, SGD, no shuffling, the per-device batch that
    makes a global batch of GLOBAL_BATCH."""
    base: dict[str, Any] = dict(
        max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, train_sampling_strategy="sequential", seed=3,
        dataloader_num_workers=0)
    if engine == "zero3":
        base["accelerator_config"] = {"use_configured_state": True}  # join_zero3's
        # Persistence threshold 0: the tiny model's parameters are partitioned, as a real
        # model's are (small ones would otherwise stay whole and hide the defect).
        base["deepspeed"] = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "train_batch_size":
            GLOBAL_BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_prefetch_bucket_size": 0,
                                  "stage3_gather_16bit_weights_on_model_save": False}}
    elif engine in ("fsdp1", "fsdp2"):
        base["accelerator_config"] = {"use_configured_state": True}  # join_fsdp's
        base["fsdp"] = "full_shard"
        base["fsdp_config"] = {"version": int(engine[-1]),
                               "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                               "use_orig_params": True, "sync_module_states": False}
    else:
        base["use_cpu"] = True
    return base


def head_sharded(trainer: Any) -> bool:
    """Whether the engine really shards the student's head: read outside any forward, it is
    a DTensor (FSDP2), or not [V, D] locally (ZeRO-3: [0]; FSDP1: a piece of a flat shard)."""
    student = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    weight = student.get_output_embeddings().weight
    whole = (student.config.vocab_size, student.config.hidden_size)
    return isinstance(weight, torch.distributed.tensor.DTensor) or tuple(weight.shape) != whole


def full_state(trainer: Any) -> dict[str, torch.Tensor]:
    """The student's full parameters, whatever engine holds them."""
    model = trainer.model_wrapped
    student = trainer.accelerator.unwrap_model(model)
    params = dict(student.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: p.detach().clone() for k, p in params.items()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.summon_full_params(model):  # nested units add a prefix to the names
            return {k.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for k, p in student.named_parameters()}
    return {k: (p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p)
            .detach().clone() for k, p in params.items()}


def kd_data() -> list[dict[str, torch.Tensor]]:
    ids = token_stream(GLOBAL_BATCH * STEPS * SEQ).reshape(-1, SEQ)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[1::3, -2:] = 0  # some padded rows: uneven token counts across ranks
    labels[mask == 0] = -100
    return [{"input_ids": i, "labels": y, "attention_mask": m}
            for i, y, m in zip(ids, labels, mask, strict=True)]


def topk_data(teacher: nn.Module) -> list[dict[str, torch.Tensor]]:
    rows = kd_data()
    ids = torch.stack([r["input_ids"] for r in rows])
    with torch.no_grad():
        lp = torch.log_softmax(8.0 * teacher(input_ids=ids).logits.double(), -1)
    top = lp.topk(K, -1)
    return [{**r, "teacher_ids": i, "teacher_logprobs": v.float()}
            for r, i, v in zip(rows, top.indices, top.values, strict=True)]


def fused_trainer_class():
    """A Trainer whose loss calls fused_divergence_loss on the head parameters directly,
    inside the wrapped forward: the function itself must gather a ZeRO-3 / DTensor head (under
    ZeRO-3 the teacher is sharded too, and its forward has ended when the loss reads it)."""
    from transformers import Trainer

    from kdkernels.integrations.hf_common import shard_teacher

    class FusedLossTrainer(Trainer):
        def __init__(self, *args: Any, teacher_model: nn.Module, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.teacher_engine = shard_teacher(self, self.teacher_model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            student = self.accelerator.unwrap_model(model)
            num = num_items_in_batch / self.accelerator.num_processes
            loss, _, _ = engine_heads.run_in_forward(model, student, self._loss, student, inputs,
                                                     num)
            return loss

        def _loss(self, student, inputs, num):
            ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
            t_hidden = engine_heads.teacher_hidden(self.teacher_engine, self.teacher_model, ids,
                                                   mask)
            keep = (labels[:, 1:] != -100).long()
            return fused_divergence_loss(
                hidden[:, :-1], t_hidden[:, :-1], student.lm_head.weight,
                self.teacher_model.lm_head.weight, keep, 0.5, num_items_in_batch=num,
                temperature=1.3, labels=labels[:, 1:], ce_weight=0.3)

    return FusedLossTrainer


def untied(model: nn.Module) -> nn.Module:
    """The model with its own LM head (a scaled copy of the embeddings, so it differs)."""
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    out = type(model)(config)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        out.lm_head.weight.copy_(model.lm_head.weight * 1.5)
    return out


def models(name: str) -> tuple[nn.Module, nn.Module]:
    student, teacher = tiny_pair(seq=16)
    return (untied(student), untied(teacher)) if name in UNTIED else (student, teacher)


def build(name: str, engine: str, world: int, out_dir: str):
    from transformers import TrainingArguments

    from kdkernels.integrations.hf import KDTrainer, TopKKDTrainer

    student, teacher = models(name)
    args = engine_args(engine, world)
    if name == "trl":
        from datasets import Dataset
        from trl import DistillationConfig

        from kdkernels.integrations.trl import KDDistillationTrainer

        config = DistillationConfig(output_dir=out_dir, beta=0.5, temperature=1.0,
                                    max_completion_length=4, bf16=False,
                                    generation_kwargs={"do_sample": False}, **args)
        return KDDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                     train_dataset=Dataset.from_list(prompts(8)),
                                     processing_class=tiny_tokenizer(), ce_weight=0.2)
    targs = TrainingArguments(output_dir=out_dir, **args)
    if name == "kd":
        return KDTrainer(model=student, teacher_model=teacher, args=targs,
                         train_dataset=kd_data(), temperature=2.0, kd_weight=0.6, ce_weight=0.4)
    if name == "topk":
        return TopKKDTrainer(model=student, args=targs, train_dataset=topk_data(teacher),
                             tail="bucket", kd_weight=0.7, ce_weight=0.3)
    return fused_trainer_class()(model=student, teacher_model=teacher, args=targs,
                                 train_dataset=kd_data())


def join_zero3() -> None:
    """transformers starts DeepSpeed's process group with no backend, which accelerate reads as
    one process when there is no GPU; start the shared state first, on gloo."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


def join_fsdp() -> None:
    """accelerate builds FSDP only for GPU-like worlds (MULTI_GPU, ...), never MULTI_CPU: start
    the shared gloo state on the CPU and declare it multi-device, so that the Trainer's
    accelerator takes its FSDP path (which then runs on the CPU tensors)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.MULTI_GPU
    state.device = torch.device("cpu")  # not cpu:RANK, which FSDP1 takes for another device


def main(engine: str, out: str) -> None:
    torch.set_num_threads(1)
    if engine == "zero3":
        join_zero3()
    elif engine.startswith("fsdp"):
        join_fsdp()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    names = os.environ.get("KDK_ENGINE_TRAINERS", ",".join(TRAINERS)).split(",")
    saved: dict[str, Any] = {}
    for name in names:
        try:
            trainer = build(name, engine, world, os.path.dirname(out))
            trainer.train()
            saved[name] = full_state(trainer)
            saved[name + ":sharded"] = head_sharded(trainer)
        except Exception:  # one trainer's failure is reported, the others still run
            saved[name] = {"crash": traceback.format_exc()}
            print(f"rank {rank} {engine}/{name}:\n{saved[name]['crash']}", flush=True)
        if engine == "zero3":  # accelerate takes a DeepSpeed plugin with a first Accelerator only
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
    if rank == 0:
        torch.save(saved, out)
    exit_worker()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
