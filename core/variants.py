"""Surface variants of a forced-choice candidate, pooled into one score (``extract.candidate_variants``).

Instruct models often answer ``Yes`` where the candidate is ``yes``, or put a space before it. With
``candidate_variants: [case, space]`` each candidate ``c`` is scored as

    log p(c) = logsumexp over the distinct variants v of c of  log p(v | prompt)

where every ``log p(v | prompt)`` is the exact teacher-forced log-prob of the variant's full token
sequence (``extract.plan.candidate_table``). Variants whose token ids are equal are one variant (no
double counting); a variant that tokenizes like another candidate or one of its variants is an error.
The store records the rules and each candidate's variants (root attribute ``candidate_variants``).

Rules (applied in the order listed in ``RULES``, each to every variant made so far):

* ``case``: ``c.lower()``, ``c`` with its first character upper-cased, ``c.upper()``;
* ``space``: ``" " + v`` for every variant ``v`` so far.

Usage::

    surface_variants("yes", ["case", "space"])
    # ('yes', 'Yes', 'YES', ' yes', ' Yes', ' YES')
"""

from __future__ import annotations

from typing import Callable, Iterable

from gapcache.errors import ConfigError


def _case(c: str) -> list[str]:
    return [c.lower(), c[:1].upper() + c[1:], c.upper()]


def _space(c: str) -> list[str]:
    return [" " + c]


#: rule name -> the variants it adds for one string (the original is always kept first)
RULES: dict[str, Callable[[str], list[str]]] = {"case": _case, "space": _space}


def check_rules(rules) -> tuple[str, ...]:
    """``rules`` as a tuple, or a ConfigError naming ``extract.candidate_variants``."""
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, str) and r in RULES for r in rules):
        raise ConfigError(f"The 'extract.candidate_variants' parameter must be a list of rule names from "
                          f"{list(RULES)} (empty: every candidate scored as written). Got {rules!r} instead.")
    if len(set(rules)) != len(rules):
        raise ConfigError(f"The 'extract.candidate_variants' parameter lists a rule twice. Got {rules!r} instead.")
    return tuple(rules)


def surface_variants(candidate: str, rules: Iterable[str]) -> tuple[str, ...]:
    """``candidate`` first, then the distinct strings the rules make of it (rules in ``RULES`` order)."""
    out = [candidate]
    for name in RULES:
        if name in rules:
            out += [v for s in list(out) for v in RULES[name](s)]
    return tuple(dict.fromkeys(out))
