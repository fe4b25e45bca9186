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


def rules_problem(rules: dict[str, Any]) -> str | None:
    """Why a set of rules is malformed (too many, or its first malformed rule), or None: what
    the API refuses at the edge and the engine refuses on its own."""
    if len(rules) > MAX_RULES:
        return f"holds {len(rules)} rules: at most {MAX_RULES} rules are allowed"
    return next((p for p in (rule_problem(k, v) for k, v in rules.items()) if p), None)


def check_rules(rules: dict[str, dict[str, Any]], base: Any) -> None:
    """Raise ValueError naming the first bad rule: malformed, or settings the engine refuses."""
    problem = rules_problem(rules)
    if problem:
        raise ValueError(f"dynamic {problem}")
    for key, overrides in rules.items():
        try:
            replace(base, dynamic={}, **overrides)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"dynamic rule {key!r}: {exc}") from exc


def deciding_rule(rules: dict[str, Any], name: str) -> str | None:
    """The key of the first rule whose regex matches the start of module `name`, or None."""
    return next((key for key in rules if re.match(split_rule(key)[1], name)), None)


def matching_rule(rules: dict[str, dict[str, Any]], name: str) -> tuple[bool, dict[str, Any]] | None:
    """(skip, overrides) of the first rule matching module `name`, or None."""
    key = deciding_rule(rules, name)
    return None if key is None else (split_rule(key)[0], rules[key])


def unmatched_rules(rules: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """The rules that decide none of these modules (a typo, or a name of another family)."""
    used = {deciding_rule(rules, name) for name in names}
    return [key for key in rules if key not in used]
