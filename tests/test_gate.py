"""Gate rules on crafted reports: thresholds, clean accuracy, baseline drops, censoring both ways, site matching."""

from __future__ import annotations

import math

import pytest

from walkaudit.errors import UsageError
from walkaudit.report import Report
from walkaudit.report.gate import (
    Drop,
    Failure,
    GateConfig,
    GateResult,
    Threshold,
    check_comparable,
    evaluate,
    load_rules,
    parse_drop,
    parse_rule,
)

try:
    from tests import reports
    from tests.reports import make_degenerate_site, make_site, typed
except ImportError:  # tests/ on sys.path instead of the repository root
    import reports
    from reports import make_degenerate_site, make_site, typed


def make_report(*args, **kwargs) -> Report:
    return typed(reports.make_report(*args, **kwargs))


def make_global_report(*args, **kwargs) -> Report:
    return typed(reports.make_global_report(*args, **kwargs))


def rules(*thresholds, min_clean_accuracy=None, max_drop=None) -> GateConfig:
    return GateConfig(thresholds=tuple(thresholds), min_clean_accuracy=min_clean_accuracy,
                      max_drop=None if max_drop is None else parse_drop(max_drop))


def failed_sites(result: GateResult) -> list[str | None]:
    return [f.site for f in result.failures]


# --- parsing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("conv.*:0.05", Threshold("conv.*", 0.05, False)),
    ("0.05", Threshold(None, 0.05, False)),
    (":0.05", Threshold(None, 0.05, False)),
    ("*:1e-3", Threshold(None, 0.001, False)),
    ("dense/BiasAdd:0:0.2", Threshold("dense/BiasAdd:0", 0.2, False)),
    ("fc.*:0.5rel", Threshold("fc.*", 0.5, True)),
])
def test_parse_rule(text, expected):
    assert parse_rule(text) == expected


def test_parse_rule_relative_flag():
    assert parse_rule("conv:0.3", relative=True) == Threshold("conv", 0.3, True)


@pytest.mark.parametrize("text", ["conv:", "conv:abc", "conv:-1", "(:0.1", "conv:0.1x"])
def test_parse_rule_rejects(text):
    with pytest.raises(UsageError):
        parse_rule(text)


@pytest.mark.parametrize("text, amount, unit", [
    ("20%", 20.0, "%"), (" 12.5 % ", 12.5, "%"), ("0.3dec", 0.3, "dec"), ("0.3", 0.3, "dec"),
    ("1decades", 1.0, "dec"), (0.25, 0.25, "dec"),
])
def test_parse_drop(text, amount, unit):
    assert parse_drop(text) == Drop(amount, unit)


@pytest.mark.parametrize("text", ["", "-5%", "150%", "0.3x", "abc", True])
def test_parse_drop_rejects(text):
    with pytest.raises(UsageError):
        parse_drop(text)


def test_drop_measure():
    assert Drop(20, "%").measure(0.1, 0.05) == pytest.approx(50.0)
    assert Drop(0.3, "dec").measure(1.0, 0.1) == pytest.approx(1.0)
    assert Drop(0.3, "dec").measure(0.1, 1.0) == pytest.approx(-1.0)  # improvement
    assert Drop(20, "%").measure(0.1, math.inf) == -math.inf
    assert Drop(20, "%").measure(0.0, 0.1) == -math.inf


def test_min_clean_accuracy_must_be_a_fraction():
    with pytest.raises(UsageError, match="fraction"):
        GateConfig(min_clean_accuracy=90)


def test_load_rules(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        'min_clean_accuracy = 0.85\nmax_drop = "20%"\nfail_under = 0.001\n'
        '[[rule]]\npattern = "conv.*"\nfail_under = 0.05\nfail_under_relative = 0.5\n'
        '[[rule]]\npattern = "*"\nfail_under_relative = 0.1\n'
    )
    config = load_rules(path)
    assert config.min_clean_accuracy == 0.85
    assert config.max_drop == Drop(20.0, "%")
    assert config.thresholds == (
        Threshold(None, 0.001, False),
        Threshold("conv.*", 0.05, False),
        Threshold("conv.*", 0.5, True),
        Threshold(None, 0.1, True),
    )


def test_load_rules_bare_max_drop_is_decades(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("max_drop = 0.3\n")
    assert load_rules(path).max_drop == Drop(0.3, "dec")


@pytest.mark.parametrize("text, fragment", [
    ("fail_undr = 0.1\n", "unknown key"),
    ("[[rule]]\npattern = 'conv'\n", "needs fail_under"),
    ("[[rule]]\npattern = 'conv'\nfail_under = 'x'\n", "must be a number"),
    ("[[rule]]\npattern = '('\nfail_under = 0.1\n", "invalid site pattern"),
    ("[[rule]]\nfail_under = 0.1\nsite = 'x'\n", "unknown key"),
    ("max_drop = '20'\nmax_drop = '5%'\n", "invalid TOML"),
    ("min_clean_accuracy = 1.5\n", "fraction"),
])
def test_load_rules_errors_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=fragment) as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_load_rules_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_rules(tmp_path / "nope.toml")


def test_merge_cli_overrides_file():
    file_cfg = rules(Threshold("conv", 0.1, False), min_clean_accuracy=0.8, max_drop="20%")
    cli_cfg = rules(Threshold(None, 0.01, False), min_clean_accuracy=0.9)
    merged = file_cfg.merge(cli_cfg)
    assert merged.thresholds == (Threshold("conv", 0.1, False), Threshold(None, 0.01, False))
    assert merged.min_clean_accuracy == 0.9
    assert merged.max_drop == Drop(20.0, "%")


# --- fail-under ---------------------------------------------------------------------------------------------------

def test_empty_config_says_no_gate():
    result = evaluate(make_report(), GateConfig())
    assert result.passed and result.exit_code == 0 and bool(result)
    assert result.to_dict() == {"passed": True, "verdict": "no gate", "failures": [], "warnings": []}


def test_a_partial_report_is_incomplete_never_passed():
    partial = make_report(partial=True)
    for config in (GateConfig(), rules(Threshold(None, 0.01, False))):
        result = evaluate(partial, config)
        assert result.passed is None and result.decision == "incomplete" and result.exit_code == 1
        assert result.to_dict()["passed"] is None
    failing = evaluate(partial, rules(Threshold(None, 0.08, False)))  # what was found so far is still listed
    assert failing.decision == "incomplete" and failed_sites(failing) == ["conv2"]


def test_fail_under_all_sites():
    # sites: conv1 0.1, conv2 0.05, fc 1.0
    result = evaluate(make_report(), rules(Threshold(None, 0.08, False)))
    assert not result.passed and result.exit_code == 1
    assert failed_sites(result) == ["conv2"]
    failure = result.failures[0]
    assert failure.rule == "fail_under"
    assert failure.value == pytest.approx(0.05) and failure.threshold == 0.08
    assert "0.05" in failure.message and "0.08" in failure.message


def test_fail_under_passes_from_the_lower_end_of_the_interval():
    # conv2: σ50 0.05, 95% CI 0.0475–0.0525
    assert evaluate(make_report(), rules(Threshold(None, 0.0475, False))).decision == "passed"
    for limit in (0.048, 0.05, 0.0525):  # inside the interval: neither shown above nor below
        result = evaluate(make_report(), rules(Threshold(None, limit, False)))
        assert result.decision == "undecided" and not result.passed and result.exit_code == 1
        assert result.failures == [] and [u.site for u in result.undecided] == ["conv2"]
        assert "straddles" in result.undecided[0].message and "0.0475–0.0525" in result.undecided[0].message
    assert failed_sites(evaluate(make_report(), rules(Threshold(None, 0.053, False)))) == ["conv2"]


def test_undecided_passes_only_when_the_user_says_so():
    config = rules(Threshold(None, 0.05, False))
    result = evaluate(make_report(), config, undecided="pass")
    assert result.passed and result.exit_code == 0 and result.decision == "undecided"
    assert [u.site for u in result.undecided] == ["conv2"]
    assert any("--undecided pass" in w for w in result.warnings)
    assert result.to_dict()["undecided"][0]["site"] == "conv2"
    with pytest.raises(UsageError, match="--undecided"):
        evaluate(make_report(), config, undecided="maybe")


def test_fail_under_pattern_selects_sites():
    config = rules(Threshold("^fc$", 2.0, False))
    result = evaluate(make_report(), config)
    assert failed_sites(result) == ["fc"]


def test_rules_combine_and_every_failure_is_reported():
    config = rules(Threshold(None, 0.2, False), Threshold("fc", 5.0, False), min_clean_accuracy=0.95)
    result = evaluate(make_report(), config)
    assert sorted((f.rule, f.site or "") for f in result.failures) == [
        ("fail_under", "conv1"), ("fail_under", "conv2"), ("fail_under", "fc"), ("min_clean_accuracy", ""),
    ]


def test_a_rule_matching_no_site_is_an_error_unless_allowed():
    with pytest.raises(UsageError, match=r"rule attention:0.1 matches no site .*--allow-unmatched"):
        evaluate(make_report(), rules(Threshold("attention", 0.1, False)))
    result = evaluate(make_report(), rules(Threshold("attention", 0.1, False)), allow_unmatched=True)
    assert result.passed
    assert any("matches no site" in w for w in result.warnings)
    # a partial report or one shard lacks sites by design: a warning
    for report in (make_report(partial=True), typed({**reports.make_report(),
                                                     "config": {**reports.make_report()["config"], "shard": [1, 2]}})):
        assert any("matches no site" in w for w in evaluate(report, rules(Threshold("attention", 0.1))).warnings)


def test_fail_under_relative_uses_activation_std():
    sites = [make_site("a", 0.1, index=0, activation_std=0.5),  # relative 0.2
             make_site("b", 0.1, index=1, activation_std=0.1)]  # relative 1.0
    result = evaluate(make_report(sites), rules(Threshold(None, 0.5, True)))
    assert failed_sites(result) == ["a"]
    assert result.failures[0].rule == "fail_under_relative"
    assert result.failures[0].value == pytest.approx(0.2)


def test_relative_rule_without_activation_std_warns_in_global_mode():
    result = evaluate(make_global_report(0.2), rules(Threshold(None, 0.5, True)))
    assert result.passed
    assert any("global" in w and "activation std" in w for w in result.warnings)


def test_global_mode_absolute_threshold():
    result = evaluate(make_global_report(0.2), rules(Threshold(None, 0.5, False)))
    assert failed_sites(result) == ["global"]


def test_site_without_midpoint_warns():
    report = make_report([make_site("x", None)])
    result = evaluate(report, rules(Threshold(None, 0.1, False)))
    assert result.passed
    assert any("x" in w and "no σ50" in w for w in result.warnings)


# --- censoring vs thresholds --------------------------------------------------------------------------------------

def test_censored_above_with_bound_at_or_over_threshold_passes_silently():
    report = make_report([make_site("s", 10.0, censored="above")])
    result = evaluate(report, rules(Threshold(None, 10.0, False)))
    assert result.passed and result.warnings == []


def test_censored_above_with_bound_under_threshold_is_undecided():
    report = make_report([make_site("s", 1.0, censored="above")])
    result = evaluate(report, rules(Threshold(None, 5.0, False)))
    assert result.decision == "undecided" and not result.passed
    assert len(result.undecided) == 1 and "extend the grid up" in result.undecided[0].message


def test_censored_below_with_bound_at_or_under_threshold_fails():
    report = make_report([make_site("s", 0.01, censored="below")])
    result = evaluate(report, rules(Threshold(None, 0.01, False)))
    assert failed_sites(result) == ["s"]
    assert "< 0.01" in result.failures[0].message


def test_censored_below_with_bound_over_threshold_is_undecided():
    report = make_report([make_site("s", 0.5, censored="below")])
    result = evaluate(report, rules(Threshold(None, 0.1, False)))
    assert result.failures == [] and [u.site for u in result.undecided] == ["s"]
    assert "extend the grid down" in result.undecided[0].message


# --- clean accuracy -----------------------------------------------------------------------------------------------

def test_min_clean_accuracy_is_decided_on_its_wilson_interval():
    report = make_report(clean_accuracy=0.8)  # 400 of 500: 95% Wilson interval 0.7627–0.8327
    assert evaluate(report, rules(min_clean_accuracy=0.76)).decision == "passed"
    undecided = evaluate(report, rules(min_clean_accuracy=0.8))
    assert undecided.decision == "undecided" and undecided.undecided[0].rule == "min_clean_accuracy"
    assert "0.7627–0.8327" in undecided.undecided[0].message
    result = evaluate(report, rules(min_clean_accuracy=0.85))
    assert [(f.rule, f.site, f.value, f.threshold) for f in result.failures] == [
        ("min_clean_accuracy", None, 0.8, 0.85)]


# --- baseline -----------------------------------------------------------------------------------------------------

def test_baseline_identical_passes():
    assert evaluate(make_report(), rules(max_drop="20%"), baseline=make_report()).passed


def test_baseline_percent_drop_fails_with_numbers():
    new = make_report([make_site("conv1", 0.05, index=0), make_site("conv2", 0.05, index=1),
                       make_site("fc", 1.0, index=2, op_type="Gemm")])
    result = evaluate(new, rules(max_drop="20%"), baseline=make_report())
    assert failed_sites(result) == ["conv1"]
    failure = result.failures[0]
    assert failure.rule == "max_drop" and failure.threshold == 20.0
    assert failure.value == pytest.approx(50.0)
    assert "0.1" in failure.message and "0.05" in failure.message


def test_baseline_small_drop_passes():
    new = make_report([make_site("conv1", 0.09, index=0, ci95=[0.089, 0.091])])
    old = make_report([make_site("conv1", 0.1, index=0, ci95=[0.099, 0.101])])
    assert evaluate(new, rules(max_drop="20%"), baseline=old).passed  # 10% < 20%
    assert not evaluate(new, rules(max_drop="5%"), baseline=old).passed


def test_baseline_decades():
    old = make_report([make_site("a", 1.0, index=0, ci95=[0.99, 1.01])])
    new = make_report([make_site("a", 0.25, index=0, ci95=[0.24, 0.26])])  # ~0.6 decades
    assert not evaluate(new, rules(max_drop="0.3dec"), baseline=old).passed
    assert evaluate(new, rules(max_drop="0.7"), baseline=old).passed


def test_baseline_drop_within_confidence_intervals_is_undecided():
    old = make_report([make_site("a", 0.1, index=0, ci95=[0.07, 0.14])])
    new = make_report([make_site("a", 0.075, index=0, ci95=[0.05, 0.11])])  # 25% at face value
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.decision == "undecided" and result.failures == []
    assert "up to 55.7% at the end of its 95% interval" in result.undecided[0].message
    assert evaluate(new, rules(max_drop="20%"), baseline=old, undecided="pass").passed


def test_baseline_drop_passes_only_where_the_upper_end_of_its_interval_is_within():
    # the fall's interval adds both sides' half-widths in quadrature: log10(1.05) and log10(1/0.95) make
    # 0.0307 decades, 6.82%
    old = make_report([make_site("a", 0.1, index=0, ci95=[0.095, 0.105])])
    new = make_report([make_site("a", 0.1, index=0, ci95=[0.095, 0.105])])
    assert evaluate(new, rules(max_drop="7%"), baseline=old).decision == "passed"
    assert evaluate(new, rules(max_drop="6.5%"), baseline=old).decision == "undecided"
    assert evaluate(new, rules(max_drop="0.031dec"), baseline=old).decision == "passed"
    assert evaluate(new, rules(max_drop="0.03dec"), baseline=old).decision == "undecided"


def test_improvement_never_fails():
    old = make_report([make_site("a", 0.1, index=0)])
    new = make_report([make_site("a", 0.5, index=0)])
    result = evaluate(new, rules(max_drop="0%"), baseline=old)
    assert result.passed and result.warnings == []


def test_new_censored_above_is_not_a_regression():
    old = make_report([make_site("a", 0.5, index=0)])
    new = make_report([make_site("a", 1.0, index=0, censored="above")])
    assert evaluate(new, rules(max_drop="20%"), baseline=old).passed


def test_new_censored_above_with_narrower_grid_is_undecided_not_failed():
    # new grid stops at 0.1; baseline measured σ50 = 1: the new σ50 is > 0.1, unknown beyond
    old = make_report([make_site("a", 1.0, index=0)])
    new = make_report([make_site("a", 0.1, index=0, censored="above")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.failures == [] and result.decision == "undecided"
    assert "censored" in result.undecided[0].message


def test_both_censored_above_same_bound_is_undecided():
    # neither σ50 is known beyond the grid's top: a fall beyond it can be neither shown nor ruled out
    old = make_report([make_site("a", 1.0, index=0, censored="above")])
    new = make_report([make_site("a", 1.0, index=0, censored="above")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.failures == [] and result.decision == "undecided" and result.warnings == []


def test_new_censored_below_far_under_baseline_fails():
    old = make_report([make_site("a", 0.1, index=0)])
    new = make_report([make_site("a", 0.01, index=0, censored="below")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert failed_sites(result) == ["a"]
    assert result.failures[0].value >= 89.0
    assert "< 0.01" in result.failures[0].message


def test_old_censored_above_new_measured_far_below_fails():
    old = make_report([make_site("a", 1.0, index=0, censored="above")])
    new = make_report([make_site("a", 0.1, index=0, ci95=[0.09, 0.11])])
    assert failed_sites(evaluate(new, rules(max_drop="20%"), baseline=old)) == ["a"]


def test_old_censored_below_cannot_regress():
    old = make_report([make_site("a", 0.1, index=0, censored="below")])
    new = make_report([make_site("a", 0.01, index=0, censored="below")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.failures == []
    assert "censored" in result.undecided[0].message


def test_sites_matched_by_name_not_position():
    old = make_report([make_site("a", 0.1, index=0), make_site("b", 1.0, index=1)])
    new = make_report([make_site("b", 1.0, index=0), make_site("a", 0.1, index=1)])
    result = evaluate(new, rules(max_drop="10%"), baseline=old)
    assert result.passed and result.warnings == []


def test_renamed_sites_fall_back_to_index_with_warning():
    old = make_report([make_site("/conv1/Conv_output_0", 0.1, index=0)])
    new = make_report([make_site("onnx::Conv_12", 0.05, index=0)])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert failed_sites(result) == ["onnx::Conv_12"]
    assert any("by index 0" in w and "/conv1/Conv_output_0" in w for w in result.warnings)


def test_index_fallback_requires_same_op_type():
    old = make_report([make_site("x", 0.1, index=0, op_type="Conv")])
    new = make_report([make_site("y", 0.01, index=0, op_type="Gemm")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.passed
    assert any("y" in w and "not in the baseline" in w for w in result.warnings)
    assert any("baseline site x" in w and "missing" in w for w in result.warnings)


def test_site_only_in_one_report_warns():
    old = make_report()
    new = make_report([make_site("conv1", 0.1, index=0), make_site("conv2", 0.05, index=1),
                       make_site("extra", 0.5, index=None)])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert result.passed
    assert any("extra" in w and "not in the baseline" in w for w in result.warnings)
    assert any("baseline site fc" in w and "missing" in w for w in result.warnings)


@pytest.mark.parametrize("change", [{"noise": "multiplicative"}, {"mode": "global"}])
def test_baseline_with_other_noise_or_mode_is_refused(change):
    old = make_report()
    new = make_report(**change)
    with pytest.raises(UsageError, match="cannot compare"):
        evaluate(new, rules(max_drop="20%"), baseline=old)


def test_combined_noise_with_other_ratio_is_refused():
    with pytest.raises(UsageError, match="ratio"):
        check_comparable(make_report(noise="combined", ratio=0.2), make_report(noise="combined", ratio=0.5))
    assert check_comparable(make_report(noise="combined", ratio=0.5), make_report(noise="combined", ratio=0.5)) == []


def test_check_comparable_warns_on_other_data():
    assert check_comparable(make_report(), make_report()) == []
    warnings = check_comparable(make_report(data_sha256="ab" * 32), make_report(data_sha256="cd" * 32))
    assert any("other data" in w for w in warnings)


def test_a_baseline_without_max_drop_is_not_the_gates_warning():
    """The gate compares nothing without a max drop and says nothing: `compare` shows the baseline beside the report,
    and the audit warns before it starts (tests/test_cli.py)."""
    result = evaluate(make_report(), GateConfig(), baseline=make_report())
    assert result.passed and not result.warnings


def test_max_drop_without_baseline_warns():
    result = evaluate(make_report(), rules(max_drop="20%"))
    assert result.passed and any("no baseline" in w for w in result.warnings)


def test_partial_report_warns():
    result = evaluate(make_report(partial=True), GateConfig())
    assert any("partial" in w for w in result.warnings)


def test_unknown_report_version_is_refused():
    report = reports.make_report()
    report["schema"] = "walkaudit.report/2"
    with pytest.raises(UsageError, match="newer"):
        typed(report)


def test_result_to_dict_matches_report_gate_shape():
    result = evaluate(make_report(), rules(Threshold(None, 0.08, False)))
    data = result.to_dict()
    assert data["passed"] is False
    assert data["failures"] == [{"rule": "fail_under", "site": "conv2", "value": pytest.approx(0.05),
                                 "threshold": 0.08, "message": result.failures[0].message}]
    assert isinstance(data["warnings"], list)


def test_failure_to_dict_writes_non_finite_as_null():
    failure = Failure("max_drop", "a", math.inf, 20.0, "m")
    assert failure.to_dict()["value"] is None


def test_censored_drop_is_reported_as_a_lower_bound():
    old = make_report([make_site("a", 0.2, index=0, censored="above")])
    new = make_report([make_site("a", 0.05, index=0, censored="below")])
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert failed_sites(result) == ["a"]
    assert "more than 75%" in result.failures[0].message
    assert result.failures[0].value == pytest.approx(75.0)


def test_max_drop_failures_follow_the_new_report_order():
    old = make_report([make_site("a", 1.0, index=0), make_site("b", 1.0, index=1)])
    new = make_report([make_site("renamed", 0.1, index=0), make_site("b", 0.1, index=1)])
    assert failed_sites(evaluate(new, rules(max_drop="20%"), baseline=old)) == ["renamed", "b"]


# --- sites without σ50, models at chance, names in messages ---------------------------------------------------------

def test_site_whose_fit_found_no_midpoint_fails_a_threshold():
    report = make_report([make_degenerate_site("flat", 10.0), make_site("ok", 1.0, index=1)])
    result = evaluate(report, rules(Threshold(None, 0.1, False)))
    assert failed_sites(result) == ["flat"]
    failure = result.failures[0]
    assert failure.value is None and failure.threshold == 0.1
    assert failure.message.startswith("site flat: no σ50 (") and "cannot be shown" in failure.message


def test_site_whose_fit_found_no_midpoint_is_never_the_weakest_or_robust_against_a_baseline():
    old = make_report([make_site("a", 0.1, index=0)])
    new = make_report([make_degenerate_site("a", 10.0)])
    assert new.weakest is None
    result = evaluate(new, rules(max_drop="20%"), baseline=old)
    assert failed_sites(result) == ["a"]
    assert result.failures[0].rule == "max_drop" and "no σ50 in this report" in result.failures[0].message


@pytest.mark.parametrize("config", [
    rules(Threshold(None, 0.5, False)), rules(min_clean_accuracy=0.0), rules(Threshold("nothing", 1.0, True))])
def test_clean_accuracy_not_above_chance_fails_any_gate(config):
    report = make_report([make_degenerate_site("conv1", 10.0)], clean_accuracy=0.0)
    result = evaluate(report, config)
    assert not result.passed
    chance = [f for f in result.failures if f.rule == "above_chance"]
    assert len(chance) == 1 and chance[0].site is None
    assert chance[0].message == ("clean accuracy 0 is not above chance 0.1: the model does not classify these data, "
                                 "so no σ50 means anything")


def test_clean_accuracy_not_above_chance_without_rules_passes():
    assert evaluate(make_report(clean_accuracy=0.1), GateConfig()).passed


def test_healthy_to_broken_fails_a_max_drop():
    broken = make_report([make_degenerate_site("conv1", 10.0, index=0), make_degenerate_site("conv2", 10.0, index=1),
                          make_degenerate_site("fc", 10.0, index=2)], clean_accuracy=0.0)
    result = evaluate(broken, rules(max_drop="20%"), baseline=make_report())
    assert not result.passed and [f.rule for f in result.failures] == ["above_chance"]


def test_every_failure_message_names_its_site():
    old = make_report([make_site("conv1", 1.0, index=0), make_site("conv2", 1.0, index=1)])
    new = make_report([make_site("conv1", 0.05, index=0), make_site("conv2", 0.01, index=1, censored="below")])
    result = evaluate(new, rules(Threshold(None, 0.5, False), Threshold(None, 5.0, True), max_drop="20%"),
                      baseline=old)
    assert len(result.failures) == 6
    for failure in result.failures:
        assert failure.message.startswith(f"site {failure.site}: "), failure.message
    assert result.failures[0].message == "site conv1: σ50 0.05 < 0.5, 95% CI 0.0475–0.0525 (rule *:0.5)"


def test_control_characters_in_names_are_escaped_in_messages_and_warnings():
    name = "evil\x1b[2J\r\n\x9b"
    old = make_report([make_site(name, 1.0, index=0), make_site("gone\x07", 1.0, index=1)])
    new = make_report([make_site(name, 0.1, index=0)])
    result = evaluate(new, rules(Threshold(None, 0.5, False), Threshold("^x\x1b", 0.1, False), max_drop="20%"),
                      baseline=old, allow_unmatched=True)
    assert failed_sites(result) == [name, name]  # the site field keeps the real name
    for text in [f.message for f in result.failures] + result.warnings:
        assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in text), text
    assert "site evil\\x1b[2J\\r\\n\\x9b: σ50 0.1 < 0.5" in result.failures[0].message
    assert any("gone\\x07" in w for w in result.warnings) and any("^x\\x1b" in w for w in result.warnings)


# --- tolerance rules (REGEX:SIGMA@DROP) ---------------------------------------------------------------------------

def tolerant_site(name: str, sigma: float, ci95=None, censored=None) -> dict:
    site = make_site(name, 1.0, index=0)
    site["tolerance"] = [{"drop": 0.01, "of": "1%", "sigma": sigma, "ci95": ci95, "censored": censored}]
    return site


@pytest.mark.parametrize("limit, decision", [(0.19, "passed"), (0.2, "passed"), (0.25, "undecided"),
                                             (0.3, "undecided"), (0.31, "failed")])
def test_a_tolerance_rule_is_decided_on_the_tolerances_interval(limit, decision):
    report = make_report([tolerant_site("a", 0.25, ci95=[0.2, 0.3])])
    result = evaluate(report, rules(parse_rule(f"a:{limit}@1%")))
    assert result.decision == decision
    if decision == "undecided":
        assert "0.2–0.3 straddles" in result.undecided[0].message


def test_a_censored_tolerance_is_undecided_where_its_bound_cannot_decide():
    above = make_report([tolerant_site("a", 0.5, censored="above")])
    assert evaluate(above, rules(parse_rule("a:0.4@1%"))).decision == "passed"
    assert "extend the grid up" in evaluate(above, rules(parse_rule("a:1@1%"))).undecided[0].message
    below = make_report([tolerant_site("a", 0.01, censored="below")])
    assert failed_sites(evaluate(below, rules(parse_rule("a:0.01@1%")))) == ["a"]
    assert "extend the grid down" in evaluate(below, rules(parse_rule("a:0.001@1%"))).undecided[0].message
