"""The benchmark's methods, one entry each: its PEFT config and its learning-rate grid, plus the task lists.

To add a method, add a :class:`Method` to :data:`METHODS`; its runs get keys of their own (the key digests the full
config), so earlier results stay valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ...config import RECAST_LADDER


@dataclass(frozen=True)
class Method:
    """A way to adapt the encoder: ``config()`` builds a fresh PEFT config (``None``: head only or full fine-tuning).

    ``lrs`` is the peak AdamW learning-rate grid of the adapter's parameters (swept on validation); ``default_lr``
    is used where no sweep runs (``--quick``). ``align_epochs``: a LayerNorm alignment stage (the two-stage PETL
    recipe, scale and shift first): for this many epochs only the adapter's LayerNorm copies (``modules_to_save``)
    and the head train, then every adapter parameter does. ``head_first``: the head is first trained alone on the
    frozen encoder (exactly the linear probe's run), then head and adapter train together from there (LP-FT).
    ``channels``: after the head's run, this many output rows get coefficients of their own, the rows
    :func:`~peft_recast.rank_channels` ranks highest on the task's first training batches (needs ``head_first``);
    with ``align_epochs`` the LayerNorm stage runs first (a run of its own), the rows are ranked on the aligned model,
    and the remaining epochs train everything.
    """

    name: str
    label: str
    kind: str  # "probe", "peft" or "full"
    lrs: tuple[float, ...]
    default_lr: float
    config: Callable[[], object] = lambda: None
    align_epochs: int = 0
    head_first: bool = False
    channels: int = 0


def _recast(**kwargs) -> Callable[[], object]:
    def build():
        from ...config import RecastConfig

        return RecastConfig(**kwargs)

    return build


def _peft(class_name: str, **kwargs) -> Callable[[], object]:
    def build():
        import peft

        return getattr(peft, class_name)(**kwargs)

    return build


QV = ["query", "value"]
QKVO = ["query", "key", "value", "attention.output.dense"]
# LayerNorms an adapter trains and saves whole (``modules_to_save``): all 13 of MiniLM-L6 (9,984 numbers), or the
# embeddings' one (768), which scales and shifts what every layer reads.
ALL_LAYERNORMS, EMBEDDING_LAYERNORM = ["LayerNorm"], ["embeddings.LayerNorm"]
# Trainable numbers of the RECAST rungs on MiniLM-L6; FourierFT gets the same count (n_frequency per q/v module).
LADDER_SIZES = (24, 48, 72, 144, 216, 288, 432, 648, 864)
# The default RECAST and LoRA r=8 sweep the whole range PEFT users try, for the learning-rate plot.
WIDE_RECAST_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# the full protocol's ladder rungs: a third of, at and three times the recommended rate; and the candidates
# of the ladder search (issue 9) at the rate and three times it
LADDER_LRS = (3e-3, 1e-2, 3e-2)
CANDIDATE_LRS = (1e-2, 3e-2)
WIDE_LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# The tiny-budget peers run at the main rungs (every count is a multiple of the 12 q,v modules, so each is exact).
# Grids measured at 48 on trec6 + sms (500 examples, 3 epochs, seed 0; mean validation accuracy): each best rate, the
# default, lies inside its grid. TinyLoRA tied peaked at 3e-2 (1.0 collapses), untied plateaued at 3e-2..1.0 with its
# best at 0.3, UniLoRA peaked at 0.3 (1.0 close, 3.0 falls), WaveFT stays near the probe up to 0.1 and falls from 0.3.
PEER_SIZES = (24, 48, 144, 216, 648)
# Head first on the small-data protocol, TinyLoRA tied's best rate falls as u grows (3e-2 at 24 to 1e-3 at 648),
# so its grid reaches down to 3e-4 to hold that choice inside.
TIED_TINYLORA_LRS, TIED_TINYLORA_LR = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), 3e-2
TINYLORA_LRS, TINYLORA_LR = (1e-2, 3e-2, 1e-1, 3e-1, 1.0), 3e-1
UNILORA_LRS, UNILORA_LR = (3e-2, 1e-1, 3e-1, 1.0, 3.0), 3e-1
WAVEFT_LRS, WAVEFT_LR = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), 1e-2
# FourierFT's grid stopped at 0.1 until 2026-11-30, where its validation accuracy was still rising at every rung on
# the H200 (48: 83.3 / 85.7 / 88.0 at 1e-2 / 3e-2 / 0.1). On the small-data protocol at 48 (seed 0, six tuning tasks;
# mean test gain over the probe) it peaks at 3.0 (+0.10 at 3e-2, +0.57 at 1.0, +2.08 at 3.0, +1.10 at 10; chosen on
# validation, 81.10 at 3.0; head first +4.77 at 3.0): with n_frequency per
# 384 x 384 weight, each coefficient's change is scaled by scaling / (384 * 384), so it needs a large step.
FOURIERFT_LRS, FOURIERFT_LR = (1e-1, 3e-1, 1.0, 3.0, 10.0), 3.0
# Trainable numbers -> Taylor-ranked rows of the recast-ch methods (issue 20).
RANKED_CHANNELS = {48: 12, 144: 48, 216: 84, 648: 300, 1000: 476}
# Trainable numbers -> (name, config) of the rung the recast-gates methods gate (issue 20): the gates decide how many
# of its modules' numbers are kept (1000: 42 row blocks, 1,008 numbers, recast-1008-blocks' config).
GATED_BASES = {**{size: (f"ladder-{size}", RECAST_LADDER[f"ladder-{size}"]) for size in (48, 144, 216, 648)},
               1000: ("q,v with 42 row blocks", {"coefficient_blocks": 42})}
# PEFT's tuners made for tiny budgets at a count of trainable numbers, plain (a random head trains with them):
# FourierFT's frequencies and WaveFT's wavelet coefficients (count / 12 per q,v module), TinyLoRA with all 12 q,v
# modules tied to one vector of u numbers and untied (one vector per module, u = count / 12), UniLoRA's one shared
# vector. FourierFT runs at every rung of the ladder, the others at the counts of the RECAST rungs (PEER_SIZES).
PEER_FAMILIES = {"fourierft": LADDER_SIZES, "tinylora-tied": PEER_SIZES, "tinylora": PEER_SIZES,
                 "unilora": PEER_SIZES, "waveft": PEER_SIZES}


def _gated(size: int, penalty: float = 0.05) -> Method:
    """TAPS module gates (head first) on the rung ``GATED_BASES[size]`` under ``penalty``, from the second epoch of the
    small-data protocol (32 steps): ``recast-gates-<size>``, with ``-l<100 x penalty>`` for other penalties."""
    rung, config = GATED_BASES[size]
    name = f"recast-gates-{size}" + ("" if penalty == 0.05 else f"-l{round(100 * penalty)}")
    return Method(name, f"RECAST {rung}, head first, TAPS module gates (lambda {penalty}), pruned", "peft",
                  WIDE_RECAST_LRS if size <= 144 else LADDER_LRS, 1e-2,
                  _recast(**config, module_gates=True, gate_penalty=penalty, gate_warmup_steps=32), head_first=True)


def _peer(family: str, size: int) -> Method:
    """The plain ``family`` peer at ``size`` trainable numbers (``size // 12`` per q,v module where it spends them
    per module), at its grid and default rate."""
    per_module = size // 12
    label, lrs, default_lr, config = {
        "fourierft": (f"FourierFT, {per_module} frequencies, q,v", FOURIERFT_LRS, FOURIERFT_LR,
                      _peft("FourierFTConfig", n_frequency=per_module, target_modules=QV)),
        "tinylora-tied": (f"TinyLoRA r=2, one vector of u={size} tied over all q,v", TIED_TINYLORA_LRS,
                          TIED_TINYLORA_LR, _peft("TinyLoraConfig", r=2, u=size, weight_tying=1.0, target_modules=QV)),
        "tinylora": (f"TinyLoRA r=2, untied: u={per_module} per q,v module", TINYLORA_LRS, TINYLORA_LR,
                     _peft("TinyLoraConfig", r=2, u=per_module, weight_tying=0.0, target_modules=QV)),
        "unilora": (f"UniLoRA r=4, one shared vector of {size}, q,v", UNILORA_LRS, UNILORA_LR,
                    _peft("UniLoraConfig", r=4, theta_d_length=size, target_modules=QV)),
        "waveft": (f"WaveFT, {per_module} wavelet coefficients per module, q,v", WAVEFT_LRS, WAVEFT_LR,
                   _peft("WaveFTConfig", n_frequency=per_module, target_modules=QV)),
    }[family]
    return Method(f"{family}-{size}", label, "peft", lrs, default_lr, config)


PLAIN_PEERS = [_peer(family, size) for family, sizes in PEER_FAMILIES.items() for size in sizes]
# every tiny-budget peer with the same head-first recipe as recast-hf (`<peer>-<size>-hf`) at the RECAST rungs' counts,
# so that the recipe is not credited to RECAST alone (issue 16)
HEAD_FIRST_PEERS = [
    dataclasses.replace(peer, name=f"{peer.name}-hf", label=f"{peer.label}, head first", head_first=True)
    for peer in (_peer(family, size) for family in PEER_FAMILIES for size in PEER_SIZES)
]
METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("probe", "linear probe (head only)", "probe", (), 0.0),
        Method("recast", "RECAST default = ladder-48 (q,v; 2 layers/group, 2 templates, 2 row blocks)", "peft",
               WIDE_RECAST_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-48"])),
        Method("recast-24", "RECAST ladder-24 (q,v; 2 layers/group, 2 templates)", "peft", WIDE_RECAST_LRS, 1e-2,
               _recast(**RECAST_LADDER["ladder-24"])),
        Method("recast-72", "RECAST all linear; 6 layers/group, 2 templates", "peft", LADDER_LRS, 1e-2,
               _recast(target_modules="all-linear", layers_per_group=6, num_templates=2, coefficient_blocks=1)),
        Method("recast-216", "RECAST ladder-216 (all linear; 6 layers/group, 6 templates)", "peft",
               LADDER_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-216"])),
        Method("recast-144", "RECAST ladder-144 (q,v; 2 layers/group, 2 templates, 6 row blocks)", "peft",
               LADDER_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-144"])),
        Method("recast-432", "RECAST all linear; 2 layers/group, 2 templates, 6 blocks", "peft", LADDER_LRS,
               1e-2, _recast(target_modules="all-linear", coefficient_blocks=6)),
        Method("recast-648", "RECAST ladder-648 (all linear; 6 layers/group, one bank per shape, 24 templates)",
               "peft", LADDER_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-648"])),
        # candidates for the ladder (issue 9): attention heads as row blocks, larger banks, q,k,v,o
        Method("recast-24-blocks", "RECAST q,v; 2 layers/group, 1 template, 2 row blocks", "peft", CANDIDATE_LRS,
               1e-2, _recast(num_templates=1, coefficient_blocks=2)),
        Method("recast-48-qkvo", "RECAST q,k,v,o; 2 layers/group, 2 templates", "peft", CANDIDATE_LRS, 1e-2,
               _recast(target_modules=QKVO, coefficient_blocks=1)),
        Method("recast-288", "RECAST q,k,v,o; 2 layers/group, 2 templates, 6 row blocks", "peft", CANDIDATE_LRS, 1e-2,
               _recast(target_modules=QKVO, coefficient_blocks=6)),
        Method("recast-432-qv", "RECAST q,v; 6 layers/group, 6 templates, 6 row blocks", "peft", CANDIDATE_LRS, 1e-2,
               _recast(layers_per_group=6, num_templates=6, coefficient_blocks=6)),
        Method("recast-864", "RECAST q,k,v,o; 6 layers/group, 6 templates, 6 row blocks", "peft", CANDIDATE_LRS, 1e-2,
               _recast(target_modules=QKVO, layers_per_group=6, num_templates=6, coefficient_blocks=6)),
        # issue 16: a default that holds at one rate on every task; the head first (LP-FT), a bounded update
        Method("recast-hf", "RECAST default, head first (probe, then head + coefficients)", "peft", WIDE_RECAST_LRS,
               1e-2, _recast(**RECAST_LADDER["ladder-48"]), head_first=True),
        Method("recast-b05", "RECAST default, coefficients bounded at 0.05", "peft", WIDE_RECAST_LRS, 1e-2,
               _recast(**RECAST_LADDER["ladder-48"], coefficient_bound=0.05)),
        Method("recast-hf-b05", "RECAST default, head first, coefficients bounded at 0.05", "peft", WIDE_RECAST_LRS,
               1e-2, _recast(**RECAST_LADDER["ladder-48"], coefficient_bound=0.05), head_first=True),
        # the same 48 numbers spent on more row blocks (the lever of the small-data ladder) instead of a 2nd template
        Method("recast-48-b4-hf", "RECAST q,v; 2 layers/group, 1 template, 4 row blocks, head first", "peft",
               WIDE_RECAST_LRS, 1e-2, _recast(num_templates=1, coefficient_blocks=4), head_first=True),
        # issue 20: the rows with the highest Taylor importance on the task get coefficients of their own (2 numbers
        # a row); 48: ladder-24 + 12 rows, else the default (48) + (size - 48) / 2 rows; head first for the ranking
        *[
            Method(f"recast-ch-{size}", f"RECAST {'ladder-24' if size == 48 else 'default'}, head first, "
                   f"{RANKED_CHANNELS[size]} Taylor-ranked rows of their own", "peft", WIDE_RECAST_LRS, 1e-2,
                   _recast(**RECAST_LADDER["ladder-24" if size == 48 else "ladder-48"]), head_first=True,
                   channels=RANKED_CHANNELS[size])
            for size in RANKED_CHANNELS
        ],
        # ... and after the two-stage paper's first stage: the embeddings' LayerNorm (768) with the head for epoch 1,
        # then 84 rows ranked on the aligned model, then all 984 numbers for epochs 2-3 (ladder-216 + that LayerNorm
        # is recast-984, the full protocol's best rung at <= 1,000)
        Method("recast-ch-984-ln", "RECAST default, head first, embedding LayerNorm aligned for epoch 1, then 84 "
               "Taylor-ranked rows", "peft", WIDE_RECAST_LRS, 1e-2,
               _recast(**RECAST_LADDER["ladder-48"], modules_to_save=EMBEDDING_LAYERNORM), head_first=True,
               channels=84, align_epochs=1),
        # the controls of the ranked rows and gates at 24-648: the ladder's rung with the same recipe (head first)
        *[
            Method(f"recast-{size}-hf", f"RECAST ladder-{size}, head first", "peft", WIDE_RECAST_LRS, 1e-2,
                   _recast(**RECAST_LADDER[f"ladder-{size}"]), head_first=True)
            for size in (24, 144, 216, 648)
        ],
        # issue 16: the q,v rungs' numbers spent on templates from one bank of all 12 q,v weights (the lever of
        # ladder-648) instead of per-pair banks: 48 = 4 templates, 144 = all 12, one block of rows each
        *[
            Method(f"recast-bank-{size}-hf", f"RECAST q,v; one bank of all 12 q,v weights, {size // 12} templates, "
                   "head first", "peft", WIDE_RECAST_LRS, 1e-2,
                   _recast(layers_per_group=6, share_across_module_types=True, num_templates=size // 12,
                           coefficient_blocks=1), head_first=True)
            for size in (48, 144)
        ],
        # ... and of recast-ch-1000: 1,008 numbers from 42 contiguous row blocks per q,v module
        Method("recast-1008-blocks", "RECAST q,v, 2 templates, 42 row blocks, head first", "peft", WIDE_RECAST_LRS,
               1e-2, _recast(coefficient_blocks=42), head_first=True),
        # issue 20: TAPS gates on every rung of GATED_BASES (:func:`_gated`); closed modules are pruned before the
        # adapter is saved and counted. TAPS' lambda 0.5 closed 10 of 12 gates on trec6 and all 12 on sms (AdamW moves
        # a score by about the rate per step whatever the gradient's size, so the penalty wins wherever the task's
        # gradient is smaller): lambda 0.05 here
        *[_gated(size) for size in GATED_BASES],
        # ... and the TAPS way to about 48 numbers: ladder-144 (12 numbers per module) under a stronger penalty, so the
        # gates, not the rung, choose which modules keep their numbers (lambda 0.05 kept 102 of its 144; 0.5 closed
        # 10-12 of ladder-48's 12 gates)
        *[_gated(144, penalty) for penalty in (0.15, 0.3)],
        # issue 18: a count that does not grow with depth; 48 on MiniLM-L6 like the default, shared across groups,
        # with the default's recipe (head first)
        Method("recast-shared-48", "RECAST q,v; coefficients shared by position across groups, 6 row blocks, head first",
               "peft", WIDE_RECAST_LRS, 1e-2, _recast(coefficient_sharing="position", coefficient_blocks=6),
               head_first=True),
        # the LayerNorm alignment stage (issue 9): RECAST with LayerNorm scale and shift, jointly or LayerNorms first
        Method("recast-ln", "RECAST default + all LayerNorms", "peft", CANDIDATE_LRS, 1e-2,
               _recast(modules_to_save=ALL_LAYERNORMS)),
        Method("recast-ln-2stage", "RECAST default + all LayerNorms, LayerNorms alone for epoch 1", "peft",
               CANDIDATE_LRS, 1e-2, _recast(modules_to_save=ALL_LAYERNORMS), align_epochs=1),
        Method("recast-984", "RECAST ladder-216 + embedding LayerNorm", "peft", CANDIDATE_LRS, 1e-2,
               _recast(**RECAST_LADDER["ladder-216"], modules_to_save=EMBEDDING_LAYERNORM)),
        Method("recast-984-2stage", "RECAST ladder-216 + embedding LayerNorm, LayerNorm alone for epoch 1", "peft",
               CANDIDATE_LRS, 1e-2, _recast(**RECAST_LADDER["ladder-216"], modules_to_save=EMBEDDING_LAYERNORM),
               align_epochs=1),
        *PLAIN_PEERS,
        *HEAD_FIRST_PEERS,
        Method("ln-tuning", "LN tuning (all LayerNorms)", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("LNTuningConfig", target_modules=["LayerNorm"])),
        Method("ia3", "IA3 (key, value, output.dense)", "peft", (1e-3, 3e-3, 1e-2), 3e-3, _peft("IA3Config")),
        Method("vera", "VeRA r=256, q,v", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("VeraConfig", r=256, target_modules=QV)),
        Method("vblora", "VB-LoRA r=4, 90 vectors of 64, q,v", "peft", (1e-3, 3e-3, 1e-2), 3e-3,
               _peft("VBLoRAConfig", r=4, num_vectors=90, vector_length=64, target_modules=QV)),
        Method("lora-r1", "LoRA r=1, q,v", "peft", (3e-4, 1e-3, 3e-3), 1e-3,
               _peft("LoraConfig", r=1, lora_alpha=2, target_modules=QV)),
        Method("lora-r8", "LoRA r=8, q,v", "peft", WIDE_LORA_LRS, 1e-3,
               _peft("LoraConfig", r=8, lora_alpha=16, target_modules=QV)),
        Method("full", "full fine-tuning", "full", (1e-5, 3e-5, 1e-4), 3e-5),
    ]
}


QUICK_METHODS = ("probe", "recast", "fourierft-48", "lora-r8")
LADDER_METHODS = ("probe", *[f"recast-{size}" if size != 48 else "recast" for size in LADDER_SIZES],
                  *[f"fourierft-{size}" for size in LADDER_SIZES], "lora-r8")
ALL_TASKS = ("trec6", "sms", "bbc", "tweets", "amazon", "election", "newsgroups", "clothing", "healthnews")
# The small-data protocol (`bench --small-data`): where a user starts, and what the CPU runs in full (~96 steps a run).
SMALL_DATA_TRAIN, SMALL_DATA_EPOCHS = 1000, 3
QUICK_TASKS = ("trec6", "sms")
# The reference every cost ratio is taken against.
REFERENCE_METHOD = "lora-r8"
# Every tiny-budget peer of RECAST at every rung it runs at: FourierFT, TinyLoRA tied and untied, UniLoRA, WaveFT.
PEER_METHODS = tuple(peer.name for peer in PLAIN_PEERS)
