"""A Trainer fine-tune of an ``attn_implementation="ahfa"`` model, one process or one per GPU under FSDP2, for the
loss curves to be compared (issue 15): the same random-weight decoder (Qwen2 layout), the same token windows in
the same order (a sequential sampler), the same global batch.

    python scripts/fsdp_check.py --out one.json                                   # one process
    torchrun --nproc_per_node N scripts/fsdp_check.py --out many.json --fsdp      # N processes, FSDP2 on CUDA
    python scripts/fsdp_check.py --compare one.json many.json                     # the largest loss difference

Random weights and tokens: equality of the training, nothing about quality. On CPU processes Trainer runs
data-parallel without FSDP (accelerate has no CPU FSDP); the JSON records what ran (``distributed``, ``fsdp``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def train(out: str, fsdp: bool, layers: int, seq_len: int, steps: int, global_batch: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_ahfa  # noqa: F401  (registers "ahfa")

    world = int(os.environ.get("WORLD_SIZE", 1))
    if global_batch % world:
        raise SystemExit(f"--global-batch {global_batch} must be divisible by the {world} processes")
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                  max_position_embeddings=seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ahfa")
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32000, (steps * global_batch, seq_len),
                                                                        generator=g)]
    cuda = torch.cuda.is_available()
    args = TrainingArguments(output_dir="/tmp/fsdp-check", per_device_train_batch_size=global_batch // world,
                             max_steps=steps, learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no",
                             bf16=cuda, use_cpu=not cuda, dataloader_drop_last=True,
                             **(dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}) if fsdp else {}))

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *_, **__):  # the same windows in the same order for every run
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = SequentialTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        record = {"processes": world, "distributed": str(trainer.accelerator.distributed_type),
                  "fsdp": bool(trainer.is_fsdp_enabled), "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "layers": layers, "seq_len": seq_len, "global_batch": global_batch, "losses": losses}
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps(record))


def compare(one: str, many: str) -> None:
    a, b = (json.load(open(p)) for p in (one, many))
    diffs = [abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"])]
    print(f"{b['processes']} processes ({b['distributed']}, fsdp {b['fsdp']}) against {a['processes']}: "
          f"{len(diffs)} steps, largest relative loss difference {max(diffs):.2e}")


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out")
parser.add_argument("--fsdp", action="store_true")
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--global-batch", type=int, default=8)
parser.add_argument("--compare", nargs=2, metavar=("ONE", "MANY"))
cli = parser.parse_args()
if cli.compare:
    compare(*cli.compare)
elif cli.out:
    train(cli.out, cli.fsdp, cli.layers, cli.seq_len, cli.steps, cli.global_batch)
else:
    parser.error("give --out (train) or --compare ONE MANY")
