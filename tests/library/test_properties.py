"""Property-based tests: RECAST's invariants over random stacks, layer types, group sizes, templates and coefficients.

Every example builds a small stack of blocks (``blocks.{i}.proj``: ``d_model -> d_hidden``, ``blocks.{i}.back``:
``d_hidden -> d_model``, each a ``torch.nn.Linear`` or a transformers ``Conv1D``) and a random ``RecastConfig``.
Hypothesis runs derandomized (the same examples on every run) with few examples, so the file stays fast and CI stays
deterministic.
"""

import copy
import importlib
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from peft_recast import RecastConfig
from peft_recast.layer import RecastLayer

from ..models import ResidualStack, tiny_bert_classifier

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Case:
    """One random example: the stack's shape and layer types, the RECAST config and a seed for the coefficients."""

    layers: int
    d_model: int
    d_hidden: int
    proj_type: str
    back_type: str
    targets: tuple[str, ...]
    grouping: tuple[str, int]
    num_templates: int
    num_coefficient_sets: int
    seed: int

    def config(self, **overrides) -> RecastConfig:
        kwargs = dict(
            target_modules=list(self.targets),
            num_templates=self.num_templates,
            num_coefficient_sets=self.num_coefficient_sets,
            **{self.grouping[0]: self.grouping[1]},
        )
        kwargs.update(overrides)
        return RecastConfig(**kwargs)


def _stack(case: Case) -> ResidualStack:
    return ResidualStack(case.layers, case.d_model, case.d_hidden, case.proj_type, case.back_type, case.seed)


cases = st.builds(
    Case,
    layers=st.integers(1, 5),
    d_model=st.integers(2, 7),
    d_hidden=st.integers(2, 7),
    proj_type=st.sampled_from(["linear", "conv1d"]),
    back_type=st.sampled_from(["linear", "conv1d"]),
    targets=st.sampled_from([("proj",), ("back",), ("proj", "back")]),
    grouping=st.one_of(
        st.tuples(st.just("layers_per_group"), st.integers(1, 4)), st.tuples(st.just("num_groups"), st.integers(1, 3))
    ),
    num_templates=st.integers(1, 4),
    num_coefficient_sets=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)


def _inputs(case: Case, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, case.d_model, generator=torch.Generator().manual_seed(case.seed + 1))


def _recast(base: nn.Module, config: RecastConfig) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notes for Conv1D, num_templates capped for small groups
        return get_peft_model(base, config)


def _randomize(model: nn.Module, adapter: str, seed: int, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RecastLayer) and adapter in module.recast_coefficients:
                coefficients = module.recast_coefficients[adapter]
                coefficients.copy_(torch.randn(coefficients.shape, generator=generator) * std)


def _targeted_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.get_base_layer().weight.detach().clone() for m in model.modules() if isinstance(m, RecastLayer)]


def _model_and_reference(case) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """RECAST on a fresh stack, an input batch, and the bare stack's output for it (taken before injection)."""
    base = _stack(case)
    x = _inputs(case)
    reference = base(x)
    return _recast(base, case.config()), x, reference


@PROPERTY_SETTINGS
@given(case=cases)
def test_identity_at_init(case):
    model, x, reference = _model_and_reference(case)
    assert torch.equal(model(x), reference)


@PROPERTY_SETTINGS
@given(case=cases)
def test_merge_unmerge_round_trip(case):
    model, x, reference = _model_and_reference(case)
    before = _targeted_weights(model)
    _randomize(model, "default", case.seed)
    adapted = model(x)
    assert not torch.allclose(adapted, reference)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(a, b) for a, b in zip(_targeted_weights(model), before))
    assert torch.equal(model(x), adapted)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, RecastLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


@PROPERTY_SETTINGS
@given(case=cases)
def test_save_load_equality(case):
    x = _inputs(case)
    model = _recast(_stack(case), case.config())
    _randomize(model, "default", case.seed)
    expected = model(x)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(_stack(case), directory)
    saved = dict(model.named_parameters())
    for name, parameter in loaded.named_parameters():
        if "recast_coefficients" in name:
            assert torch.equal(parameter, saved[name])
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)


@PROPERTY_SETTINGS
@given(case=cases, other_templates=st.integers(1, 3), other_sets=st.integers(1, 2))
def test_mixed_batch_equals_each_adapter_alone(case, other_templates, other_sets):
    x = _inputs(case, batch=5)
    model = _recast(_stack(case), case.config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", case.config(num_templates=other_templates, num_coefficient_sets=other_sets))
    _randomize(model, "default", case.seed)
    _randomize(model, "other", case.seed + 7)
    model.eval()
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = model(x)
    with model.disable_adapter():
        alone["__base__"] = model(x)
    names = ["other", "__base__", "default", "other", "default"]
    mixed = model(x, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=1e-6)


@PROPERTY_SETTINGS
@given(case=cases, dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_base_is_finite_and_close_to_float32(case, dtype):
    x = _inputs(case)
    model = _recast(_stack(case), case.config())
    _randomize(model, "default", case.seed)
    expected = model(x)
    half = _recast(_stack(case).to(dtype), case.config())
    coefficients = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in half.named_parameters():
            if "recast_coefficients" in name:
                parameter.copy_(coefficients[name])
    out = half(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = 2e-2 if dtype == torch.float16 else 8e-2
    error = (out.float() - expected).abs().max()
    assert error <= tolerance * expected.abs().max() + tolerance, f"{dtype}: max error {error:.3g}"
    half.merge_adapter(safe_merge=True)
    merged = half(x.to(dtype))
    assert torch.isfinite(merged).all()
    assert (merged.float() - expected).abs().max() <= tolerance * expected.abs().max() + tolerance


# The places where an injection can fail, patched to raise on their ``call``-th call.
_INJECTION_STEPS = [
    ("peft_recast.model", "RecastModel._create_new_module"),
    ("peft_recast.layer", "RecastLayer.update_layer"),
    ("peft.tuners.tuners_utils", "set_additional_trainable_modules"),
    ("peft_recast.planning", "layers_to_transform_problem"),
    ("peft_recast.planning", "plan_groups"),
    ("peft_recast.planning", "warn_if_templates_exceed_groups"),
    ("peft_recast.planning", "fit_group"),
    ("peft_recast.layer", "RecastLayer.attach_group"),
    ("peft_recast.layer", "RecastLayer.tie_coefficients"),
]


@contextmanager
def _failing_at(step: tuple[str, str], call: int) -> Iterator[Callable[[], bool]]:
    """Make ``step`` (module, ``"Class.method"`` or ``"function"``) raise ``RuntimeError("injected failure")`` on its
    ``call``-th call inside the block; yields a function that says whether it did."""
    module = importlib.import_module(step[0])
    *owner_path, name = step[1].split(".")
    owner = module
    for part in owner_path:
        owner = getattr(owner, part)
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    function = original.__func__ if isinstance(original, staticmethod) else original
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return function(*args, **kwargs)

    setattr(owner, name, staticmethod(failing) if isinstance(original, staticmethod) else failing)
    try:
        yield lambda: len(calls) >= call
    finally:
        setattr(owner, name, original)


def _snapshot(model: nn.Module) -> tuple[list, dict, dict]:
    """The module tree (names and types), every tensor of the state dict (cloned) and every ``requires_grad``."""
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        {key: value.detach().clone() for key, value in model.state_dict().items()},
        {name: parameter.requires_grad for name, parameter in model.named_parameters()},
    )


def _assert_same(before: tuple[list, dict, dict], after: tuple[list, dict, dict]) -> None:
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][key], value) for key, value in before[1].items())
    assert after[2] == before[2]


def _inject_failing_at(step: tuple[str, str], call: int, fused: bool, second_adapter: bool) -> bool:
    """Inject a RECAST adapter into a tiny BERT classifier (``get_peft_model``, or ``add_adapter`` beside a first
    adapter) while ``step`` raises on its ``call``-th call; assert what must hold either way and return whether the
    step failed.

    If it failed: the injected error propagates unchanged, the model is bit-identical, has the same modules (no RECAST
    layer or ``modules_to_save`` copy left behind) and the same ``requires_grad`` flags, and a failed ``add_adapter``
    leaves the first adapter working as before. If the step ran fewer than ``call`` times: the injection completed,
    the new adapter is there, and the output is unchanged (identity at init, or the first adapter still active)."""
    config = RecastConfig(modules_to_save=["classifier"],
                          **({"target_modules": ["query", "key", "value"], "fused_modules": ["query", "key", "value"],
                              "coefficient_blocks": 1} if fused else {}))
    base = tiny_bert_classifier(seed=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    model = get_peft_model(base, RecastConfig(target_modules=["dense"], init_weights=False)) if second_adapter else base
    model.eval()
    before, logits = _snapshot(model), model(input_ids=ids).logits
    error, injected = None, None
    with _failing_at(step, call) as raised:
        try:
            if second_adapter:
                model.add_adapter("second", config)
                injected = model
            else:
                injected = get_peft_model(base, config)
        except RuntimeError as caught:
            error = caught
    new_adapter = "second" if second_adapter else "default"
    new_layers = [m for m in base.modules() if isinstance(m, RecastLayer) and new_adapter in m.recast_coefficients]
    if raised():
        assert error is not None and str(error) == "injected failure", f"the failure did not propagate: {error!r}"
        _assert_same(before, _snapshot(model))
        assert not new_layers
        assert not any(isinstance(module, RecastLayer) for module in base.modules()) or second_adapter
        if second_adapter:
            assert list(model.peft_config) == ["default"]
            assert torch.equal(model(input_ids=ids).logits, logits)
        return True
    assert error is None, f"{step} never failed, yet the injection raised {error!r}"
    assert list(injected.peft_config) == (["default", "second"] if second_adapter else ["default"])
    assert len(new_layers) == (3 if fused else 2) * base.config.num_hidden_layers  # query, (key,) value per layer
    injected.eval()
    assert torch.equal(injected(input_ids=ids).logits, logits)
    return False


@PROPERTY_SETTINGS
@given(
    step=st.sampled_from(_INJECTION_STEPS),
    call=st.integers(1, 3),
    fused=st.booleans(),
    second_adapter=st.booleans(),
)
def test_an_injection_that_fails_anywhere_leaves_the_model_exactly_as_it_was(step, call, fused, second_adapter):
    """Raise inside injection at a random place (any of its steps, on its first, second or third call): either the
    step failed and the model is exactly as it was, or the step ran fewer times and the injection completed
    (``_inject_failing_at`` asserts each case)."""
    _inject_failing_at(step, call, fused, second_adapter)


@pytest.mark.parametrize("second_adapter", [False, True], ids=["get_peft_model", "add_adapter"])
@pytest.mark.parametrize("step", _INJECTION_STEPS, ids=[step[1] for step in _INJECTION_STEPS])
def test_every_injection_step_is_reached_and_its_failure_leaves_the_model_as_it_was(step, second_adapter):
    """Each patched step runs during a fused injection, so its first call fails (a step the injection no longer calls,
    e.g. after a rename, would make the property test above check nothing), and the model is left as it was; with
    the step failing only on a call that never comes, the same injection completes."""
    assert _inject_failing_at(step, 1, fused=True, second_adapter=second_adapter), f"{step} was never called"
    assert not _inject_failing_at(step, 10**6, fused=True, second_adapter=second_adapter)
