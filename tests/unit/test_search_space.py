"""Search-space entries → Ray Tune domains, and every way a space or a name can be wrong.

All of this runs before Ray starts: nothing here needs a Ray cluster.
"""

from __future__ import annotations

import pytest
from ray.tune.search import sample

from tuning_core.config import FASHION_SPACE, FLIGHTS_SPACE, ParamSpec, TuneConfig, build_config
from tuning_core.errors import ConfigError
from tuning_core.runner import validate
from tuning_core.schedulers import SCHEDULERS, create_scheduler, pbt_mutations
from tuning_core.search import SEARCHERS, build_space, create_searcher, edge_configs, to_domain


def spec(**kw) -> ParamSpec:
    return ParamSpec(**kw)


def tune_cfg(**kw) -> TuneConfig:
    return build_config(TuneConfig, kw)


# --------------------------------------------------------------------------- entry → domain


def test_uniform_maps_to_float_domain_with_uniform_sampler():
    d = to_domain("x", spec(type="uniform", low=0.5, high=1.0))
    assert isinstance(d, sample.Float)
    assert (d.lower, d.upper) == (0.5, 1.0)
    assert type(d.sampler).__name__ == "_Uniform"


def test_loguniform_maps_to_float_domain_with_log_sampler():
    d = to_domain("x", spec(type="loguniform", low=0.01, high=0.4))
    assert isinstance(d, sample.Float)
    assert (d.lower, d.upper) == (0.01, 0.4)
    assert type(d.sampler).__name__ == "_LogUniform"


def test_quniform_maps_to_quantized_uniform_float():
    d = to_domain("x", spec(type="quniform", low=0.0, high=1.0, q=0.25))
    assert isinstance(d, sample.Float)
    assert isinstance(d.sampler, sample.Quantized)
    assert d.sampler.q == 0.25
    assert type(d.sampler.sampler).__name__ == "_Uniform"
    values = {d.sample() for _ in range(50)}
    assert values <= {0.0, 0.25, 0.5, 0.75, 1.0}


def test_qloguniform_maps_to_quantized_log_float():
    d = to_domain("x", spec(type="qloguniform", low=1.0, high=64.0, q=1.0))
    assert isinstance(d, sample.Float)
    assert isinstance(d.sampler, sample.Quantized)
    assert type(d.sampler.sampler).__name__ == "_LogUniform"
    assert all(float(v).is_integer() and 1.0 <= v <= 64.0 for v in (d.sample() for _ in range(50)))


def test_randint_maps_to_integer_domain_excluding_high():
    d = to_domain("x", spec(type="randint", low=3, high=6))
    assert isinstance(d, sample.Integer)
    assert (d.lower, d.upper) == (3, 6)
    assert {d.sample() for _ in range(200)} == {3, 4, 5}


def test_choice_maps_to_categorical_with_the_same_values():
    d = to_domain("x", spec(type="choice", values=[32, 64, "wide"]))
    assert isinstance(d, sample.Categorical)
    assert list(d.categories) == [32, 64, "wide"]


def test_grid_maps_to_grid_search_dict():
    assert to_domain("x", spec(type="grid", values=[1, 2, 3])) == {"grid_search": [1, 2, 3]}


@pytest.mark.parametrize("constant", [3, 0.5, "hist", True])
def test_constants_pass_through_unchanged(constant):
    assert to_domain("x", constant) == constant


def test_every_param_type_is_covered_by_to_domain():
    from tuning_core.config import PARAM_TYPES

    examples = {
        "choice": spec(type="choice", values=[1]), "grid": spec(type="grid", values=[1]),
        "uniform": spec(type="uniform", low=0, high=1), "loguniform": spec(type="loguniform", low=1, high=2),
        "quniform": spec(type="quniform", low=0, high=1, q=0.5),
        "qloguniform": spec(type="qloguniform", low=1, high=8, q=1), "randint": spec(type="randint", low=0, high=3),
    }
    assert set(examples) == set(PARAM_TYPES)
    for name, s in examples.items():
        assert to_domain(name, s) is not None


def test_yaml_style_space_validates_into_param_specs_and_constants():
    cfg = tune_cfg(space={"eta": {"type": "loguniform", "low": 0.01, "high": 0.3}, "tree_method": "hist"})
    assert isinstance(cfg.space["eta"], ParamSpec)
    assert cfg.space["tree_method"] == "hist"
    space = build_space(cfg.space, cfg.search)
    assert isinstance(space["eta"], sample.Float)
    assert space["tree_method"] == "hist"


# --------------------------------------------------------------------------- invalid entries


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "normal", "low": 0, "high": 1}, "unknown type 'normal'"),
        ({"type": "uniform", "low": 1.0, "high": 1.0}, "low < high"),
        ({"type": "randint", "low": 5, "high": 2}, "low < high"),
        ({"type": "loguniform", "low": 0.0, "high": 1.0}, "low > 0"),
        ({"type": "qloguniform", "low": -1.0, "high": 1.0, "q": 0.1}, "low > 0"),
        ({"type": "choice", "values": []}, "non-empty 'values'"),
        ({"type": "grid"}, "non-empty 'values'"),
        ({"type": "quniform", "low": 0.0, "high": 1.0}, "q > 0"),
        ({"type": "uniform", "low": 0.0}, "needs 'low' and 'high'"),
    ],
    ids=["unknown-type", "low-eq-high", "randint-low-gt-high", "loguniform-zero", "qloguniform-negative",
         "empty-choice", "grid-without-values", "quniform-without-q", "missing-high"],
)
def test_invalid_space_entry_fails_with_one_line_config_error(entry, expected):
    with pytest.raises(ConfigError) as err:
        build_config(TuneConfig, {"space": {"eta": entry}})
    msg = str(err.value)
    assert "\n" not in msg
    assert "space.eta" in msg, msg
    assert expected in msg, msg


def test_unknown_key_in_an_entry_fails():
    with pytest.raises(ConfigError, match="space.eta"):
        build_config(TuneConfig, {"space": {"eta": {"type": "uniform", "low": 0, "high": 1, "step": 2}}})


def test_empty_space_fails():
    with pytest.raises(ConfigError, match="empty"):
        build_space({}, "random")


# --------------------------------------------------------------------------- names


def test_unknown_search_name_fails_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        build_config(TuneConfig, {"search": "bayesopt"})
    msg = str(err.value)
    assert "'bayesopt'" in msg
    assert all(name in msg for name in SEARCHERS)


def test_unknown_scheduler_name_fails_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        build_config(TuneConfig, {"scheduler": "pb2"})
    msg = str(err.value)
    assert "'pb2'" in msg
    assert all(name in msg for name in SCHEDULERS)


def test_factories_reject_unknown_names_that_bypassed_validation():
    # model_copy(update=...) does not validate: the registries must still fail loudly.
    cfg = tune_cfg()
    with pytest.raises(ConfigError, match=r"search: one of \['grid', 'hyperopt', 'optuna', 'random'\]"):
        create_searcher(cfg.model_copy(update={"search": "nope"}), {"x": 1})
    with pytest.raises(ConfigError, match=r"scheduler: one of \['asha', 'fifo', 'hyperband', 'median', 'pbt'\]"):
        create_scheduler(cfg.model_copy(update={"scheduler": "nope"}), {"x": 1})


@pytest.mark.parametrize("search", sorted(SEARCHERS))
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_registered_pair_builds_for_a_choice_space(search, scheduler):
    space = {"max_depth": spec(type="choice", values=[2, 3]), "eta": spec(type="uniform", low=0.1, high=0.3)}
    if search == "grid":
        space = {"max_depth": spec(type="grid", values=[2, 3])}
    if scheduler == "pbt" and search == "grid":
        cfg = tune_cfg(search=search, scheduler=scheduler,
                       scheduler_options={"hyperparam_mutations": {"max_depth": [2, 3]}})
    else:
        cfg = tune_cfg(search=search, scheduler=scheduler)
    assert validate(cfg, space)


# --------------------------------------------------------------------------- search/space compatibility


@pytest.mark.parametrize("search", ["hyperopt", "optuna"])
def test_grid_entries_are_rejected_for_model_based_searchers(search):
    space = {"max_depth": spec(type="grid", values=[2, 4]), "eta": spec(type="uniform", low=0.1, high=0.3)}
    with pytest.raises(ConfigError, match=rf"{search} cannot sample grid entries \['max_depth'\]"):
        validate(tune_cfg(search=search), space)


def test_grid_search_rejects_ranges():
    space = {"max_depth": spec(type="grid", values=[2, 4]), "eta": spec(type="uniform", low=0.1, high=0.3)}
    with pytest.raises(ConfigError, match=r"grid search needs grid/choice entries, got ranges for \['eta'\]"):
        validate(tune_cfg(search="grid"), space)


def test_grid_search_turns_choices_into_grid_axes():
    space = build_space({"max_depth": spec(type="choice", values=[2, 4]), "booster": "gbtree"}, "grid")
    assert space == {"max_depth": {"grid_search": [2, 4]}, "booster": "gbtree"}


def test_random_search_accepts_grid_entries():
    space = build_space({"max_depth": spec(type="grid", values=[2, 4]),
                         "eta": spec(type="uniform", low=0.1, high=0.3)}, "random")
    assert space["max_depth"] == {"grid_search": [2, 4]}


@pytest.mark.parametrize("search", ["random", "hyperopt", "optuna"])
def test_points_to_evaluate_with_unknown_keys_fail(search):
    cfg = tune_cfg(search=search, points_to_evaluate=[{"eta": 0.1, "max_dept": 3}])
    space = {"eta": spec(type="uniform", low=0.01, high=0.3), "max_depth": spec(type="randint", low=2, high=6)}
    with pytest.raises(ConfigError, match=r"points_to_evaluate: keys \['max_dept'\] are not in the search space"):
        validate(cfg, space)


def test_points_to_evaluate_with_known_keys_are_accepted():
    cfg = tune_cfg(search="hyperopt", points_to_evaluate=[{"eta": 0.1, "max_depth": 3}])
    space = {"eta": spec(type="uniform", low=0.01, high=0.3), "max_depth": spec(type="randint", low=2, high=6)}
    assert set(validate(cfg, space)) == {"eta", "max_depth"}


# --------------------------------------------------------------------------- pbt


def test_pbt_without_float_ranges_fails_naming_the_option():
    space = {"max_depth": spec(type="randint", low=2, high=6), "booster": spec(type="choice", values=["gbtree"])}
    with pytest.raises(ConfigError, match="no float range.*scheduler_options.hyperparam_mutations"):
        validate(tune_cfg(search="random", scheduler="pbt"), space)


def test_pbt_mutates_the_float_ranges_by_default():
    space = {"eta": spec(type="loguniform", low=0.01, high=0.3), "subsample": spec(type="uniform", low=0.5, high=1),
             "max_depth": spec(type="randint", low=2, high=6), "tree_method": "hist"}
    assert sorted(pbt_mutations(tune_cfg(scheduler="pbt"), space)) == ["eta", "subsample"]


def test_pbt_explicit_mutations_win_over_the_space():
    cfg = tune_cfg(scheduler="pbt", scheduler_options={"hyperparam_mutations": {
        "max_depth": [2, 3, 4], "eta": {"type": "uniform", "low": 0.05, "high": 0.2}}})
    muts = pbt_mutations(cfg, {"max_depth": spec(type="randint", low=2, high=6)})
    assert muts["max_depth"] == [2, 3, 4]
    assert isinstance(muts["eta"], sample.Float)


def test_pbt_perturbations_stay_inside_the_configured_ranges():
    # Ray's own explore step (x0.8 / x1.2, no resampling), as the scheduler runs it.
    from ray.tune.schedulers.pbt import _explore

    space = {"subsample": spec(type="uniform", low=0.5, high=1.0), "eta": spec(type="loguniform", low=0.01, high=0.3)}
    cfg = tune_cfg(scheduler="pbt", scheduler_options={"hyperparam_mutations": {
        "subsample": {"type": "uniform", "low": 0.5, "high": 1.0},
        "max_depth": {"type": "randint", "low": 2, "high": 6}}})
    for c in (tune_cfg(scheduler="pbt"), cfg):
        scheduler = create_scheduler(c, space)
        config = {"subsample": 0.95, "eta": 0.29, "max_depth": 5}
        for _ in range(40):
            new, _ = _explore(config, scheduler._hyperparam_mutations, 0.0, (1.2, 0.8),
                              scheduler._custom_explore_fn)
            assert 0.5 <= new["subsample"] <= 1.0
            assert 0.01 <= new["eta"] <= 0.3
            assert 2 <= new["max_depth"] <= 5 and isinstance(new["max_depth"], int)


# --------------------------------------------------------------------------- the trainables' own checks of a space


def test_edge_configs_take_each_end_of_every_range_and_each_choice_once():
    space = {"a": spec(type="uniform", low=0.1, high=0.9), "n": spec(type="randint", low=3, high=11),
             "m": spec(type="choice", values=["x", "y", "z", "w"]), "c": 7}
    edges = dict(edge_configs(space))
    assert edges["every entry at its low end"] == {"a": 0.1, "n": 3, "m": "x", "c": 7}
    # randint excludes its high bound, as Ray's does.
    assert edges["every entry at its high end"] == {"a": 0.9, "n": 10, "m": "w", "c": 7}
    assert edges["m='y'"] == {"a": 0.1, "n": 3, "m": "y", "c": 7}
    assert edges["m='z'"]["m"] == "z" and len(edges) == 4


@pytest.mark.parametrize(("workload", "space"), [("flights", FLIGHTS_SPACE), ("fashion", FASHION_SPACE)])
def test_the_default_spaces_pass_their_trainables_checks(workload, space):
    if workload == "flights":
        from tuning_core.trainables.xgboost import check_config as check
    else:
        pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)
        from tuning_core.trainables.torch import check_config as check

    for where, config in edge_configs(space):
        check(config, where)


@pytest.mark.parametrize(("config", "expected"), [
    ({"max_dpth": 3}, "'max_dpth' (did you mean 'max_depth'?)"),
    ({"max_depth": -2}, "xgboost refuses it: value -2 for Parameter max_depth should be greater equal to 0"),
    ({"colsample_bytree": 1.5}, "value 1.5 for Parameter colsample_bytree exceed bound [0,1]"),
    ({"max_depth": "deep"}, "max_depth: expected a whole number, got 'deep'"),
])
def test_xgboost_check_names_what_xgboost_would_ignore_or_refuse(config, expected):
    from tuning_core.trainables.xgboost import check_config

    with pytest.raises(ConfigError) as err:
        check_config(config, "here")
    assert str(err.value).startswith("search space (here): ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_xgboost_check_accepts_a_parameter_that_only_some_choices_use():
    from tuning_core.trainables.xgboost import check_configs

    # rate_drop is unused by gbtree but used by dart: a legitimate conditional parameter.
    check_configs(edge_configs({"booster": spec(type="choice", values=["gbtree", "dart"]), "rate_drop": 0.1}))
    with pytest.raises(ConfigError, match=r"ignore these in every trial .*'rate_drop'"):
        check_configs(edge_configs({"booster": "gbtree", "rate_drop": 0.1}))


@pytest.mark.parametrize(("config", "expected"), [
    ({"widht": 32}, "['widht'] are not parameters of the torch trainable"),
    ({"model": "vgg"}, "model: one of ['cnn', 'resnet18'], got 'vgg'"),
    ({"lr": -0.1}, "Invalid learning rate: -0.1"),
    ({"batch_size": 0}, "batch_size: expected >= 1, got 0"),
    ({"batch_size": 32.5}, "batch_size: expected a whole number, got 32.5"),
    ({"momentum": "high"}, "momentum: expected a number, got 'high'"),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
    ({"precision": "fp16"}, "precision: one of ['fp32', 'bf16'], got 'fp16'"),
])
def test_torch_check_names_what_the_trainable_would_ignore_or_refuse(config, expected):
    pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)
    from tuning_core.trainables.torch import check_config

    with pytest.raises(ConfigError) as err:
        check_config(config)
    assert str(err.value).startswith("search space: ") and expected in str(err.value)
