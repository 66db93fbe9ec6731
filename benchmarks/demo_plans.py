"""Demo plan candidates on SmolLM2-135M-Instruct: density, plan, perplexity (16 x 512-token WikiText-2 test
windows), predicted speed-up and the three chat answers, one JSON line per variant (how the demo's plan was chosen).

    python benchmarks/demo_plans.py [VARIANT ...] > results/demo_plans.jsonl
"""

import copy
import json
import sys

import pifa

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "examples"))
from demo_smollm2 import PROMPTS, answer, smollm2_gguf

from pifa.app.gguf import load_gguf
from pifa.data import calibration_batches, chat_documents, load_texts
from pifa.evaluate import perplexity_of_text

dense, tok = load_gguf(smollm2_gguf(), "float32", "cpu")
calib = calibration_batches(
    tok, chat_documents(tok, load_texts("../shared/data/wikitext-2/valid.txt")), 32, 256, seed=0
)
test = "\n\n".join(load_texts("../shared/data/wikitext-2/test.txt"))
variants = {
    "mlp@0.75": dict(density=0.75, targets=("*mlp*",), latency_table=".cache/latency.json"),
    "mlp@0.7": dict(density=0.7, targets=("*mlp*",), latency_table=".cache/latency.json"),
    "capped@0.7": dict(density=0.7, latency_table=".cache/latency.json"),
    "plain@0.8": dict(density=0.8),
    "sens@0.85": dict(density=0.85, allocation="sensitivity", latency_table=".cache/latency.json"),
    "sens@0.8": dict(density=0.8, allocation="sensitivity", latency_table=".cache/latency.json"),
    "capped@0.9": dict(density=0.9, latency_table=".cache/latency.json"),
}
cache = pifa.SensitivityCache()
for name in sys.argv[1:] or variants:
    m = copy.deepcopy(dense)
    cfg = pifa.CompressionConfig(method="mpifa", **variants[name])
    import time

    t0 = time.time()
    r = pifa.compress(m, cfg, calib, device="cpu", progress=False, sensitivity_cache=cache)
    ppl = perplexity_of_text(m, tok, test, 512, 4, 16)["ppl"]
    ans = [answer(m, tok, p, 40) for p in PROMPTS]
    print(
        json.dumps(
            {
                "variant": name,
                "density": r.density,
                "pred": r.predicted_speedup,
                "ppl": ppl,
                "seconds": time.time() - t0,
                "alloc": r.allocation_cost if hasattr(r, "allocation_cost") else None,
                "dense": sum(x.kind == "dense" for x in r.modules),
                "answers": ans,
            }
        ),
        flush=True,
    )
