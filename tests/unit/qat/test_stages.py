import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.stages import check_stage_data, resolve_stages
from lowbit_deploy.recipes import DataSource, StageKind, TimestepSampling, parse_recipe


def _train_section(recipe_dict, **train):
    recipe_dict["train"].update(train)
    return parse_recipe(recipe_dict).train


def test_a_recipe_without_stages_is_one_distillation_stage_as_before(tiny_recipe_dict):
    plan = resolve_stages(_train_section(tiny_recipe_dict, steps=7, lr=3e-4))
    (stage,) = plan.stages
    assert (stage.kind, stage.start, stage.steps, stage.lr, stage.loss, stage.feature_weight) == (
        StageKind.DISTILL, 0, 7, 3e-4, "mse", 0.0)
    assert plan.end_step == 7
    del tiny_recipe_dict["train"]["steps"]
    assert resolve_stages(parse_recipe(tiny_recipe_dict).train).stages[0].steps == 300


def test_steps_override_replaces_a_single_stage_and_caps_staged_runs(tiny_recipe_dict, two_stage_recipe_dict):
    assert resolve_stages(parse_recipe(tiny_recipe_dict).train, 9).end_step == 9
    staged = parse_recipe(two_stage_recipe_dict).train
    assert resolve_stages(staged, 3).end_step == 3
    assert resolve_stages(staged, 100).end_step == resolve_stages(staged).total_steps == 4
    assert resolve_stages(staged, 0).end_step == 0


def test_stage_settings_fall_back_to_the_train_section_then_the_kind(two_stage_recipe_dict):
    two_stage_recipe_dict["train"].update(lr=2e-4, timestep_sampling="uniform", condition_drop_prob=0.2)
    two_stage_recipe_dict["train"]["stages"][1].update(timestep_sampling="beta", beta_alpha=2.0)
    distill, noise = resolve_stages(parse_recipe(two_stage_recipe_dict).train).stages
    assert (distill.start, distill.end, noise.start, noise.end) == (0, 2, 2, 4)
    assert (distill.lr, distill.loss, distill.feature_weight) == (2e-4, "l1", 0.5)
    assert (noise.lr, noise.loss, noise.feature_weight) == (5e-5, "mse", 0.0)
    assert distill.timestep_sampling is TimestepSampling.UNIFORM and distill.condition_drop_prob == 0.2
    assert (noise.timestep_sampling, noise.beta_alpha, noise.beta_beta) == (TimestepSampling.BETA, 2.0, 1.0)
    assert [stage.label for stage in (distill, noise)] == ["1-distill", "2-noise"]


def test_a_distill_stage_defaults_to_bitsfusion_l1_and_feature_weight(tiny_recipe_dict):
    del tiny_recipe_dict["train"]["steps"]
    tiny_recipe_dict["train"]["stages"] = [{"kind": "distill", "steps": 1}]
    (stage,) = resolve_stages(parse_recipe(tiny_recipe_dict).train).stages
    assert (stage.loss, stage.feature_weight, stage.condition_drop_prob) == ("l1", 0.01, 0.1)
    assert (stage.timestep_sampling, stage.beta_alpha, stage.beta_beta) == (TimestepSampling.BETA, 3.0, 1.0)


def test_position_puts_a_boundary_in_the_next_stage(two_stage_recipe_dict):
    plan = resolve_stages(parse_recipe(two_stage_recipe_dict).train)
    assert [plan.position(step) for step in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("stage, error", [
    ({"kind": "calibrate", "steps": 1}, r"train\.stages \(item 1\)\.kind: Input should be 'distill', 'noise' or 'trajectory'"),
    ({"kind": "distill", "steps": 0}, r"train\.stages \(item 1\)\.steps: Input should be greater than or equal to 1"),
    ({"kind": "distill"}, r"train\.stages \(item 1\)\.steps: Field required"),
    ({"kind": "distill", "steps": 1, "feature_weight": -0.1}, r"stages \(item 1\)\.feature_weight: .*greater than or equal"),
    ({"kind": "distill", "steps": 1, "feature_weight": float("nan")}, r"stages \(item 1\)\.feature_weight: .*finite"),
    ({"kind": "distill", "steps": 1, "feature_weight": float("inf")}, r"stages \(item 1\)\.feature_weight: .*finite"),
    ({"kind": "distill", "steps": 1, "feature_weight": "lots"}, r"stages \(item 1\)\.feature_weight: .*valid number"),
    ({"kind": "noise", "steps": 1, "feature_weight": 0.01}, r"feature_weight applies to `distill` stages only"),
    ({"kind": "noise", "steps": 1, "lr": 0}, r"stages \(item 1\)\.lr: Input should be greater than 0"),
    ({"kind": "noise", "steps": 1, "loss": "huber"}, r"stages \(item 1\)\.loss: Input should be 'mse' or 'l1'"),
    ({"kind": "noise", "steps": 1, "weight": 1}, r"stages \(item 1\)\.weight: unknown key"),
])
def test_invalid_stages_are_clear_errors(tiny_recipe_dict, stage, error):
    del tiny_recipe_dict["train"]["steps"]
    tiny_recipe_dict["train"]["stages"] = [stage]
    with pytest.raises(UserError, match=error):
        parse_recipe(tiny_recipe_dict)


def test_stages_exclude_the_single_stage_keys(tiny_recipe_dict):
    tiny_recipe_dict["train"].update(loss="l1", stages=[{"kind": "distill", "steps": 1}])
    with pytest.raises(UserError, match=r"train\.steps and train\.loss only apply without `stages`"):
        parse_recipe(tiny_recipe_dict)
    del tiny_recipe_dict["train"]["steps"], tiny_recipe_dict["train"]["loss"]
    tiny_recipe_dict["train"]["stages"] = []
    with pytest.raises(UserError, match=r"train\.stages: List should have at least 1 item"):
        parse_recipe(tiny_recipe_dict)


def test_a_staged_recipe_survives_the_checkpoint_round_trip(two_stage_recipe_dict):
    from lowbit_deploy.recipes import recipe_from_json

    recipe = parse_recipe(two_stage_recipe_dict)
    assert recipe_from_json(recipe.to_json()) == recipe


def test_a_noise_stage_refuses_data_free_samples(two_stage_recipe_dict):
    plan = resolve_stages(parse_recipe(two_stage_recipe_dict).train)
    with pytest.raises(UserError, match="stage 2-noise needs real data"):
        check_stage_data(plan, lambda source: DataSource.GAUSSIAN)
    check_stage_data(plan, lambda source: DataSource.DIGITS)


def test_a_cosine_schedule_decays_each_stage_from_its_lr_towards_zero(two_stage_recipe_dict):
    two_stage_recipe_dict["train"]["lr_schedule"] = "cosine"
    two_stage_recipe_dict["train"]["stages"][0]["steps"] = 20
    two_stage_recipe_dict["train"]["stages"][1]["lr_schedule"] = "constant"
    first, second = resolve_stages(parse_recipe(two_stage_recipe_dict).train).stages
    assert first.lr_at(first.start) == first.lr
    assert first.lr_at(first.start + first.steps / 2) == pytest.approx(first.lr / 2)
    assert 0 < first.lr_at(first.end - 1) < first.lr_at(first.end - 2) < first.lr * 0.1
    assert [second.lr_at(step) for step in range(second.start, second.end)] == [second.lr] * second.steps


def test_an_unknown_lr_schedule_is_a_clear_error(tiny_recipe_dict):
    with pytest.raises(UserError, match=r"lr_schedule"):
        _train_section(tiny_recipe_dict, lr_schedule="exponential")


def test_a_linear_schedule_decays_from_the_stage_lr_to_zero(two_stage_recipe_dict):
    two_stage_recipe_dict["train"]["lr_schedule"] = "linear"
    first, _ = resolve_stages(parse_recipe(two_stage_recipe_dict).train).stages
    assert [first.lr_factor(first.start + k) for k in range(first.steps)] == [
        1.0 - k / first.steps for k in range(first.steps)]
