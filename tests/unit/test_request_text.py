"""The one check on client text: control characters are refused in every string of every
request body (the Strict base model), whatever field a later change adds; tab and newlines
stay allowed where text is free (prompts)."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from app.schemas import CalibrationIn, JobIn, Strict, VerificationIn, VerifyIn, check_text

BODIES: list[tuple[type[Strict], dict]] = [
    (JobIn, {"model_id": "tiny"}), (CalibrationIn, {}), (VerificationIn, {}), (VerifyIn, {}),
]


def string_fields(model: type[Strict]) -> list[tuple[str, bool]]:
    """(field, is a list) for every field holding text."""
    out = []
    for name, info in model.model_fields.items():
        shown = repr(info.annotation)
        if "str" in shown and "Literal" not in shown:
            out.append((name, typing.get_origin(info.annotation) is list))
    return out


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x1f"])
def test_check_text_refuses_control_characters(char: str) -> None:
    with pytest.raises(ValueError, match=f"U\\+{ord(char):04X}"):
        check_text(f"a{char}b")


@pytest.mark.parametrize("text", ["plain", "tab\there", "lines\nand\r\nmore", "ünïcødé ✓",
                                  "\x7f\x85\xa0"])
def test_check_text_keeps_text(text: str) -> None:
    assert check_text(text) == text


@pytest.mark.parametrize("model,base", BODIES, ids=[m.__name__ for m, _ in BODIES])
def test_every_string_field_of_every_body_refuses_a_nul(model: type[Strict], base: dict) -> None:
    fields = string_fields(model)
    assert fields, model
    for name, is_list in fields:
        value = "ab\x00" if not is_list else ["ok", "ab\x00"]
        with pytest.raises(ValidationError) as err:
            model.model_validate({**base, name: value})
        assert any(e["loc"][:1] == (name,) for e in err.value.errors()), (name, err.value)


def test_a_nested_body_names_the_nested_field() -> None:
    with pytest.raises(ValidationError) as err:
        JobIn.model_validate({"model_id": "tiny", "verify": {"prompts": ["a\x00"]}})
    assert err.value.errors()[0]["loc"] == ("verify", "prompts")


def test_prompts_keep_tabs_and_newlines() -> None:
    text = "Q:\tone\nA:\r\n"
    assert VerificationIn(prompts=[text]).prompts == [text]
