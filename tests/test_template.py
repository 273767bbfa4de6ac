"""data/template.py: the exact OpenBezoar prompt strings, spelled out here from the model card's template."""

import pytest

from data.template import DEFAULT_SYSTEM, PROMPT_TEMPLATE, RESPONSE_MARKER, format_prompt

# As written on the OpenBezoar model cards, one line per list item.
CARD_TEMPLATE_LINES = ["### System:", "{system}", "", "### Instruction:", "{instruction}", "", "### Response:", ""]
CARD_SYSTEM = ("Below is an instruction that describes a task, optionally paired with an input that provides further "
               "context following that instruction. Write a response that appropriately completes the request.")


def test_template_and_default_system_are_the_model_cards_strings():
    assert PROMPT_TEMPLATE == "\n".join(CARD_TEMPLATE_LINES)
    assert DEFAULT_SYSTEM == CARD_SYSTEM
    assert PROMPT_TEMPLATE.endswith(RESPONSE_MARKER) and RESPONSE_MARKER == "### Response:\n"


def test_prompt_without_input_uses_the_default_system_sentence():
    expected = "\n".join(["### System:", CARD_SYSTEM, "", "### Instruction:", "Name three primary colours.", "",
                          "### Response:", ""])
    assert format_prompt("Name three primary colours.") == expected


def test_input_follows_the_instruction_after_a_blank_line():
    expected = "\n".join(["### System:", CARD_SYSTEM, "", "### Instruction:", "Summarise the text.", "",
                          "The cat sat on the mat.", "", "### Response:", ""])
    assert format_prompt("Summarise the text.", input="The cat sat on the mat.") == expected


def test_whitespace_only_input_counts_as_no_input():
    assert format_prompt("Say hi.", input="  \n") == format_prompt("Say hi.")


def test_an_example_system_message_replaces_the_default_and_empty_is_kept_empty():
    expected = "\n".join(["### System:", "You are a patient teacher.", "", "### Instruction:", "Explain rain.", "",
                          "### Response:", ""])
    assert format_prompt("Explain rain.", system="You are a patient teacher.") == expected
    assert format_prompt("Explain rain.", system="").startswith("### System:\n\n\n### Instruction:\n")


def test_braces_and_markers_inside_fields_are_copied_verbatim():
    text = "Fill {system} and {instruction} in"
    assert format_prompt(text, input="{input}").count("{system} and {instruction}") == 1


def test_bad_fields_are_one_line_errors():
    with pytest.raises(ValueError, match="instruction is empty"):
        format_prompt("   ")
    with pytest.raises(ValueError, match="input must be a str, got int"):
        format_prompt("x", input=3)
