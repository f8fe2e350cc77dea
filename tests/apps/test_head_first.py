"""`peft-recast train`'s head-first recipe: the head alone first, exactly the linear probe's run; coefficients stay 0."""

import pytest
import torch

from peft_recast.apps.encoder import load_tokenizer, new_classifier, recast_classifier
from peft_recast.apps.loop import Settings, embed_texts, train_probe
from peft_recast.apps.tasks import Batches
from peft_recast.apps.trainer import train_head_first

from ..helpers import MINILM_MODULE

pytestmark = pytest.mark.requires_modules(MINILM_MODULE)

TEXTS = ["free prize, call now", "see you at lunch", "you won a cruise, reply", "running late, sorry",
         "claim your reward today", "dinner at eight?", "urgent: your account won", "thanks for the notes"] * 2
LABELS = torch.tensor([1, 0] * 8)


def test_head_first_is_the_probe_run_and_leaves_the_coefficients_at_zero():
    settings = Settings(epochs=2, batch_size=4, head_lr=3e-3, seed=0)
    model = recast_classifier(2, torch.device("cpu"), seed=0)
    head = model.classifier
    original = [p.detach().clone() for p in head.parameters()]
    batches = Batches(load_tokenizer(), TEXTS, 32, torch.device("cpu"))
    train_head_first(model, batches, LABELS, settings)
    # the probe by hand: the same seeded head, trained on the plain encoder's embeddings with the same loop
    plain = new_classifier(2, torch.device("cpu"), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(plain.classifier.parameters(), original))  # the same start
    train_probe(plain.classifier, embed_texts(plain, batches, 4, "embed"), LABELS, batches.lengths, settings, "probe")
    torch.testing.assert_close(head.weight, plain.classifier.weight)
    torch.testing.assert_close(head.bias, plain.classifier.bias)
    assert not torch.equal(head.weight, original[0])  # it trained
    coefficients = [p for name, p in model.named_parameters() if "recast_coefficients" in name]
    assert coefficients and all(torch.count_nonzero(p) == 0 for p in coefficients)
