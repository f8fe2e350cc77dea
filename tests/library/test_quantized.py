"""RECAST on a bitsandbytes-quantized base (4-bit nf4 and fp4, 8-bit) on the CPU: a tiny Llama saved from a config
and loaded with transformers' ``BitsAndBytesConfig`` (``peft_recast/quantized.py``)."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from peft_recast import RECOMMENDED_LR, RecastConfig
from peft_recast.quantized import QuantizedLinear, canonical_4bit, dequantize

from ..models import llama_kwargs

pytestmark = pytest.mark.requires_modules("bitsandbytes")

KINDS = ["nf4", "fp4", "8bit"]
# Hidden size 64: bitsandbytes 0.50.2's CPU inference path for 4-bit layers (AVX512-BF16 CPUs) needs in_features to be
# a multiple of its 64-element blocks (a 32-wide layer raises in `_convert_weight_packed_for_cpu`).
HIDDEN = 64
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [30, 26, 22, 18, 14, 10, 6, 2]])


def _quantization(kind: str) -> BitsAndBytesConfig:
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Two float Llamas on disk: ``"base"`` and ``"other"`` (another seed and initialisation scale)."""
    paths = {}
    for name, seed, init in (("base", 0, 0.02), ("other", 1, 0.04)):
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(LlamaConfig(**llama_kwargs(4, HIDDEN), initializer_range=init)).save_pretrained(path)
        paths[name] = str(path)
    return paths


def _load(checkpoints, kind: str, name: str = "base"):
    """A freshly quantized model, in train mode (eval mode is set by the tests that want it)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints[name], quantization_config=_quantization(kind),
                                                 device_map="cpu")
    return model.train()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _train(model, steps: int = 8) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECOMMENDED_LR)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_and_no_dequantized_copy(checkpoints, kind):
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(checkpoints["base"]))
    base = _load(checkpoints, kind)
    bare, bare_bytes = _logits(base), _bytes(base)
    model = get_peft_model(base, RecastConfig(target_modules="all-linear"))  # gate/up and down: equal packed sizes
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * 7
    assert all(layer.weight_shape() == layer.pristine_weight().shape for layer in layers)
    # theta = 0: exactly the quantized model (both in train mode: bitsandbytes computes differently in eval), and as
    # close to the float model as quantization allows (max logit error 0.0072 for 8-bit, 0.088 nf4, 0.127 fp4)
    assert torch.equal(_logits(model), bare)
    assert (bare - float_logits).abs().max() < (0.02 if kind == "8bit" else 0.2)
    adapted = _logits(model.eval())
    with model.disable_adapter():
        assert torch.equal(_logits(model), adapted)
    # the adapter adds its coefficients and (n x m) mixings, no weight: nothing is kept dequantized
    assert _bytes(model) - bare_bytes < 4096


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_loss_and_leaves_the_quantized_weights(checkpoints, kind):
    base = _load(checkpoints, kind)
    quantized = [p for p in base.parameters() if p.dtype in (torch.uint8, torch.int8)]
    weights = [p.detach().clone() for p in quantized]
    model = get_peft_model(base, RecastConfig())
    assert sorted({p.dtype for p in model.parameters() if p.requires_grad}) == [torch.float32]
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, before) for p, before in zip(quantized, weights))


# PEFT 0.21's prepare_model_for_kbit_training calls transformers' deprecated `gradient_checkpointing_enable`
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_trains_after_peft_kbit_preparation(checkpoints):
    """PEFT's QLoRA recipe (float32 norms, gradient checkpointing) works unchanged."""
    model = get_peft_model(prepare_model_for_kbit_training(
        _load(checkpoints, "nf4"), gradient_checkpointing_kwargs={"use_reentrant": False}), RecastConfig())
    losses = _train(model, steps=4)
    assert losses[-1] < losses[0] - 0.02, losses


def test_gradients_reach_every_layer_after_a_no_grad_evaluation(checkpoints):
    """On a CPU with AVX512-BF16 a 4-bit layer evaluated under ``no_grad`` is repacked and then passes no gradient
    (bitsandbytes 0.50.2): injection restores the canonical layout of every 4-bit layer, targeted or not."""
    base = _load(checkpoints, "nf4").eval()
    _logits(base)
    model = get_peft_model(base, RecastConfig())
    _logits(model.eval())  # and again through the RECAST model
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_onto_a_freshly_quantized_base(checkpoints, kind, tmp_path):
    model = get_peft_model(_load(checkpoints, kind), RecastConfig())
    _train(model, steps=3)
    trained = _logits(model.eval())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_load(checkpoints, kind), tmp_path).eval()
    assert torch.equal(_logits(reloaded), trained)
    with reloaded.disable_adapter():
        assert not torch.allclose(_logits(reloaded), trained)


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_accepts_the_quantized_base_and_refuses_another_model(checkpoints, kind, tmp_path):
    model = get_peft_model(_load(checkpoints, kind), RecastConfig(init_weights=False))
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(_load(checkpoints, kind), tmp_path)  # the same base, quantized again: accepted
    other = _load(checkpoints, kind, "other")
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, QuantizedLinear) for m in other.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_unmerge_restores_exactly(checkpoints, kind):
    import bitsandbytes as bnb

    float_logits = _logits(AutoModelForCausalLM.from_pretrained(checkpoints["base"]))
    model = get_peft_model(_load(checkpoints, kind), RecastConfig(init_weights=False)).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.get_base_layer().weight
    with model.disable_adapter():
        quantization_error = (_logits(model) - float_logits).abs().max()
    adapted = _logits(model)
    model.merge_adapter()
    merged_weight = layer.get_base_layer().weight
    assert type(merged_weight) is type(before) and merged_weight.dtype == before.dtype  # quantized again
    # the merged model differs from the adapted one by one re-quantization of the weights: an error of the size of
    # the quantized model's own (measured: 0.5-0.7x of it for 4-bit, 1.0x for 8-bit)
    assert (_logits(model) - adapted).abs().max() < 2 * quantization_error
    assert layer._stored()[0] is before  # the pre-merge weight is kept (siblings' templates do not move)
    model.unmerge_adapter()
    assert layer.get_base_layer().weight is before
    assert torch.equal(_logits(model), adapted)
    unloaded = model.merge_and_unload()
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert (_logits(unloaded) - adapted).abs().max() < 2 * quantization_error


@pytest.mark.parametrize("kind", ["nf4", "8bit"])
def test_mixed_batch_gives_each_sample_its_adapter(checkpoints, kind):
    model = get_peft_model(_load(checkpoints, kind), RecastConfig(init_weights=False))
    model.add_adapter("other", RecastConfig(init_weights=False))
    model.eval()
    mixed = model(input_ids=IDS, adapter_names=["other", "__base__"]).logits
    model.set_adapter("other")
    assert torch.allclose(mixed[0], _logits(model)[0], atol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(mixed[1], _logits(model)[1], atol=1e-5)


# ---------------------------------------------------------------- a 4-bit base evaluated before injection (issue 36.7)
# On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a 4-bit layer at its first eval call without gradients and
# computes it on another path, with its block scales rounded to bfloat16. Measured on such a CPU (max |logit
# difference|, nf4 / fp4): bitsandbytes' two paths on one base 3.4e-3 / 3.1e-3 (the tolerance below). Injected after
# such a call, theta = 0 was 2.4e-2 / 2.5e-2 from the base and a reload across the two orders 2.6e-2 / 2.3e-2 from the
# trained model while RECAST read the repacked block scales out of order; now 2.2e-3 / 2.5e-3 and 2.0e-3 / 2.8e-3.
# Without the repacking (other CPUs, or the base never evaluated) all are 0.


def _evaluated(model):
    """``model``'s logits in eval mode, as one measures a base: bitsandbytes repacks its 4-bit layers on CPUs with
    AVX512-BF16 (checked), and on no other CPU."""
    import bitsandbytes as bnb

    logits = _logits(model.eval())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    repacked = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers]
    assert layers and all(flag == bnb.functional.has_avx512bf16() for flag in repacked)
    return logits


def _paths(checkpoints, kind: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One base's logits on bitsandbytes' generic CPU path (train mode: never repacked) and then in eval mode (the
    repacked path where the CPU has it), and their largest difference: bitsandbytes' own tolerance."""
    base = _load(checkpoints, kind)
    generic = _logits(base)
    evaluated = _evaluated(base)
    return generic, evaluated, (generic - evaluated).abs().max().item()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_canonical_4bit_reads_the_cpu_layout_exactly(quant_type, double_quant, dtype):
    """The repacked weight unpacks to the same 4-bit codes, with the bfloat16 block scales the repacked kernel uses,
    in block order; the repacked weight itself is left as it is."""
    from bitsandbytes import functional as F

    weight = torch.randn(96, 192, generator=torch.Generator().manual_seed(0)).to(dtype) / 50
    codes, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    same = canonical_4bit(codes, state)
    assert same[0] is codes and same[1] is state  # not repacked: returned as it is
    scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    rounded = copy.copy(state)
    rounded.absmax, rounded.nested = scales.to(torch.bfloat16).float(), False
    expected = F.dequantize_4bit(codes, rounded)

    packed, packed_state = F._convert_weight_packed_for_cpu(codes.clone(), copy.deepcopy(state))
    kept = (packed.clone(), packed_state.absmax.clone())
    unpacked, unpacked_state = canonical_4bit(packed, packed_state)
    assert unpacked.dtype == codes.dtype and torch.equal(unpacked, codes)
    assert not unpacked_state.packing_format_for_cpu and unpacked_state.absmax.dtype == torch.float32
    result = F.dequantize_4bit(unpacked, unpacked_state)
    assert result.dtype == dtype and torch.equal(result, expected)
    # the weight before repacking, up to the bfloat16 rounding of its scales (2^-8 relative)
    original = F.dequantize_4bit(codes, state).float()
    assert _max_diff(result.float(), original) <= 2**-8 * scales.abs().max().item()
    assert torch.equal(packed, kept[0]) and torch.equal(packed_state.absmax, kept[1])
    assert packed_state.packing_format_for_cpu


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_identity_at_init_whichever_order(checkpoints, kind):
    """``theta = 0`` gives the base's output to bitsandbytes' own tolerance whether the base was evaluated before
    ``get_peft_model`` (the usual order) or not."""
    generic, repacked, tolerance = _paths(checkpoints, kind)
    assert tolerance < 1e-2

    base = _load(checkpoints, kind)
    measured = _evaluated(base)  # the usual order: measure the base, then inject
    weight = dequantize(base.model.layers[0].self_attn.q_proj.weight)  # read from the repacked layout
    model = get_peft_model(base, RecastConfig(target_modules="all-linear"))
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.pristine_weight(), weight)
    after = _logits(model.eval())
    assert _max_diff(after, measured) <= tolerance
    assert _max_diff(after, generic) <= tolerance  # and the same base never evaluated

    after = _logits(get_peft_model(_load(checkpoints, kind), RecastConfig(target_modules="all-linear")).eval())
    assert torch.equal(after, generic)  # never evaluated: bitsandbytes' generic path, exactly
    assert _max_diff(after, repacked) <= tolerance


@pytest.mark.parametrize("trained_on", ["evaluated", "fresh"])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_reload_onto_a_base_evaluated_or_not(checkpoints, kind, trained_on, tmp_path):
    """An adapter trained on a base evaluated before injection or not reloads onto a freshly quantized base, evaluated
    before loading or not: exactly where both bases were treated alike, else to bitsandbytes' own tolerance."""
    tolerance = _paths(checkpoints, kind)[2]
    base = _load(checkpoints, kind)
    if trained_on == "evaluated":
        _evaluated(base)
    model = get_peft_model(base, RecastConfig())
    start = _logits(model.eval())
    _train(model, steps=3)
    trained = _logits(model.eval())
    assert _max_diff(trained, start) > 10 * tolerance  # training moved the outputs far beyond that tolerance
    model.save_pretrained(tmp_path)
    for reloaded_on in ("evaluated", "fresh"):
        fresh = _load(checkpoints, kind)
        if reloaded_on == "evaluated":
            _evaluated(fresh)
        reloaded = _logits(PeftModel.from_pretrained(fresh, tmp_path).eval())
        if reloaded_on == trained_on:
            assert torch.equal(reloaded, trained), reloaded_on
        else:
            assert _max_diff(reloaded, trained) <= tolerance, reloaded_on


@pytest.mark.parametrize("kind", ["nf4", "8bit"])
@pytest.mark.parametrize("family", [
    {"template_family": "own_spectrum", "num_templates": 4, "coefficient_blocks": 1},
    {"template_family": "spectral_bands"},
    {"template_family": "spectral_bands", "num_templates": 1, "coefficient_blocks": 8},  # one band: the weight
])
def test_own_weight_families_train_save_and_serve_on_a_quantized_base(checkpoints, kind, family, tmp_path):
    """Templates from each dequantized weight's SVD (``own_spectrum``: a low-rank update beside the quantized
    product; ``spectral_bands``: weight-sized bands of it), saved and reloaded exactly, mixed batches per sample."""
    base = _load(checkpoints, kind)
    bare = _logits(base)
    config = RecastConfig(**family)
    model = get_peft_model(base, config)
    assert torch.equal(_logits(model), bare)
    losses = _train(model, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    trained = _logits(model.eval())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_load(checkpoints, kind), tmp_path).eval()
    assert torch.equal(_logits(reloaded), trained)
    with torch.no_grad():
        mixed = reloaded(input_ids=IDS, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], trained[0])
    with reloaded.disable_adapter():
        torch.testing.assert_close(mixed[1], _logits(reloaded)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_one_band_is_the_dequantized_weight_and_stores_nothing(checkpoints, kind):
    """One band is the layer's weight: like a group span's, the basis is dequantized where it is needed, not kept."""
    model = get_peft_model(_load(checkpoints, kind), RecastConfig(template_family="spectral_bands", num_templates=1))
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    assert layers
    for layer in layers:
        group = layer.recast_group["default"]
        assert group.fit.templates is None
        (basis,) = group.basis()
        assert torch.equal(basis, layer.pristine_weight())


@pytest.mark.parametrize("kind", KINDS)
def test_bands_basis_reads_placement_and_dequantizes_only_the_weight(checkpoints, kind, monkeypatch):
    """``weight_placement()`` is the device and dtype of the dequantized weight; the stored bands are served as they
    are and only the basis' last member, the weight itself, is dequantized (once a call, as a group span's)."""
    import peft_recast.quantized as quantized

    model = get_peft_model(_load(checkpoints, kind), RecastConfig(template_family="spectral_bands"))
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    assert layers
    for layer in layers:
        weight = layer.pristine_weight()
        assert layer.weight_placement() == (weight.device, weight.dtype)
    calls = []
    monkeypatch.setattr(quantized, "dequantize", lambda *args: calls.append(args) or dequantize(*args))
    for layer in layers:
        group = layer.recast_group["default"]
        basis = group.basis()
        assert [member.dtype for member in basis] == [layer.weight_placement()[1]] * 2
        assert basis[0].data_ptr() == group.basis()[0].data_ptr()  # the stored band: the same tensor every call
        torch.testing.assert_close(basis[1], layer.pristine_weight())
    assert len(calls) == 3 * len(layers)  # the weight, at each of the three calls above
