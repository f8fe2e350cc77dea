"""Where a mixed-task batch should switch from rebuilding one weight per adapter to the group's shared products.

Times one RECAST query layer of MiniLM-L6's size (384 x 384, default config: 2 templates over a 2-layer group, 2 row
blocks) on batches of 64, 2,048 and 32,768 tokens whose rows cycle through k distinct adapters, once forced onto each
path (``peft_recast.combination.REBUILD_TOKENS_PER_MEMBER`` set to 0: always rebuild; to 10**9: always share), and prints
the ratio rebuild / shared (> 1: sharing is faster). The rule in ``Linear._prefers_shared_products`` shares when
``k * REBUILD_TOKENS_PER_MEMBER * m >= (m - 1) * tokens``.

    python benchmarks/mixed_batch_rule.py --threads 1
"""

import argparse

import peft
import torch
from torch import nn

import peft_recast
from peft_recast import combination
from peft_recast.apps.runtime import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stack = nn.ModuleList([nn.ModuleDict({"query": nn.Linear(384, 384)}) for _ in range(2)])
    config = peft_recast.RecastConfig(target_modules=["query"], init_weights=False)
    model = peft.get_peft_model(nn.ModuleDict({"layers": stack}), config, adapter_name="a0")
    for i in range(1, 1024):
        model.add_adapter(f"a{i}", peft_recast.RecastConfig(target_modules=["query"], init_weights=False))
    model.eval()
    layer = stack[0]["query"]
    rule = combination.REBUILD_TOKENS_PER_MEMBER
    print(f"{'tokens':>7} {'adapters':>8} {'shared ms':>10} {'rebuild ms':>11} {'rebuild/shared':>15} {'rule picks':>10}")
    for rows, tokens in [(64, 1), (64, 32), (1024, 32)]:
        x = torch.randn(rows, tokens, 384)
        for count in [1, 2, 4, 16, 64, 256, 1024]:
            if count > rows:
                continue
            names = [f"a{i % count}" for i in range(rows)]
            times = {}
            with torch.no_grad():
                for path, value in (("shared", 10**9), ("rebuild", 0)):
                    combination.REBUILD_TOKENS_PER_MEMBER = value
                    times[path] = median_seconds(lambda: layer(x, adapter_names=names), args.repeats)
            combination.REBUILD_TOKENS_PER_MEMBER = rule
            picks = "shared" if count * rule * 2 >= rows * tokens else "rebuild"
            print(f"{rows * tokens:>7} {count:>8} {1e3 * times['shared']:>10.2f} {1e3 * times['rebuild']:>11.2f} "
                  f"{times['rebuild'] / times['shared']:>15.2f} {picks:>10}", flush=True)


if __name__ == "__main__":
    main()
