"""Per-module settings: GPTQModel's `dynamic` rules, which vLLM and GPTQModel read from a
checkpoint's quantization_config.

A rule is a regex over full module names ("model.layers.3.mlp.down_proj") and the settings
that module gets instead of the run's: `{"+:.*down_proj": {"bits": 8}}`. "+:" (or no prefix)
overrides, "-:" leaves the module unquantized (its value must be empty). Rules are tried in
order and the first whose regex matches the start of the name (re.match, as both loaders do)
decides; a module no rule matches gets the run's settings.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

# what a rule may change: the solver's and the packer's per-layer settings. sym is one per
# checkpoint (it decides the file's v1/v2 format), the rest are run-wide choices.
OVERRIDABLE = ("bits", "group_size", "desc_act", "damp_percent")
SKIP, OVERRIDE = "-:", "+:"
MAX_RULES = 64
MAX_PATTERN = 500


def split_rule(key: str) -> tuple[bool, str]:
    """(leaves the module unquantized, the regex) of a rule's key."""
    if key.startswith(SKIP):
        return True, key[len(SKIP):]
    return False, key.removeprefix(OVERRIDE)


def rule_problem(key: str, overrides: Any) -> str | None:
    """Why a rule is malformed (its regex, its shape, its keys), or None. Values are checked
    by the settings they override."""
    if not isinstance(key, str) or not key:
        return "rule keys must be non-empty regexes"
    if len(key) > MAX_PATTERN:
        return f"rule {key[:40]!r}... is longer than {MAX_PATTERN} characters"
    skip, pattern = split_rule(key)
    if not pattern:
        return f"rule {key!r} has an empty regex"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"rule {key!r} is not a valid regex ({exc})"
    if not isinstance(overrides, dict):
        return f"rule {key!r} must map to an object of settings"
    if skip and overrides:
        return f"rule {key!r} leaves modules unquantized and takes no settings (give {{}})"
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        return (f"rule {key!r} sets {', '.join(unknown)}; a rule may set only "
                f"{', '.join(OVERRIDABLE)}")
    return None


def check_rules(rules: dict[str, dict[str, Any]], base: Any) -> None:
    """Raise ValueError naming the first bad rule: malformed, or settings the engine refuses."""
    if len(rules) > MAX_RULES:
        raise ValueError(f"dynamic holds {len(rules)} rules, at most {MAX_RULES} are allowed")
    for key, overrides in rules.items():
        problem = rule_problem(key, overrides)
        if problem:
            raise ValueError(f"dynamic {problem}")
        try:
            replace(base, dynamic={}, **overrides)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"dynamic rule {key!r}: {exc}") from exc


def matching_rule(rules: dict[str, dict[str, Any]], name: str) -> tuple[bool, dict[str, Any]] | None:
    """(skip, overrides) of the first rule matching module `name`, or None."""
    for key, overrides in rules.items():
        skip, pattern = split_rule(key)
        if re.match(pattern, name):
            return skip, overrides
    return None


def unmatched_rules(rules: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """The rules that decide none of these modules (a typo, or a name of another family)."""
    used = set()
    for name in names:
        for key in rules:
            if re.match(split_rule(key)[1], name):
                used.add(key)
                break
    return [key for key in rules if key not in used]
