"""Fine-tune with the transformers Trainer and PEFT's FRoD, accelerated by frod-kernels.

Builds a small Llama-style model from a config (nothing is downloaded), adds FRoD adapters with PEFT's
``get_peft_model``, makes them run through frod-kernels with one call (``frod_kernels.peft.accelerate``) and trains
with the stock ``Trainer`` on a toy task (continue an arithmetic sequence of tokens), printing the loss before and
after and the time per step. With a real model, swap ``build`` for ``AutoModelForCausalLM.from_pretrained``.

    python python/trainer_finetune.py                       # CPU, about a minute
    python python/trainer_finetune.py --bf16 --gradient-checkpointing
    torchrun --nproc-per-node 2 python/trainer_finetune.py  # DDP: the Trainer wraps the model itself

Under torchrun the Trainer builds DistributedDataParallel; ``ddp_broadcast_buffers=False`` skips the per-step
broadcast of buffers (FRoD's are constant patterns, identical on every rank).
"""

import argparse
import tempfile
import time

import torch
from peft import FrodConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import frod_kernels.peft as fkp

VOCAB = 256


class ArithmeticSequences(Dataset):
    """Token sequences ``a, a+d, a+2d, ...`` (mod VOCAB): learnable, so the loss visibly falls in a few steps."""

    def __init__(self, n: int, length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(hidden: int, layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.t0)


def mean_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        batch = data.ids[:64]
        return model(input_ids=batch, labels=batch).loss.item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step and device")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-2)
    ap.add_argument("--sparse-rate", type=float, default=0.05)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast in bfloat16 (FRoD parameters stay float32)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--torch-compile", action="store_true", help="the Trainer's torch.compile (slow to compile on CPU)")
    args = ap.parse_args(argv)

    model = build(args.hidden, args.layers)
    config = FrodConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        sparse_rate=args.sparse_rate, projection_prng_key=0)
    model = get_peft_model(model, config)
    fkp.accelerate(model)  # PEFT's FRoD layers now run through frod-kernels; configs and checkpoints unchanged
    model.print_trainable_parameters()

    data = ArithmeticSequences(n=args.batch * args.steps, length=args.seq)
    before = mean_loss(model, data)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 6),
            save_strategy="no",
            report_to=[],
            bf16=args.bf16,
            use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 without a GPU unless told
            gradient_checkpointing=args.gradient_checkpointing,
            torch_compile=args.torch_compile,
            ddp_broadcast_buffers=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[timer])
        trainer.train()
    after = mean_loss(model, data)
    steady = timer.times[len(timer.times) // 2:] or timer.times
    print(f"loss {before:.3f} -> {after:.3f} after {args.steps} steps; "
          f"{1e3 * sum(steady) / len(steady):.1f} ms per step (mean of the second half)")


if __name__ == "__main__":
    main()
