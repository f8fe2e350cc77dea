"""Every way a user can get RECAST wrong ends in a clear error (or, where noted, a warning or a documented behaviour).

Each test names the bad input, triggers it, and checks the message says what was wrong and how to fix it. Where the
error comes from PEFT, safetensors or PyTorch rather than from peft_recast, the test pins down exactly what is raised
so that a change in those libraries is noticed.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import peft_recast
from peft_recast import RecastConfig, recast_summary
from peft_recast.layer import RecastLayer
from peft_recast.planning import layers_to_transform_problem

from ..models import Pyramid, model_output, tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


def _has_recast_layers(model: nn.Module) -> bool:
    return any(isinstance(module, RecastLayer) for module in model.modules())


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    """A trained-looking (random coefficients) RECAST adapter of ``tiny_bert(seed=0)``, saved once per module."""
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(tiny_bert(), RecastConfig(init_weights=False)).save_pretrained(path)
    return path


@pytest.fixture
def adapter_copy(saved_adapter, tmp_path) -> Path:
    """A private copy of ``saved_adapter`` that a test may damage."""
    return Path(shutil.copytree(saved_adapter, tmp_path / "adapter"))


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def _rewrite_config(path: Path, change) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


# --- configuration values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_templates": 0}, "`num_templates` must be a positive integer, got 0."),
        ({"num_templates": -3}, "`num_templates` must be a positive integer, got -3."),
        ({"num_templates": 2.5}, "`num_templates` must be a positive integer, got 2.5."),
        ({"num_templates": True}, "`num_templates` must be a positive integer, got True."),
        ({"layers_per_group": 0}, "`layers_per_group` must be a positive integer, got 0."),
        ({"num_groups": -1}, "`num_groups` must be a positive integer, got -1."),
        ({"num_coefficient_sets": 0}, "`num_coefficient_sets` must be a positive integer, got 0."),
        ({"coefficient_scale": 0}, "`coefficient_scale` must be a positive finite number, got 0."),
        ({"coefficient_scale": -1.0}, "`coefficient_scale` must be a positive finite number, got -1.0."),
        ({"coefficient_scale": float("inf")}, "`coefficient_scale` must be a positive finite number, got inf."),
        ({"coefficient_scale": float("nan")}, "`coefficient_scale` must be a positive finite number, got nan."),
        ({"layers_per_group": 2, "num_groups": 3}, "Set either `layers_per_group` (2) or `num_groups` (3), not both"),
        ({"layers_pattern": "layer"}, "When `layers_pattern` is specified, `layers_to_transform` must also be"),
        ({"layers_to_transform": -1}, "`layers_to_transform` must be a layer index or a list of layer indices"),
        ({"layers_to_transform": [0, -2]}, "(integers >= 0, counted from the first layer), got [0, -2]."),
        ({"layers_to_transform": [0, 1.5]}, "(integers >= 0, counted from the first layer), got [0, 1.5]."),
        ({"bias": "some"}, "`bias` must be 'none', 'all' or 'recast_only', got 'some'."),
    ],
)
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        RecastConfig(**kwargs)
    assert message in str(error.value)


def test_config_from_a_newer_peft_recast_asks_to_upgrade():
    with pytest.raises(ValueError, match=r"written by peft_recast 99\.1\.0, but peft_recast .* is installed.*pip"):
        RecastConfig(recast_version="99.1.0")
    with pytest.raises(ValueError, match="`recast_version` must be a version string"):
        RecastConfig(recast_version="not a version")
    assert RecastConfig().recast_version == peft_recast.__version__
    assert RecastConfig(recast_version="0.0.1").recast_version == "0.0.1"  # older files load


def test_saved_config_carries_the_version_and_a_newer_one_is_refused_on_load(adapter_copy):
    assert json.loads((adapter_copy / "adapter_config.json").read_text())["recast_version"] == peft_recast.__version__

    def from_the_future(config):
        config["recast_version"] = "99.0.0"
        config["template_warp"] = "spline"  # a field this version does not know: PEFT would only warn about it

    _rewrite_config(adapter_copy, from_the_future)
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"written by peft_recast 99\.0\.0.*Upgrade with"):
        with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['template_warp'\] for class RecastConfig"):
            PeftModel.from_pretrained(base, adapter_copy)
    assert not _has_recast_layers(base)


# --- target modules and layers ---------------------------------------------------------------------------------------


def test_targets_matching_nothing_raise_peft_error():
    with pytest.raises(NoMatchingPeftModuleError, match=r"Target modules \{'qvery'\} not found in the base model"):
        get_peft_model(tiny_bert(), RecastConfig(target_modules=["qvery"]))
    with pytest.raises(NoMatchingPeftModuleError, match=r"Target modules .\*\\.qvery not found in the base model"):
        get_peft_model(tiny_bert(), RecastConfig(target_modules=r".*\.qvery"))


def test_layers_to_transform_entirely_out_of_range_raises_peft_error():
    with pytest.raises(NoMatchingPeftModuleError, match=r"Note: You specified 'layers_to_transform': \[7\]"):
        get_peft_model(tiny_bert(), RecastConfig(layers_to_transform=[7]))


def test_layers_to_transform_partly_out_of_range_raises_and_leaves_model_clean():
    base = tiny_bert()  # layers 0..3
    with pytest.raises(ValueError) as error:
        get_peft_model(base, RecastConfig(layers_to_transform=[0, 1, 9]))
    assert "`layers_to_transform` asks for layer(s) [9]" in str(error.value)
    assert "This model has layers 0 to 3" in str(error.value)
    assert not _has_recast_layers(base)
    model = get_peft_model(tiny_bert(), RecastConfig(layers_to_transform=[0, 3]))
    assert {g.name for g in recast_summary(model).groups} == {
        "encoder.layer.0-3.attention.self.query",  # the group spans the layers it holds: 0 and 3
        "encoder.layer.0-3.attention.self.value",
    }


def test_layers_to_transform_with_layers_pattern():
    model = get_peft_model(tiny_llama(), RecastConfig(layers_to_transform=[1, 2], layers_pattern="layers"))
    indices = {name.split(".")[4] for name, m in model.named_modules() if isinstance(m, RecastLayer)}
    assert indices == {"1", "2"}
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"asks for layer\(s\) \[5\].*under `layers_pattern`='layers'"):
        get_peft_model(base, RecastConfig(layers_to_transform=[1, 5], layers_pattern="layers"))
    assert not _has_recast_layers(base)


@pytest.mark.parametrize(
    "key, pattern, index",
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("encoder.layer.10.attention.self.query", None, 10),
        ("layers.2.lin0", None, None),  # PEFT needs two components before the index when no pattern is given
        ("layers.2.lin0", "layers", 2),
        ("model.layers.1.mlp.experts.0.up", None, 1),  # the layer index, not the expert index
        ("transformer.h.4.attn.c_attn", ["blocks", "h"], 4),
        ("model.layers.3.self_attn.q_proj", "h", None),
    ],
)
def test_layer_index_reading_agrees_with_peft(key, pattern, index):
    """The out-of-range check reads layer indices the way PEFT's ``layers_to_transform`` filter does."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from peft_recast.planning import layer_index

    assert layer_index(key, pattern) == index
    for candidate in range(12):
        config = RecastConfig(target_modules=[key.rsplit(".", 1)[-1]], layers_to_transform=[candidate],
                              layers_pattern=pattern)
        assert bool(check_target_module_exists(config, key)) == (candidate == index)


def test_layers_to_transform_applies_to_regex_targets():
    """PEFT applies ``layers_to_transform`` to lists of names only (a regex would adapt every layer); RECAST applies it
    to a regex too, and checks its range the same way."""
    model = get_peft_model(tiny_bert(), RecastConfig(target_modules=r".*\.query", layers_to_transform=[0, 2]))
    assert sorted(model.targeted_module_names) == [f"encoder.layer.{i}.attention.self.query" for i in (0, 2)]
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"asks for layer\(s\) \[50\].*\(\.\*\\\.query\)"):
        get_peft_model(base, RecastConfig(target_modules=r".*\.query", layers_to_transform=[0, 50]))
    assert not _has_recast_layers(base)
    assert layers_to_transform_problem(tiny_bert(), RecastConfig(layers_to_transform=[]), {}) is None


def test_more_templates_than_any_group_warns_and_caps():
    with pytest.warns(UserWarning, match=r"`num_templates`=5 is larger than every template group .*largest has 2"):
        model = get_peft_model(tiny_bert(), RecastConfig(num_templates=5))
    assert {g.templates for g in recast_summary(model).groups} == {2}
    assert recast_summary(model).coefficients == 8 * 2 * 2  # 8 modules x 2 templates x 2 blocks of rows (default)


def test_capping_only_the_last_short_group_does_not_warn():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*num_templates")
        model = get_peft_model(tiny_bert(layers=5), RecastConfig(target_modules=["query"]))
    assert [g.templates for g in recast_summary(model).groups] == [2, 2, 1]


def test_mixed_shapes_in_one_role_are_grouped_per_shape():
    """Templates are combinations of same-shape weights, so one role with several shapes gets one set of groups per
    shape (named with the shape); nothing is refused."""
    x = torch.randn(3, 8)
    base = Pyramid()
    reference = base(x)
    model = get_peft_model(base, RecastConfig(target_modules=["layers.0", "layers.1", "layers.2", "layers.3",
                                                              "layers.4"], init_weights=False))
    groups = [(g.name, g.modules, g.shape) for g in recast_summary(model).groups]
    assert sorted(groups) == sorted([
        ("layers.0-1[8x8]", 2, (8, 8)),
        ("layers.2[16x8]", 1, (16, 8)),
        ("layers.3-4[16x16]", 2, (16, 16)),
    ])
    adapted = model(x)
    assert not torch.allclose(adapted, reference)
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("target", ["word_embeddings", "LayerNorm"])
def test_unsupported_layer_type_names_the_module_and_the_fix(target):
    with pytest.raises(TypeError) as error:
        get_peft_model(tiny_bert(), RecastConfig(target_modules=[target]))
    message = str(error.value)
    assert message.startswith("Target module ") and "is not supported" in message
    assert "RECAST supports `torch.nn.Linear`" in message and "`transformers.pytorch_utils.Conv1D`" in message
    assert "remove this module from `target_modules`" in message


def test_meta_device_base_weights_are_refused():
    with torch.device("meta"):
        base = tiny_bert()
    with pytest.raises(ValueError, match="are on the meta device.*load the base model with real weights"):
        get_peft_model(base, RecastConfig())


def test_all_zero_group_is_refused():
    base = tiny_bert()
    with torch.no_grad():
        for layer in base.encoder.layer[:2]:
            layer.attention.self.query.weight.zero_()
    with pytest.raises(ValueError, match="Every weight of this template group is zero"):
        get_peft_model(base, RecastConfig(target_modules=["query"]))


# --- loading: registration, base model, damaged files ----------------------------------------------------------------


def test_checkpoint_loaded_without_importing_peft_recast(saved_adapter):
    """Without ``import peft_recast`` PEFT does not know the RECAST type: every entry point raises
    ``KeyError: 'RECAST'`` from its registry lookup (PEFT has no hook to say more). The fix is ``import peft_recast``
    (README, "When something goes wrong")."""
    script = textwrap.dedent(
        f"""
        import sys
        from peft import PeftConfig, PeftModel
        from tests.models import tiny_bert
        for load in (lambda: PeftModel.from_pretrained(tiny_bert(), {str(saved_adapter)!r}),
                     lambda: PeftConfig.from_pretrained({str(saved_adapter)!r}),
                     lambda: tiny_bert().load_adapter({str(saved_adapter)!r})):
            try:
                load()
                print("LOADED")
            except Exception as error:
                print(type(error).__name__, repr(error.args))
        print("peft_recast imported:", "peft_recast" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.stdout.splitlines() == ["KeyError ('RECAST',)"] * 3 + ["peft_recast imported: False"], result.stderr


def _nudged_bert(relative: float, along_weight: bool = False) -> nn.Module:
    """``tiny_bert()`` with layer 2's value weight moved by ``relative`` of its norm: in a random direction (a
    fine-tune), or along the weight itself (a rescaling, as merging a RECAST adapter of that group partly is)."""
    base = tiny_bert()
    with torch.no_grad():
        weight = base.encoder.layer[2].attention.self.value.weight
        if along_weight:
            weight.mul_(1 + relative)
        else:
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
            weight.add_(noise * (relative * weight.norm() / noise.norm()))
    return base


@pytest.mark.parametrize("relative, along_weight", [(0.1, False), (0.3, False), (0.005, True), (0.05, True)])
def test_adapter_on_a_modified_copy_of_its_base_is_refused(saved_adapter, relative, along_weight):
    base = _nudged_bert(relative, along_weight)
    with pytest.raises(ValueError, match=r"does not belong to this base model: group 'encoder\.layer\.2-3\.attention"
                                         r"\.self\.value' has singular values"):
        PeftModel.from_pretrained(base, saved_adapter)
    assert not _has_recast_layers(base)


def test_fingerprint_tolerance_lets_small_random_fine_tunes_through(saved_adapter):
    """Documented limit: the fingerprint holds singular values, which a random change of relative size e moves by
    about e^2 / 2. A 1 % random change (1e-3 tolerance) therefore loads; its templates differ from the adapter's by
    about 1 %, so the coefficients keep nearly their meaning."""
    model = PeftModel.from_pretrained(_nudged_bert(0.01), saved_adapter)  # raises if the fingerprint refuses it
    reference = PeftModel.from_pretrained(tiny_bert(), saved_adapter)
    coefficients = [name for name, _ in model.named_parameters() if "recast_coefficients" in name]
    assert coefficients and all(torch.equal(model.get_parameter(n), reference.get_parameter(n)) for n in coefficients)


def test_adapter_on_a_base_changed_outside_its_targets_loads(saved_adapter, input_ids):
    """Templates come from the targeted weights only: changing a non-targeted weight leaves the adapter valid."""
    reference = PeftModel.from_pretrained(tiny_bert(), saved_adapter)
    base = tiny_bert()
    with torch.no_grad():
        base.encoder.layer[0].attention.self.key.weight.mul_(1.5)
    model = PeftModel.from_pretrained(base, saved_adapter)
    for name, parameter in model.named_parameters():
        if "recast_coefficients" in name:
            assert torch.equal(parameter, reference.get_parameter(name))


def test_adapter_on_a_base_with_a_lora_merged_into_it_is_refused(saved_adapter):
    from peft import LoraConfig

    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    with pytest.raises(ValueError, match="does not belong to this base model"):
        PeftModel.from_pretrained(lora.merge_and_unload(), saved_adapter)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "Error while deserializing header: invalid header length"),
        (lambda data: data[:5], "Error while deserializing header: header too small"),
        (lambda data: b"", "Error while deserializing header: header too small"),
        (lambda data: data[:8] + b"\xff" * 32 + data[40:], "Error while deserializing header: invalid UTF-8 in header"),
        (lambda data: data[:-4], "Error while deserializing header: incomplete metadata, file not fully covered"),
    ],
    ids=["half", "5 bytes", "empty", "garbage header", "last bytes cut"],
)
def test_truncated_or_corrupted_adapter_file_never_loads(adapter_copy, damage, message):
    """safetensors checks the header and that the data section has exactly the announced size: a cut or garbled file
    is refused with ``ValueError`` naming the file and safetensors' reason, before any module is wrapped."""
    path = adapter_copy / WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    base = tiny_bert()
    with pytest.raises(ValueError, match=rf"{WEIGHTS} is damaged or not a safetensors file \(SafetensorError: "
                                         rf".*{message}") as error:
        PeftModel.from_pretrained(base, adapter_copy)
    assert isinstance(error.value.__cause__, SafetensorError)
    assert not _has_recast_layers(base)


def test_corrupted_coefficient_bytes_that_become_non_finite_are_refused(adapter_copy):
    """A flipped exponent byte turns a coefficient into inf/NaN: caught when the coefficients are loaded. (A flip that
    keeps the number finite cannot be told from a real coefficient: safetensors files carry no checksum.)"""
    path = adapter_copy / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] |= 0x7F  # float32 little endian: the last byte holds the sign and the top exponent bits
    data[-2] |= 0x80
    path.write_bytes(bytes(data))
    base = tiny_bert()
    with pytest.raises(ValueError, match=r"Cannot load the RECAST adapter 'default': the coefficients .* hold 1 NaN or "
                                         r"infinite value\(s\)"):
        PeftModel.from_pretrained(base, adapter_copy)
    assert not _has_recast_layers(base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coefficients_in_a_file_are_refused(adapter_copy, bad):
    def poison(tensors):
        next(iter(tensors.values()))[0, 0] = bad

    _rewrite_tensors(adapter_copy, poison)
    with pytest.raises(ValueError, match=r"NaN or infinite value\(s\): the file is damaged or the training that wrote "
                                         r"it diverged\. Restore the file"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)


@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (2,), (1, 2), (1, 2, 1), (1, 2, 3)])
def test_coefficients_of_the_wrong_shape_are_refused(adapter_copy, shape):
    def reshape(tensors):
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(shape)

    _rewrite_tensors(adapter_copy, reshape)
    base = tiny_bert()
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(base, adapter_copy)
    message = str(error.value)
    assert f"have shape {shape} in the checkpoint but (1, 2, 2)" in message  # K x n x B, default 2 blocks
    assert "adapter_model.safetensors and adapter_config.json do not belong together" in message
    assert not _has_recast_layers(base)


def test_config_edited_after_saving_is_refused(adapter_copy):
    _rewrite_config(adapter_copy, lambda config: config.update(num_templates=1))
    with pytest.raises(ValueError, match=r"have shape \(1, 2, 2\) in the checkpoint but \(1, 1, 2\)"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)
    _rewrite_config(adapter_copy, lambda config: config.update(num_templates=2, layers_per_group=4))
    with pytest.raises(ValueError, match="template groups in the adapter but not in this model"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)
    _rewrite_config(adapter_copy, lambda config: config.update(layers_per_group=None, num_templates=0))
    with pytest.raises(ValueError, match="`num_templates` must be a positive integer, got 0."):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)


def test_missing_and_unexpected_coefficients_are_refused(adapter_copy):
    tensors = load_file(adapter_copy / WEIGHTS)
    first = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != first}, adapter_copy / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the checkpoint lacks the coefficients of 1 targeted module\(s\)"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)
    extra = dict(tensors, **{first.replace(".query.", ".key."): torch.zeros(1, 2)})
    save_file(extra, adapter_copy / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds coefficients for 1 module\(s\) that the adapter's config does not "
                                         r"target, e\.g\. \['base_model\.model\.encoder\.layer\.0\.attention"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)


def test_integer_coefficients_are_refused(adapter_copy):
    _rewrite_tensors(adapter_copy, lambda tensors: tensors.update({k: v.long() for k, v in tensors.items()}))
    with pytest.raises(ValueError, match="are torch.int64, not floating point"):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)


def test_float16_coefficients_load(adapter_copy, saved_adapter, input_ids):
    _rewrite_tensors(adapter_copy, lambda tensors: tensors.update({k: v.half() for k, v in tensors.items()}))
    expected = model_output(PeftModel.from_pretrained(tiny_bert(), saved_adapter), input_ids)
    loaded = model_output(PeftModel.from_pretrained(tiny_bert(), adapter_copy), input_ids)
    torch.testing.assert_close(loaded, expected, atol=1e-3, rtol=1e-3)


def test_failed_second_adapter_load_leaves_the_first_untouched(adapter_copy, saved_adapter, input_ids):
    model = PeftModel.from_pretrained(tiny_bert(), saved_adapter)
    before = model_output(model, input_ids)
    _rewrite_tensors(adapter_copy, lambda tensors: next(iter(tensors.values())).fill_(float("nan")))
    with pytest.raises(ValueError, match="Cannot load the RECAST adapter 'second'"):
        model.load_adapter(adapter_copy, adapter_name="second")
    holders = {name for m in model.modules() if isinstance(m, RecastLayer) for name in m.recast_coefficients}
    assert set(model.peft_config) == holders == {"default"}
    assert torch.equal(model_output(model, input_ids), before)


def test_missing_weights_file(adapter_copy):
    """A directory with adapter_config.json but no weights file: PEFT falls back to the Hub and, offline, raises
    huggingface_hub's repo-id validation error (it names the path)."""
    from huggingface_hub.errors import HFValidationError

    (adapter_copy / WEIGHTS).unlink()
    with pytest.raises(HFValidationError, match="Repo id must be in the form"):
        PeftModel.from_pretrained(tiny_bert(), str(adapter_copy))


def test_truncated_config_file(adapter_copy):
    config = adapter_copy / "adapter_config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(json.JSONDecodeError):
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)


class _Payload:
    """Unpickling this object writes a marker file: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


def test_pickled_weights_are_not_unpickled(adapter_copy, tmp_path):
    """Only a pickle-based adapter_model.bin: PEFT loads it with ``torch.load(weights_only=True)``, which refuses the
    payload (``UnpicklingError``) without running it."""
    marker = tmp_path / "pwned"
    tensors = load_file(adapter_copy / WEIGHTS)
    (adapter_copy / WEIGHTS).unlink()
    torch.save({**tensors, "payload": _Payload(marker)}, adapter_copy / "adapter_model.bin")
    with pytest.raises(Exception, match="Weights only load failed") as error:
        PeftModel.from_pretrained(tiny_bert(), adapter_copy)
    assert type(error.value).__name__ == "UnpicklingError"
    assert not marker.exists()


def test_inspecting_a_pickled_adapter_does_not_run_it(adapter_copy, tmp_path):
    """``peft-recast inspect`` reads a ``.bin`` adapter with ``torch.load(weights_only=True)`` as well."""
    from peft_recast.adapter_info import inspect_adapter

    marker = tmp_path / "pwned"
    tensors = load_file(adapter_copy / WEIGHTS)
    (adapter_copy / WEIGHTS).unlink()
    torch.save({**tensors, "payload": _Payload(marker)}, adapter_copy / "adapter_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        inspect_adapter(str(adapter_copy))
    assert not marker.exists()
    torch.save(tensors, adapter_copy / "adapter_model.bin")  # plain tensors still inspect fine
    assert inspect_adapter(str(adapter_copy))["coefficients"] == 8 * 2 * 2  # q, v of 4 layers x 2 templates x 2 blocks


def test_safetensors_is_preferred_over_a_pickle_next_to_it(adapter_copy, saved_adapter, tmp_path, input_ids):
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, adapter_copy / "adapter_model.bin")
    model = PeftModel.from_pretrained(tiny_bert(), adapter_copy)
    assert not marker.exists()
    torch.testing.assert_close(
        model_output(model, input_ids), model_output(PeftModel.from_pretrained(tiny_bert(), saved_adapter), input_ids)
    )


# --- merging broken coefficients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_coefficients(bad, input_ids):
    base = tiny_bert()
    reference = model_output(base, input_ids)
    model = get_peft_model(base, RecastConfig(init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, RecastLayer)]
    with torch.no_grad():
        layers[-1].recast_coefficients["default"][0, 0] = bad
    weights = [layer.get_base_layer().weight.clone() for layer in layers]
    message = r"NaNs detected in the merged weights\. The adapter default seems to be broken: .* Nothing was merged\."
    with pytest.raises(ValueError, match=message):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload(safe_merge=True)
    # checked before merging: no layer was merged (or unwrapped, for merge_and_unload) before the broken one
    assert not any(layer.merged for layer in layers)
    assert [m for m in model.modules() if isinstance(m, RecastLayer)] == layers
    for layer, weight in zip(layers, weights):
        assert torch.equal(layer.get_base_layer().weight, weight)
    with model.disable_adapter():
        assert torch.equal(model_output(model, input_ids), reference)


def test_safe_merge_refuses_a_merge_that_overflows():
    """Finite coefficients whose merged weight overflows float16: caught per layer by the merged-weight check."""
    model = get_peft_model(tiny_bert().half(), RecastConfig(init_weights=False, target_modules=["query"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "recast_coefficients" in name:
                parameter.fill_(1e6)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)


# --- template banks (gradient mimicry) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_bank(tmp_path_factory) -> Path:
    """A (briefly fitted) template bank of ``tiny_bert(seed=0)`` and an adapter that uses it."""
    from peft_recast.bank import MimicrySettings, save_template_bank
    from peft_recast.gradient_mimicry import mimic_template_bank

    directory = tmp_path_factory.mktemp("bank")
    bank = mimic_template_bank(tiny_bert(), RecastConfig(), MimicrySettings(steps=5), progress=False)
    path = Path(save_template_bank(bank, str(directory)))
    model = get_peft_model(tiny_bert(), RecastConfig(template_bank=str(path), init_weights=False))
    model.save_pretrained(directory / "adapter")
    return path


def _bank_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def _first_templates_key(tensors: dict) -> str:
    return sorted(key for key in tensors if key.endswith(".templates"))[0]


def _damage_bank(path: Path, tensors=None, metadata=None, data=None) -> None:
    if data is not None:
        path.write_bytes(data)
    else:
        save_file(tensors, path, metadata=metadata)


BANK_DAMAGES = {
    "half": (lambda t, m, b: dict(data=b[: len(b) // 2]), r"the file is damaged or not safetensors \(SafetensorError"),
    "empty": (lambda t, m, b: dict(data=b""), r"the file is damaged or not safetensors .*header too small"),
    "not a bank": (lambda t, m, b: dict(tensors=t, metadata={"format": "pt"}), "its metadata does not name it a"),
    "newer version": (lambda t, m, b: dict(tensors=t, metadata={**m, "version": "2"}), r"it has version '2'.*upgrade"),
    "tensor missing": (
        lambda t, m, b: dict(tensors={k: v for k, v in t.items() if k != _first_templates_key(t)}, metadata=m),
        "File does not contain tensor",
    ),
    "wrong shape": (
        lambda t, m, b: dict(tensors={**t, _first_templates_key(t): t[_first_templates_key(t)][:, 1:].clone()},
                             metadata=m),
        r"has templates of shape \(2, 1023\).*the file is damaged",
    ),
    "nan": (
        lambda t, m, b: dict(tensors={**t, _first_templates_key(t): t[_first_templates_key(t)] * float("nan")},
                             metadata=m),
        "holds NaN or infinite values; the file is damaged or its mimicry diverged",
    ),
    "garbled metadata": (
        lambda t, m, b: dict(tensors=t, metadata={**m, "groups": m["groups"][:-5]}),
        "Expecting ',' delimiter",
    ),
}


@pytest.mark.parametrize("damage", sorted(BANK_DAMAGES))
def test_damaged_template_bank_never_loads(saved_bank, tmp_path, damage):
    from peft_recast.bank import load_template_bank

    make, message = BANK_DAMAGES[damage]
    damaged = tmp_path / "bank.safetensors"
    _damage_bank(damaged, **make(load_file(saved_bank), _bank_metadata(saved_bank), saved_bank.read_bytes()))
    with pytest.raises(ValueError, match=r"Cannot load the RECAST template bank .*" + message):
        load_template_bank(str(damaged))
    adapter = shutil.copytree(saved_bank.parent / "adapter", tmp_path / "adapter")
    _rewrite_config(adapter, lambda config: config.update(template_bank=str(damaged)))
    base = tiny_bert()
    with pytest.raises(ValueError, match="Cannot load the RECAST template bank"):
        PeftModel.from_pretrained(base, adapter)
    assert not _has_recast_layers(base)


def test_missing_template_bank_is_named(saved_bank, tmp_path):
    adapter = shutil.copytree(saved_bank.parent / "adapter", tmp_path / "adapter")
    _rewrite_config(adapter, lambda config: config.update(template_bank=str(tmp_path / "nowhere.safetensors")))
    with pytest.raises(ValueError, match="Cannot find the RECAST template bank .*nowhere.safetensors"):
        PeftModel.from_pretrained(tiny_bert(), adapter)


def test_template_bank_of_another_base_is_refused(saved_bank):
    with pytest.raises(ValueError, match="was fitted to another base model"):
        PeftModel.from_pretrained(tiny_bert(seed=1), saved_bank.parent / "adapter")
