"""THE list of PEFT tests that are not run against RECAST, each with its reason -- and the other deviations.

Rules (from the issue): a PEFT test is left out only where it cannot apply to RECAST by its nature. Everything else is
re-parametrised with RECAST cases (see the ``test_recast_*.py`` files) or, for generic tests that PEFT happens to write
with a hard-wired ``LoraConfig`` using only method-independent arguments, run with RECAST substituted for LoRA
(``LORA_SUBSTITUTED``). Failures are fixed in ``peft_recast``, never by adding entries here.

Keys are ``"<PEFT class>::<test function>"``; every test of a listed class is collected as a skip whose message is
"RECAST exclusion: <reason>". Whole PEFT classes that are not subclassed at all are in ``EXCLUDED_CLASSES``.
"""

from __future__ import annotations

EXCLUSIONS: dict[str, str] = {}


def _exclude(reason: str, *keys: str) -> None:
    for key in keys:
        assert key not in EXCLUSIONS, key
        EXCLUSIONS[key] = reason


# --------------------------------------------------------------------------------------------------------------------
# Reasons (shared wording)
OTHER_METHOD = "tests a feature of another PEFT method only ({}); no RECAST code path is involved"
LAYER_TYPE = "RECAST adapts nn.Linear, nn.Conv2d and transformers Conv1D only; this test needs adapters on {}"
PROMPT_LEARNING = "prompt-learning only (PromptTuning/PrefixTuning/P-tuning/CPT); RECAST is not a prompt-learning method"
HARDWIRED_LORA_SPECIFIC = "hard-wired to LoRA and asserts LoRA-specific parameter names / options ({})"

# --------------------------------------------------------------------------------------------------------------------
# test_custom_models.py :: TestPeftCustomModel
_exclude(
    OTHER_METHOD.format("TrainableTokens"),
    "TestPeftCustomModel::test_trainable_tokens_random_init_unmerge_restores_base_weights",
    "TestPeftCustomModel::test_set_adapter_non_overlapping_trainable_token_indices",
    "TestPeftCustomModel::test_multiple_active_adapters_with_same_trainable_token_indices_raises",
    "TestPeftCustomModel::test_multiple_active_adapters_with_different_trainable_token_indices_works",
    "TestPeftCustomModel::test_delete_adapter_multiple_adapters_with_trainable_token_indices",
    "TestPeftCustomModel::test_set_requires_grad_trainable_tokens",
)
_exclude(
    OTHER_METHOD.format("IA3 grouped-conv / feedforward merge"),
    "TestPeftCustomModel::test_ia3_grouped_conv_feedforward_merge",
    "TestPeftCustomModel::test_ia3_safe_merge_does_not_mutate_base_layer_on_non_finite_bias",
)
_exclude(
    OTHER_METHOD.format("GLoRA safe merge"),
    "TestPeftCustomModel::test_glora_safe_merge_does_not_corrupt_base_layer_on_non_finite_adapter",
)
_exclude(
    OTHER_METHOD.format("LoRA `lora_bias`"),
    "TestPeftCustomModel::test_lora_safe_merge_does_not_mutate_base_layer_on_non_finite_bias",
    "TestPeftCustomModel::test_merge_with_lora_bias_when_base_layer_has_no_bias_warns_and_raises",
)
_exclude(
    OTHER_METHOD.format("DoRA"),
    "TestPeftCustomModel::test_gpt2_dora_merge_and_unload",
    "TestPeftCustomModel::test_gpt2_dora_merge_and_unload_safe_merge",
    "TestPeftCustomModel::test_dora_save_and_load_remapping",
)
_exclude(OTHER_METHOD.format("GraLoRA"), "TestPeftCustomModel::test_gralora_and_hybrid_gralora_parameter_count")
_exclude(
    OTHER_METHOD.format("MonteCLoRA"),
    "TestPeftCustomModel::test_monteclora_variational_loss_computation",
    "TestPeftCustomModel::test_monteclora_variational_loss_computation_eval_mode",
)
_exclude(
    OTHER_METHOD.format("PVeRA generator seeding"),
    "TestPeftCustomModel::test_pvera_reproducible",
    "TestPeftCustomModel::test_pvera_generator_is_per_adapter",
    "TestPeftCustomModel::test_pvera_no_generator_seed_means_no_generator",
)
_exclude(
    LAYER_TYPE.format("nn.MultiheadAttention"),
    "TestPeftCustomModel::test_unload_adapter_multihead_attention",
    "TestPeftCustomModel::test_mha_gradients_set_correctly",
)
_exclude(
    LAYER_TYPE.format("nn.Embedding (LoRA on embeddings, save_embedding_layers)"),
    "TestPeftCustomModel::test_save_pretrained_targeting_lora_to_embedding_layer",
    "TestPeftCustomModel::test_save_pretrained_targeting_lora_to_embedding_layer_non_transformers",
    "TestPeftCustomModel::test_load_resized_embedding_ignore_mismatched_sizes",
)
# add_weighted_adapter: RECAST implements it (an exact weighted sum of the adapters' coefficients, i.e. LoRA's
# combination_type="linear"); the tests written with method-independent arguments run (LORA_SUBSTITUTED), these two
# cannot apply.
_exclude(
    HARDWIRED_LORA_SPECIFIC.format(
        "combination_type='cat' concatenates LoRA ranks, with LoRA's r and rank_pattern; the test ignores its config_cls "
        "parameter and always builds LoraConfig"
    ),
    "TestPeftCustomModel::test_add_weighted_adapter_cat_with_rank_pattern",
)
_exclude(
    HARDWIRED_LORA_SPECIFIC.format(
        "two adapters of different lora_alpha/r scaling combined with LoRA's approximate combination types (svd, cat, "
        "ties, dare_*, magnitude_prune*, with density), judged by correlation/MSE thresholds tuned for them; RECAST has "
        "no scaling and combines exactly (LoRA's 'linear'), checked by tests/library/test_serving.py and by PEFT's "
        "negation and subtraction tests (EXPECTED_FAILURES until RECAST accepts combination_type='linear')"
    ),
    "TestPeftCustomModel::test_add_weighted_adapter_with_different_scaling",
)
_exclude(
    "PEFT's guard `config_cls != LoraConfig or config_cls != BOFTConfig` is always true, so the test body skips for "
    "every method (the bias-warning it targets is LoRA/BOFT wording)",
    "TestPeftCustomModel::test_disable_adapter_with_bias_warns",
)
_exclude(
    "builds two differently random-initialised instances of a model class defined inside the test and loads the "
    "adapter saved from one into the other; a RECAST adapter is bound to the weights of its base model (templates are "
    "built from them; the base fingerprint check refuses other weights by design) and the test-local class cannot be "
    "seeded from outside (see BASE_MODEL_SEEDING for the module-level model classes, which are)",
    "TestPeftCustomModel::test_ignore_mismatched_sizes_with_scalar_modules_to_save",
)
_exclude(
    "mixed=True builds a PeftMixedModel, whose tuner list is hard-coded in PEFT (COMPATIBLE_TUNER_TYPES) and closed to "
    "plug-ins; the mixed=False half is the generic add_adapter duplicate-name check, written with LoRA rank changes",
    "TestPeftCustomModel::test_add_adapter_rejects_duplicate_name_without_mutation",
)

# test_custom_models.py :: TestMultipleActiveAdapters
_exclude(
    OTHER_METHOD.format("DoRA"),
    "TestMultipleActiveAdapters::test_multiple_active_dora_adapters_merge_matches_forward",
    "TestMultipleActiveAdapters::test_multiple_active_dora_adapters_safe_and_unsafe_merge_agree",
    "TestMultipleActiveAdapters::test_plain_lora_and_dora_adapters_merge_matches_forward",
)

# test_custom_models.py :: TestMixedAdapterBatches
_exclude(
    LAYER_TYPE.format("nn.MultiheadAttention"),
    "TestMixedAdapterBatches::test_mixed_adapter_batches_mha_raises",
)
_exclude(
    OTHER_METHOD.format("DoRA"),
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_but_dora_not_included_works",
)
_exclude(
    "GPU-only timing benchmark of LoRA (require_non_cpu) on opt-125m; not a correctness test",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_opt_timing",
)

# test_custom_models.py :: TestRequiresGrad -- one hard-wired test per other method
for _method in (
    "adalora", "boft", "fourierft", "hra", "ia3", "lntuning", "loha", "lokr", "lora", "miss", "oft", "pvera",
    "randlora", "vblora", "vera",
):  # fmt: skip
    for _suffix in ("different_targets", "same_targets"):
        _exclude(
            OTHER_METHOD.format(f"{_method} requires_grad bookkeeping, one such test per method"),
            f"TestRequiresGrad::test_requires_grad_{_method}_{_suffix}",
        )
_exclude(
    OTHER_METHOD.format("per-method requires_grad bookkeeping on conv layers"),
    "TestRequiresGrad::test_requires_grad_ia3_conv1d",
    "TestRequiresGrad::test_requires_grad_ia3_conv2d",
    "TestRequiresGrad::test_requires_grad_lora_conv2d",
    "TestRequiresGrad::test_requires_grad_lora_emb_conv1d",
)
_exclude(
    HARDWIRED_LORA_SPECIFIC.format("lora_A/lora_B names in the expected requires_grad sets"),
    "TestRequiresGrad::test_requires_grad_modules_to_save_default",
    "TestRequiresGrad::test_requires_grad_modules_to_save_disabling",
    "TestRequiresGrad::test_requires_grad_modules_to_save_multiple_adapters",
    "TestRequiresGrad::test_requires_grad_follows_inference_mode_modules_to_save",
    "TestRequiresGrad::test_loading_adapter_preserves_custom_requires_grad",
)
_exclude(
    OTHER_METHOD.format("TrainableTokens"),
    "TestRequiresGrad::test_requires_grad_follows_inference_mode_trainable_token_indices",
    "TestRequiresGrad::test_loading_model_with_trainble_tokens_requires_grad_set_correctly",
)

# test_custom_models.py :: TestDefaultTargetModules
_exclude(OTHER_METHOD.format("OSF default targets"), "TestDefaultTargetModules::test_default_target_modules_osf")
_exclude(
    "monkeypatches the DeLoRA/LoRA default-target mappings by name (PEFT: 'it would require some effort to patch the "
    "correct target module mapping'); RECAST has its own TRANSFORMERS_MODELS_TO_RECAST_TARGET_MODULES_MAPPING, and "
    "the default targets are exercised by every model test (target_modules=None)",
    "TestDefaultTargetModules::test_default_target_modules_list_of_str",
    "TestDefaultTargetModules::test_default_target_modules_str",
)

# --------------------------------------------------------------------------------------------------------------------
# test_config.py :: TestPeftConfig
_exclude(
    OTHER_METHOD.format("AdaLoRA config validation"),
    "TestPeftConfig::test_adalora_config_correct_timing_still_works",
    "TestPeftConfig::test_adalora_config_invalid_total_step_raises",
    "TestPeftConfig::test_adalora_config_r_warning",
    "TestPeftConfig::test_adalora_config_timing_bounds_error",
    "TestPeftConfig::test_adalora_config_valid_timing_works",
)
_exclude(
    OTHER_METHOD.format("IA3 feedforward_modules validation"),
    "TestPeftConfig::test_ia3_is_feedforward_subset_invalid_config",
    "TestPeftConfig::test_ia3_is_feedforward_subset_valid_config",
)
_exclude(OTHER_METHOD.format("prompt encoder"), "TestPeftConfig::test_prompt_encoder_warning_num_layers")
_exclude(
    OTHER_METHOD.format("LoRA layers_to_transform / regex validation messages"),
    "TestPeftConfig::test_lora_config_layers_to_transform_validation",
    "TestPeftConfig::test_regex_with_layer_indexing_lora",
)
_exclude(
    "not parametrised over methods: downloads the LoRA repo ybelkada/test-st-lora with PeftConfig into a brand-new "
    "temporary cache_dir, i.e. it tests the Hub download itself, which needs network access",
    "TestPeftConfig::test_from_pretrained_cache_dir_remote",
)
_exclude(
    "passes a brand-new empty temporary cache_dir, so the config must be downloaded from the Hub (network); loading "
    "the same Hub repo/revision from the (local) cache is covered by test_from_pretrained and "
    "test_from_pretrained_sanity_check",
    "TestPeftConfig::test_from_pretrained_cache_dir",
)

# --------------------------------------------------------------------------------------------------------------------
# Model tests (test_decoder_models.py, test_encoder_decoder_models.py, test_feature_extraction_models.py)
for _cls in ("TestDecoderModels", "TestEncoderDecoderModels", "TestPeftFeatureExtractionModel"):
    _exclude(
        PROMPT_LEARNING,
        f"{_cls}::test_training_prompt_learning_tasks",
    )
_exclude(
    PROMPT_LEARNING,
    "TestDecoderModels::test_prompt_tuning_text_prepare_for_training",
    "TestDecoderModels::test_prompt_tuning_text_tokenizer_kwargs",
    "TestDecoderModels::test_prompt_tuning_trust_remote_code",
    "TestDecoderModels::test_prompt_tuning_sample_vocab_prepare_for_training",
    "TestDecoderModels::test_prompt_tuning_config_invalid_args",
    "TestDecoderModels::test_prompt_tuning_prepare_inputs_for_generation_4d_attention_mask",
    "TestDecoderModels::test_prefix_tuning_qwen2_with_grouped_query_attention",
    "TestDecoderModels::test_prefix_tuning_qwen3_with_grouped_query_attention",
    "TestDecoderModels::test_prefix_tuning_offsets_position_ids_in_forward",
    "TestDecoderModels::test_prefix_tuning_mistral",
    "TestDecoderModels::test_prefix_tuning_gemma4_works",
    "TestDecoderModels::test_prefix_tuning_gemma4_warns_if_some_layers_skipped",
    "TestDecoderModels::test_prefix_tuning_gemma4_raises_if_all_layers_skipped",
    "TestDecoderModels::test_prompt_learning_with_gradient_checkpointing",
    "TestDecoderModels::test_set_requires_grad_prompt_learning_raises",
    "TestEncoderDecoderModels::test_active_adapters_prompt_learning",
    "TestEncoderDecoderModels::test_prompt_learning_forward_with_inputs_embeds",
)
_exclude(OTHER_METHOD.format("AdaLoRA generation without dropout"), "TestDecoderModels::test_generate_adalora_no_dropout")
_exclude(
    OTHER_METHOD.format("LoRA layer_replication / embed_scale on embeddings"),
    "TestDecoderModels::test_lora_layer_replication",
    "TestDecoderModels::test_lora_embed_scale_is_applied",
    "TestDecoderModels::test_lora_embed_scale_is_applied_mixed_batch",
)
_exclude(
    LAYER_TYPE.format("nn.Embedding (save_embedding_layers)"),
    "TestDecoderModels::test_save_pretrained_targeting_lora_to_embedding_layer",
)
_exclude(
    LAYER_TYPE.format("nn.Embedding (embed_tokens with tied weights)"),
    "TestDecoderModels::test_merge_and_unload_fixes_tie_word_embeddings_config",
)

# --------------------------------------------------------------------------------------------------------------------
# Tests of generic PeftModel behaviour that PEFT writes with LoRA and method-independent arguments only: they run with
# `LoraConfig` replaced by RECAST (recast_peft_harness.lora_as_recast, which rejects any LoRA-specific argument).
LORA_SUBSTITUTED: set[str] = {
    "TestPeftCustomModel::test_delete_adapter_with_multiple_adapters_works",
    "TestPeftCustomModel::test_delete_adapter_multiple_adapters_with_modules_to_save",
    "TestPeftCustomModel::test_weight_bias_attributes",
    "TestPeftCustomModel::test_existing_model_card",
    "TestPeftCustomModel::test_non_existing_model_card",
    "TestPeftCustomModel::test_save_embedding_layers_excludes_similarly_named_sibling",
    "TestPeftCustomModel::test_load_does_not_overwrite_similarly_named_sibling",
    "TestPeftCustomModel::test_multiple_adapters_no_needless_copy_modules_to_save",
    "TestPeftCustomModel::test_multiple_adapters_automatic_modules_to_save",
    "TestEncoderDecoderModels::test_load_model_low_cpu_mem_usage",
    "TestEncoderDecoderModels::test_save_shared_tensors",
    "TestPeftFeatureExtractionModel::test_load_model_low_cpu_mem_usage",
    # add_weighted_adapter (`lora.LoraLayer` is RECAST's layer class here: recast_peft_harness.LORA_SUBSTITUTION)
    "TestPeftCustomModel::test_add_weighted_adapter_negative_weight_negates_adapter",
    "TestPeftCustomModel::test_add_weighted_adapter_subtraction_with_negative_weights",
    "TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save_merging_adapters",
    "TestPeftCustomModel::test_multiple_adapters_same_modules_to_save_merging_adapters_raises",
    "TestPeftCustomModel::test_multiple_adapters_seq_cls_mixed_modules_to_save_merging_adapters",
}

# PEFT tests that RECAST fails although they apply to it: "<Class>::<test>" -> (the RECAST bug, the exception the test
# fails with). Each runs as `xfail(strict=True, raises=<that exception>)`: a failure of another kind is reported as a
# failure, and once peft_recast is fixed the test passes, which strict mode reports as a failure (XPASS) until the entry
# is deleted.
EXPECTED_FAILURES: dict[str, tuple[str, type[BaseException]]] = {}

# Generic tests that already loop over every registered PEFT method (RECAST included once registered): run unchanged.
AS_IS: set[str] = {"TestPeftConfig::test_from_peft_type"}

# --------------------------------------------------------------------------------------------------------------------
# PEFT test classes not subclassed at all.
EXCLUDED_CLASSES: dict[str, str] = {
    "test_custom_models.py::TestDynamicDispatch": OTHER_METHOD.format("LoRA custom-module dynamic dispatch"),
    "test_custom_models.py::TestLayerRepr": OTHER_METHOD.format("repr of LoRA layers"),
    "test_custom_models.py::TestMultiRankAdapter": OTHER_METHOD.format("LoRA rank_pattern"),
    "test_config.py::TestLoraNestedConfigRoundTrip": OTHER_METHOD.format("nested LoRA sub-configs"),
}

# --------------------------------------------------------------------------------------------------------------------
# Gates in PEFT's tests that name the methods supporting a feature (allow-lists) and would skip RECAST although RECAST
# supports the feature. For RECAST they are opened (module-level name replaced in the copied test function only), so
# the feature *is* tested. This strengthens, never weakens, the tests.
GATE_OVERRIDES: dict[str, str] = {
    "testing_common._test_mixed_adapter_batches": "allow-list (LoraConfig, RoadConfig) -> RECAST implements "
    "adapter_names mixed batches",
    "testing_common._test_generate_with_mixed_adapter_batches_and_beam_search": "allow-list (LoraConfig,) -> RECAST "
    "implements adapter_names mixed batches (incl. generate)",
    "testing_common._skip_if_conv1d_not_supported": "allow-list (IA3, LoHa, LoKr, LoRA) for GPT-2 Conv1D merges -> "
    "RECAST supports transformers Conv1D",
    "test_decoder_models.test_mixed_adapter_batches / test_generate_with_mixed_adapter_batches": "`config_cls != "
    "LoraConfig` gate -> RECAST implements mixed batches",
    "testing_common._test_weighted_combination_of_adapters": "allow-list (LoraConfig, IA3Config) -> RECAST implements "
    "add_weighted_adapter; it runs IA3's branch (no LoRA combination_type), see recast_peft_gates.py",
    "test_decoder_models.check_beft_config": "meant to skip BEFT on bias-free Llama/Gemma3 and to retarget BEFT on "
    "GPT-J, but its `isinstance(config_cls, BeftConfig)` is always False so it hits every method; for RECAST it is "
    "applied to BEFT only (i.e. a no-op)",
}

# Base-model constructors that PEFT's tests call twice without a seed (save with one instance, load into another) are
# given a fixed seed, as PEFT's own MockTransformerWrapper does for the same reason: a RECAST adapter only has a
# meaning on the base weights it was created on (see _seeded in test_recast_custom_models.py).
BASE_MODEL_SEEDING = ("test_custom_models.DeepMLP", "test_custom_models.ModelEmbWithSibling")
