"""Serving latency on CPU: p50 / p99 per call for batch 1 and batch 256, for
the baseline template (built-ins only) and the template with every installed
plugin, eager and torch.export-ed, beside the plan's FLOPs per example.

    python benchmarks/serving.py [--model feed_ctr] [--iters 200] [--threads 1]

Exported programs are exported at each batch size (static shapes), as a
server would for fixed batch buckets. Runs in well under 2 minutes.
"""

from __future__ import annotations

import argparse
import time

import torch


def bench(fn, dense, sparse, iters: int) -> tuple[float, float]:
    with torch.no_grad():
        for _ in range(max(3, iters // 10)):
            fn(dense, sparse)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn(dense, sparse)
            times.append(time.perf_counter() - t)
    ts = torch.tensor(times) * 1e3
    return float(ts.quantile(0.5)), float(ts.quantile(0.99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="feed_ctr")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from smt_host.host import Host
    from smt_host.model.template import example_batch
    from smt_host.serve.export import export_model, plain_kjt

    host = Host.create()
    spec = host.default_ecosystem().model(args.model)
    variants = [("baseline", host.plan(spec, builtins_only=True)), ("all plugins", host.plan(spec))]
    print(
        f"model {args.model}; plugins: {', '.join(d for d in host.spm.distributions if d != 'smt-host') or 'none'}; "
        f"torch threads {args.threads}; {args.iters} calls per cell\n"
    )
    print(f"{'template':<12} {'FLOPs/ex':>12} {'mode':<9} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'us/ex p50':>10}")
    for name, plan in variants:
        model = host.build(plan, spec).model.eval()
        for b in (1, 256):
            batch = example_batch(spec, b)
            sparse = plain_kjt(batch.sparse)
            iters = args.iters if b == 1 else max(20, args.iters // 4)
            program = export_model(model, spec, batch_size=b).module()
            for mode, fn in (("eager", model), ("exported", program)):
                p50, p99 = bench(fn, batch.dense, sparse, iters)
                print(
                    f"{name:<12} {plan.cost.flops:>12,.0f} {mode:<9} {b:>5} {p50:>9.3f} {p99:>9.3f} {p50 * 1e3 / b:>10.1f}"
                )
        tech = [e.technique for e in plan.entries if e.dist != "smt-host"]
        print(f"{'':<12} techniques: {', '.join(tech) or 'built-ins only'}")


if __name__ == "__main__":
    main()
