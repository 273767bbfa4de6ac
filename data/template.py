"""The OpenBezoar prompt template and default system sentence: their one home in bezoar.

From the OpenBezoar model cards:

    ### System:
    {system}

    ### Instruction:
    {instruction}

    ### Response:
    {response}

i.e. PROMPT_TEMPLATE below, followed by the response. The default system sentence is used "most of the
time"; Orca-scheme examples carry their own system message (pass it as `system`). At inference the model
sees the prompt alone: no EOS after it, generation starts right after "### Response:\\n". In training the
target is the response followed by EOS (added by the tokenizer, not written here).

Our choice (the cards do not show one): an example's optional *input* goes after the instruction,
separated by a blank line, inside the Instruction section:

    ### Instruction:
    {instruction}

    {input}

An input that is empty or only whitespace counts as no input. `system=None` means the default sentence;
`system=""` is kept as an empty system section (some Orca rows have an empty system message).
"""

PROMPT_TEMPLATE = "### System:\n{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"

DEFAULT_SYSTEM = ("Below is an instruction that describes a task, optionally paired with an input that provides "
                  "further context following that instruction. Write a response that appropriately completes "
                  "the request.")

RESPONSE_MARKER = "### Response:\n"  # the prompt ends with it; everything after is the model's response


def format_prompt(instruction, input="", system=None):
    """Prompt text for one example (everything before the response)."""
    for name, value in (("instruction", instruction), ("input", input), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"format_prompt: {name} must be a str, got {type(value).__name__}")
    if instruction is None or not instruction.strip():
        raise ValueError("format_prompt: instruction is empty")
    if input is not None and input.strip():
        instruction = f"{instruction}\n\n{input}"
    return PROMPT_TEMPLATE.format(system=DEFAULT_SYSTEM if system is None else system, instruction=instruction)
