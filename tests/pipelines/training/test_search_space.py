"""`--search` specs: parsed to known values, checked against the config's fields, mapped to Ray Tune's spaces."""

from __future__ import annotations

import pytest

from mrcnn.config import load_config
from pipelines.data.errors import InputError
from pipelines.training.search_space import (
    SearchSpec,
    SearchSpecError,
    parse_searches,
    parse_spec,
    trial_config,
)

SHAPES = load_config("shapes", [])


@pytest.mark.parametrize(("text", "expected"), [
    ("train.lr=loguniform(1e-4,1e-2)", SearchSpec("train.lr", "loguniform", (0.0001, 0.01))),
    (" train.lr = uniform( 0.001 , 0.01 ) ", SearchSpec("train.lr", "uniform", (0.001, 0.01))),
    ("roi.rois_per_image=choice(32,64,128)", SearchSpec("roi.rois_per_image", "choice", (32, 64, 128))),
    ("train.optimizer=grid(sgd, 'adamw')", SearchSpec("train.optimizer", "grid", ("sgd", "adamw"))),
    ("train.flip=choice(true,false)", SearchSpec("train.flip", "choice", (True, False))),
    ("train.batch_size=randint(1,5)", SearchSpec("train.batch_size", "randint", (1, 5))),
    ("train.lr=uniform(1,2)", SearchSpec("train.lr", "uniform", (1.0, 2.0))),  # floats, as the field holds
])
def test_specs_parse_to_their_values(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("train.lr", "expected section.field=kind(args)"),
    ("train.lr=loguniform 1e-4,1e-2", "expected section.field=kind(args)"),
    ("train.lr=normal(0,1)", "unknown kind 'normal'"),
    ("train.lr=choice()", "choice needs at least one value"),
    ("train.lr=uniform(0.1)", "uniform takes two numbers"),
    ("train.lr=uniform(a,b)", "uniform takes two numbers"),
    ("train.lr=uniform(0.1,0.01)", "lo 0.1 must be below hi 0.01"),
    ("train.lr=loguniform(0,0.1)", "loguniform needs lo above 0"),
    ("train.batch_size=randint(1.5,4)", "randint takes two integers"),
])
def test_bad_syntax_is_refused_naming_the_spec(text, words):
    with pytest.raises(SearchSpecError) as err:
        parse_spec(text)
    assert words in str(err.value) and "--search" in str(err.value)
    assert isinstance(err.value, InputError)  # the CLI's short message, exit 2


@pytest.mark.parametrize(("text", "words"), [
    ("train.lrr=uniform(0.1,0.2)", "unknown config key 'train.lrr'"),
    ("nope.lr=uniform(0.1,0.2)", "unknown config key 'nope.lr'"),
    ("train.lr=uniform(-0.1,0.2)", "'train.lr': -0.1 is out of range (must be > 0)"),  # the lower bound
    ("train.momentum=uniform(0.5,1.0)", "'train.momentum': 1.0 is out of range (must be in [0, 1))"),  # the upper
    ("train.batch_size=randint(0,4)", "'train.batch_size': 0 is out of range (must be >= 1)"),
    ("roi.rois_per_image=choice(32,0,128)", "'roi.rois_per_image': 0 is out of range"),  # one bad choice of three
    ("train.optimizer=choice(sgd,adam)", "'train.optimizer': 'adam' is not one of 'sgd', 'adamw'"),
    ("train.batch_size=uniform(1,4)", "train.batch_size is not a float setting"),
    ("train.lr=randint(1,4)", "train.lr is not an integer setting"),
    ("rpn.anchor_scales=choice(1,2)", "searching lists is not supported"),
    ("roi.rois_per_image=choice(32,sixty)", "expected an integer, got 'sixty'"),
])
def test_keys_and_values_are_checked_against_the_config(text, words):
    with pytest.raises(SearchSpecError) as err:
        parse_searches([text], SHAPES)
    assert words in str(err.value), str(err.value)


def test_randint_high_bound_is_excluded():
    """randint(lo, hi) draws lo..hi-1 (Ray's meaning): trial_values never include hi, so hi itself may be out of
    range (train.trainable_layers is in [0, 5]: randint(0, 6) is every allowed value)."""
    specs = parse_searches(["backbone.trainable_layers=randint(0,6)"], SHAPES)
    assert specs["backbone.trainable_layers"].candidates() == (0, 5)
    with pytest.raises(SearchSpecError, match="6 is out of range"):
        parse_searches(["backbone.trainable_layers=randint(0,7)"], SHAPES)


def test_a_key_searched_twice_and_no_search_are_refused():
    with pytest.raises(SearchSpecError, match="train.lr is searched twice"):
        parse_searches(["train.lr=uniform(0.1,0.2)", "train.lr=choice(0.1)"], SHAPES)
    with pytest.raises(SearchSpecError, match="give at least one"):
        parse_searches([], SHAPES)


def test_specs_become_ray_tune_spaces_that_sample_inside_their_bounds():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    specs = parse_searches(["train.lr=loguniform(1e-4,1e-2)", "roi.rois_per_image=choice(32,64,128)",
                            "train.batch_size=randint(1,3)", "train.optimizer=grid(sgd,adamw)"], SHAPES)
    spaces = {k: s.to_tune() for k, s in specs.items()}
    lr, rois, batch = spaces["train.lr"], spaces["roi.rois_per_image"], spaces["train.batch_size"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.get_sampler(), Float._LogUniform)
    assert isinstance(rois, Categorical) and rois.categories == [32, 64, 128]
    assert isinstance(batch, Integer) and (batch.lower, batch.upper) == (1, 3)
    assert spaces["train.optimizer"] == tune.grid_search(["sgd", "adamw"])
    drawn = lr.sample(size=200)
    assert all(1e-4 <= v < 1e-2 for v in drawn)
    assert set(batch.sample(size=200)) == {1, 2}  # hi excluded


def test_trial_config_applies_sampled_values_through_the_config_checks():
    import numpy as np

    config = trial_config(SHAPES, {"train.lr": np.float64(0.003), "roi.rois_per_image": np.int64(64)})
    assert config.train.lr == 0.003 and type(config.train.lr) is float
    assert config.roi.rois_per_image == 64 and type(config.roi.rois_per_image) is int
    assert config.train.momentum == SHAPES.train.momentum  # the rest as the base config says
