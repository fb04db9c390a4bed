"""Cross-salt probing: does another salt's cached prefix make a probe faster (a timing leak)?

One real `vllm serve` with the connector. Each trial, an owner sends a fresh
prompt under its own salt (vLLM's paged cache and cwm's store both hold it, the
capture is allowed to settle); then, in random order, a prober without the salt
sends (X) the owner's prompt and (Y) a fresh prompt of the same length nobody
sent, each under a new salt of its own. A leak would make X faster than Y. A
positive control (Z: the owner's own salt again, a real prefix hit) shows what a
hit looks like on the same server. Reports medians, p90s and a two-sided
permutation test of the difference in medians (and means), plus the hits each
probe got (`cached_tokens`, vLLM's external-hit counter), which must be 0.

    .venv/bin/python benchmarks/bench_cross_salt.py [--trials 15 --prompt-tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from e2e_tools import EXTERNAL_HITS, server

from cwm_connector.demo.tiny_model import build_tiny_model, make_prompt
from cwm_connector.demo.vllm_process import VllmServer

CONDITIONS = ("other_salt_has_prefix", "nobody_has_prefix", "own_salt_hit")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--settle-s", type=float, default=1.0, help="wait for the owner's capture")
    p.add_argument("--permutations", type=int, default=20000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cross_salt.json"))
    return p.parse_args()


def probe(srv: VllmServer, prompt: str, salt: str) -> dict[str, float]:
    """TTFT of a 1-token completion, and the hits it got."""
    hits = srv.metric(EXTERNAL_HITS)
    reply = srv.complete(prompt, salt=salt, max_tokens=1)
    return {
        "ttft_s": reply["ttft_s"],
        "cached_tokens": reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        "external_hit_tokens": srv.metric(EXTERNAL_HITS) - hits,
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def permutation_p(a: list[float], b: list[float], stat: Any, num: int, rng: random.Random) -> float:
    """Two-sided permutation test of |stat(a) - stat(b)|; the p-value (with +1 smoothing)."""
    observed = abs(stat(a) - stat(b))
    pooled = a + b
    extreme = 0
    for _ in range(num):
        rng.shuffle(pooled)
        if abs(stat(pooled[: len(a)]) - stat(pooled[len(a) :])) >= observed - 1e-15:
            extreme += 1
    return (extreme + 1) / (num + 1)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = build_tiny_model(work / "model")
    srv = server(model, work / "store", work, "bench")
    rng = random.Random(args.seed)
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in CONDITIONS}
    srv.start()
    try:
        for _ in range(3):  # warm up: first requests pay one-off costs
            srv.complete(make_prompt(model, args.prompt_tokens, seed=rng.randrange(1 << 30)),
                         salt=f"warm-{rng.random()}", max_tokens=1)  # fmt: skip
        for i in range(args.trials):
            owned = make_prompt(model, args.prompt_tokens, seed=10_000 + i)
            fresh = make_prompt(model, args.prompt_tokens, seed=20_000 + i)
            srv.complete(owned, salt=f"owner-{i}", max_tokens=1)
            time.sleep(args.settle_s)
            order = [("other_salt_has_prefix", owned), ("nobody_has_prefix", fresh)]
            rng.shuffle(order)
            for condition, prompt in order:
                samples[condition].append(probe(srv, prompt, f"probe-{condition}-{i}"))
            samples["own_salt_hit"].append(probe(srv, owned, f"owner-{i}"))
    finally:
        srv.stop()
    ttft = {c: [s["ttft_s"] for s in samples[c]] for c in CONDITIONS}
    x, y = ttft["other_salt_has_prefix"], ttft["nobody_has_prefix"]
    perm_rng = random.Random(args.seed + 1)
    return {
        "trials": args.trials,
        "prompt_tokens": args.prompt_tokens,
        "conditions": {
            c: {
                "median_ms": round(statistics.median(ttft[c]) * 1e3, 2),
                "p90_ms": round(percentile(ttft[c], 90) * 1e3, 2),
                "max_cached_tokens": max(s["cached_tokens"] for s in samples[c]),
                "max_external_hit_tokens": max(s["external_hit_tokens"] for s in samples[c]),
                "ttft_ms": [round(t * 1e3, 2) for t in ttft[c]],
            }
            for c in CONDITIONS
        },
        "x_minus_y_median_ms": round((statistics.median(x) - statistics.median(y)) * 1e3, 2),
        "p_value_median": permutation_p(x, y, statistics.median, args.permutations, perm_rng),
        "p_value_mean": permutation_p(x, y, statistics.fmean, args.permutations, perm_rng),
        "permutations": args.permutations,
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="cwm-cross-salt-") as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'condition':<24}{'median ms':>11}{'p90 ms':>9}{'cached':>8}{'external':>10}")
    for name, c in result["conditions"].items():
        hits = f"{c['max_cached_tokens']:>8}{c['max_external_hit_tokens']:>10.0f}"
        print(f"{name:<24}{c['median_ms']:>11.2f}{c['p90_ms']:>9.2f}{hits}")
    print(
        f"other-salt minus nobody, medians: {result['x_minus_y_median_ms']:+.2f} ms; "
        f"permutation p (median) = {result['p_value_median']:.3f}, "
        f"p (mean) = {result['p_value_mean']:.3f} ({result['permutations']} permutations)"
    )
    leaked = any(result["conditions"][c]["max_cached_tokens"] or
                 result["conditions"][c]["max_external_hit_tokens"]
                 for c in CONDITIONS[:2])  # fmt: skip
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
