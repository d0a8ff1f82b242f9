"""Long-context perplexity of a model on your own books, ahfa against sdpa, through ahfa-eval.

Every context length ends at the same token of each book and scores the same last tokens, so a lower
perplexity at a longer context means the model used the extra text.

    python examples/long_context_perplexity.py --model google/gemma-3-270m book1.txt book2.txt
"""

import argparse

from hf_ahfa.eval.cli import main as ahfa_eval


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument("books", nargs="+", help="plain-text files, one book each")
    p.add_argument("--context-lengths", default="2048,8192,16384,32768", help="comma-separated token counts")
    p.add_argument("--score-tokens", type=int, help="tokens scored at the end of each context (default: 4096, or "
                   "half the shortest context when that is shorter)")
    p.add_argument("--out-dir", default="eval/results", help="folder of the result files")
    args = p.parse_args()
    score = ["--score-tokens", str(args.score_tokens)] if args.score_tokens else []
    ahfa_eval(["perplexity", "--protocol", "long", "--model", args.model, "--data-files", *args.books,
               "--context-lengths", args.context_lengths, *score, "--out-dir", args.out_dir, "--name", "long-context"])


if __name__ == "__main__":
    main()
