"""Surface variants of candidates (gapcache.variants; extract.candidate_variants): rules and validation."""

import pytest

from gapcache.config import Config, validate
from gapcache.errors import ConfigError
from gapcache.variants import RULES, check_rules, surface_variants


def test_rules_make_the_documented_variants_in_order():
    assert surface_variants("yes", []) == ("yes",)
    assert surface_variants("yes", ["case"]) == ("yes", "Yes", "YES")
    assert surface_variants("yes", ["space"]) == ("yes", " yes")
    # the order of the rules in the config does not matter: RULES' order applies
    assert surface_variants("yes", ["space", "case"]) == surface_variants("yes", ["case", "space"]) == (
        "yes", "Yes", "YES", " yes", " Yes", " YES")
    assert surface_variants("A", ["case"]) == ("A", "a")  # duplicates made by a rule are kept once
    assert surface_variants("red car", ["case"]) == ("red car", "Red car", "RED CAR")
    assert list(RULES) == ["case", "space"]


@pytest.mark.parametrize("bad", ["case", ["Case"], ["case", "case"], [1]])
def test_bad_rules_are_a_config_error_naming_the_option(bad):
    with pytest.raises(ConfigError, match=r"The 'extract.candidate_variants' parameter"):
        check_rules(bad)
    cfg = Config()
    cfg.model.id, cfg.data.dataset = "some/model", "synthetic"
    validate(cfg)
    cfg.extract.candidate_variants = bad
    with pytest.raises(ConfigError, match=r"extract.candidate_variants"):
        validate(cfg)


def test_the_option_at_its_default_leaves_the_config_hash_alone():
    cfg = Config()
    before = cfg.hash()
    cfg.extract.candidate_variants = ["case"]
    assert cfg.hash() != before
    cfg.extract.candidate_variants = []
    assert cfg.hash() == before


def test_direct_io_is_a_run_option_outside_the_config_hash():
    """extract.direct_io says how shard files are written, not what is stored: a resume with it flipped is allowed."""
    cfg = Config()
    before = cfg.hash()
    cfg.extract.direct_io = False
    assert cfg.hash() == before
    cfg.model.id, cfg.data.dataset = "some/model", "synthetic"
    validate(cfg)
    cfg.extract.direct_io = "no"
    with pytest.raises(ConfigError, match=r"'extract.direct_io' parameter must be true or false"):
        validate(cfg)
