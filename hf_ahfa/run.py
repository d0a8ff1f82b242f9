"""Run another tool with ``attn_implementation="ahfa"`` available, without editing its code.

    python -m hf_ahfa.run MODULE [ARGS...]

imports ``hf_ahfa`` (which registers ``"ahfa"`` with Transformers) and then runs ``python -m MODULE ARGS...``
in the same process, e.g. lm-evaluation-harness::

    python -m hf_ahfa.run lm_eval --model hf --model_args pretrained=PATH,attn_implementation=ahfa --tasks ...
"""

from __future__ import annotations

import runpy
import sys

import hf_ahfa  # noqa: F401  (registers "ahfa")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
