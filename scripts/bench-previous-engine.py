"""The "before" column of docs/BENCHMARKS.md (engine, second generation): the previous engine
(commit 94dbc81, `RerankEngine.score_pairs`) timed on the same requests as `bench/engine.py`'s
cases, built by the same seeded code. Run it from a checkout of that commit:

    git worktree add /tmp/before 94dbc81
    cd /tmp/before && python /path/to/scripts/bench-previous-engine.py MODEL_DIR REPEATS

Prints one JSON line per case (pairs, pairs/s, p50 ms)."""
import json, random, sys, time
import numpy as np
import torch
sys.path.insert(0, ".")  # the checkout of 94dbc81
from serve.config import ModelConfig
from serve.engine.engine import RerankEngine
from serve.engine.inputs import RerankItem, ScorePair
from serve.engine.tiny import caption, draw, query_text, random_thing

CASES = {"short100": (1, 100, "short", 0.0), "batch32x8": (32, 8, "short", 0.0), "long100": (1, 100, "long", 0.0),
         "imgquery": (1, 100, "image", 0.0), "imgdocs": (1, 32, "short", 1.0)}

def pairs_of(case, seed=0):
    n_req, n_docs, qkind, share = CASES[case]
    rng = random.Random(seed)
    out = []
    for _ in range(n_req):
        if qkind == "image":
            q = RerankItem(images=(draw(random_thing(rng), rng, side=160),))
        elif qkind == "long":
            q = RerankItem(text=" and ".join(query_text(random_thing(rng), rng) for _ in range(80)))
        else:
            q = RerankItem(text=query_text(random_thing(rng), rng))
        docs = [RerankItem(images=(draw(random_thing(rng), rng, side=rng.choice((96, 128, 160))),)) if rng.random() < share
                else RerankItem(text=caption(random_thing(rng), rng)) for _ in range(n_docs)]
        out += [ScorePair(q, d, None, "query", f"documents.{i}") for i, d in enumerate(docs)]
    return out

model, repeats = sys.argv[1], int(sys.argv[2])
eng = RerankEngine.load(ModelConfig(source=model, max_batch_tokens=1 << 16), "fp32", device="cpu")
for case in CASES:
    pairs = pairs_of(case)
    eng.score_pairs(pairs)
    lat = []
    for _ in range(repeats):
        t = time.perf_counter(); eng.score_pairs(pairs); lat.append(time.perf_counter() - t)
    print(json.dumps({"case": case, "pairs": len(pairs), "pairs_per_s": len(pairs) * len(lat) / sum(lat), "p50_ms": 1000 * float(np.median(lat))}))
