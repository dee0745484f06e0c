"""attnrl.credit_names (read before torch is imported) says what attnrl.credit's registry
says: the same names, the same signed strategies, the same per-response factors and the same
attention readers."""

import pytest

from attnrl import credit_names
from attnrl.credit import CREDIT_STRATEGIES, required_inputs
from attnrl.errors import UserError


def test_names_and_properties_equal_the_registry():
    assert set(credit_names.CREDIT_STRATEGIES) == set(CREDIT_STRATEGIES)
    assert set(credit_names.SIGNED_CREDIT) == {n for n, s in CREDIT_STRATEGIES.items()
                                               if s.signed}
    assert set(credit_names.PER_RESPONSE_CREDIT) == {
        n for n, s in CREDIT_STRATEGIES.items() if "advantages" in s.requires}
    for name in CREDIT_STRATEGIES:
        needs = required_inputs(name)
        reads = "signals" if "signals" in needs else "qk" if any(
            i.startswith("qk_") for i in needs) else None
        assert credit_names.ATTENTION_CREDIT.get(name) == reads, name


def test_check_credit_refuses_unknown_and_composed_signed_names():
    assert credit_names.check_credit("coupled+random") == ["coupled", "random"]
    with pytest.raises(UserError, match="did you mean 'coupled'"):
        credit_names.check_credit("coupld")
    with pytest.raises(UserError, match="cannot be composed"):
        credit_names.check_credit("sign_flip+random")


def test_within_response_strategies():
    assert credit_names.within_response_problem("sign_flip")
    assert credit_names.within_response_problem("qk_consistency")
    assert credit_names.within_response_problem("coupled+qk_consistency") is None
    names = credit_names.within_response_strategies()
    assert "coupled" in names and "sign_flip" not in names and "qk_consistency" not in names
