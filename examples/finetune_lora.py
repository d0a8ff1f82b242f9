"""Fine-tune a causal LM with LoRA through Trainer, attention computed by ahfa.

    python examples/finetune_lora.py --model HuggingFaceTB/SmolLM2-135M --text my_corpus.txt --steps 100
"""

import argparse
import inspect

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

import hf_ahfa  # noqa: F401  (registers attn_implementation="ahfa")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument("--text", required=True, help="a plain-text file to train on")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--output-dir", default="lora-out")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="ahfa", dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    ids = tokenizer(open(args.text, encoding="utf-8").read())["input_ids"]
    blocks = [{"input_ids": ids[i : i + args.block_size]} for i in range(0, len(ids) - args.block_size + 1, args.block_size)]
    if not blocks:
        raise SystemExit(f"--text holds fewer than --block-size ({args.block_size}) tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); take the name it knows
    known = inspect.signature(TrainingArguments).parameters
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    trainer = Trainer(
        model=model,
        args=TrainingArguments(args.output_dir, max_steps=args.steps, per_device_train_batch_size=2, learning_rate=2e-4,
                               logging_steps=10, report_to=[], save_strategy="no",
                               dataloader_pin_memory=torch.cuda.is_available(), **{checkpointing: True}),
        train_dataset=blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
