from data.template import DEFAULT_SYSTEM, PROMPT_TEMPLATE, RESPONSE_MARKER, format_prompt

__all__ = ["DEFAULT_SYSTEM", "PROMPT_TEMPLATE", "RESPONSE_MARKER", "format_prompt"]
