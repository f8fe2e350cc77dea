"""Saving many adapters of one model: ``peft_recast.save_adapters`` against PEFT's ``save_pretrained``.

A model of MiniLM-L6's shape (6 layers, 384 wide; random weights: the times do not depend on them) holds ``A``
RECAST adapters of the default config (48 numbers each). Both ways write the same files (``tests/library/
test_save_adapters.py``); this times them side by side (:func:`~peft_recast.apps.runtime.side_by_side`, medians) on
saving a few adapters, per adapter saved, and reports ``save_adapters`` of all ``A`` in one call. PEFT's
``save_pretrained(selected_adapters=...)`` filters the whole state dict against every other adapter's name for each
adapter it saves, so its time per adapter grows with ``A``; all ``A`` through it is projected from that figure.

    OMP_NUM_THREADS=1 python benchmarks/save_many.py --json docs/benchmarks/serving/save-many-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from typing import Optional

import peft
import torch
from transformers import BertConfig, BertModel

import peft_recast
from peft_recast.apps.runtime import side_by_side
from peft_recast.files import atomic_write

FULL = dict(adapters=[10, 100, 1000], sample=5, repeats=3)
QUICK = dict(adapters=[3, 6], sample=2, repeats=2)


def model_holding(adapters: int, layers: int = 6, hidden: int = 384) -> peft.PeftModel:
    """A BERT of MiniLM-L6's shape holding ``adapters`` RECAST adapters: ``default``, ``a1``, ``a2``, ..."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                        intermediate_size=4 * hidden, vocab_size=1000)
    model = peft.get_peft_model(BertModel(config), peft_recast.RecastConfig(init_weights=False))
    for index in range(1, adapters):
        model.add_adapter(f"a{index}", peft_recast.RecastConfig(init_weights=False))
    return model


def measure(adapters: int, sample: int, repeats: int, small: bool = False) -> dict:
    """Seconds per adapter saved by each way (``sample`` adapters per call, side by side) with ``adapters`` held,
    and ``save_adapters`` of all of them in one call."""
    model = model_holding(adapters, layers=2, hidden=32) if small else model_holding(adapters)
    names = [f"a{index}" for index in range(1, sample + 1)]
    folder = tempfile.mkdtemp()
    try:
        seconds = side_by_side({
            "save_pretrained": lambda: model.save_pretrained(folder, selected_adapters=names),
            "save_adapters": lambda: peft_recast.save_adapters(model, folder, names),
        }, repeats)
        start = time.perf_counter()
        peft_recast.save_adapters(model, folder)
        every = time.perf_counter() - start
    finally:
        shutil.rmtree(folder)
    peft_each, ours_each = seconds["save_pretrained"] / sample, seconds["save_adapters"] / sample
    return dict(adapters=adapters, save_pretrained_ms_per_adapter=1e3 * peft_each,
                save_adapters_ms_per_adapter=1e3 * ours_each, ratio=peft_each / ours_each,
                save_adapters_all_seconds=every, save_pretrained_all_seconds_projected=peft_each * adapters)


def table(rows: list[dict]) -> str:
    lines = ["| adapters held | `save_pretrained`, ms per adapter | `save_adapters`, ms per adapter | ratio | "
             "all of them: `save_pretrained` (projected) | all of them: `save_adapters` | ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        everything = row["save_pretrained_all_seconds_projected"] / row["save_adapters_all_seconds"]
        lines.append(f"| {row['adapters']:,} | {row['save_pretrained_ms_per_adapter']:.1f} | "
                     f"{row['save_adapters_ms_per_adapter']:.1f} | {row['ratio']:.1f}x | "
                     f"{row['save_pretrained_all_seconds_projected']:.1f} s | {row['save_adapters_all_seconds']:.1f} s | "
                     f"{everything:.1f}x |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer, 32-wide model holding 3 and 6 adapters")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    rows = [measure(count, sizes["sample"], sizes["repeats"], small=args.quick) for count in sizes["adapters"]]
    results = dict(mode="quick" if args.quick else "minilm-shape", threads=args.threads, torch=torch.__version__,
                   peft=peft.__version__, sample=sizes["sample"], repeats=sizes["repeats"], rows=rows)
    print(table(rows))
    if args.json:
        with atomic_write(args.json) as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
