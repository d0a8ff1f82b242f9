"""ahfa-eval: measure ahfa against baseline attention implementations; results under eval/results/.

Commands: speed (kernels, a whole model, or a model's attention calls), perplexity (WikiText-style and
long-context), needle (pass-key retrieval in long contexts), glue (fine-tuning), calibrate (per-layer adaptive
settings within a perplexity budget), train (a long-context LoRA fine-tune: loss and step time). Each writes
JSON (config,
versions, GPU, commit, per-item numbers) and a Markdown summary, and ends with a line naming the files it
wrote; perplexity, needle and glue show progress and resume after an interruption. Errors in the input end
the command with one line and exit status 2.
"""

from __future__ import annotations

import argparse

from hf_ahfa.eval import calibrate, glue, needle, perplexity, speed_command, train
from hf_ahfa.eval.usage import HelpFormatter, UsageError

COMMANDS = (speed_command, perplexity, needle, glue, calibrate, train)  # each: add_parser(subparsers), which sets run(args) -> files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ahfa-eval", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        paths = args.run(args)
    except UsageError as err:
        parser.exit(2, f"ahfa-eval {args.command}: error: {' '.join(str(err).splitlines())}\n")
    if paths:  # empty on the processes of `accelerate launch` other than the main one
        print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)


if __name__ == "__main__":
    main()
