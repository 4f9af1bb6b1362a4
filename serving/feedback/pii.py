"""A documented regular-expression PII scrubber for texts, applied before anything touches disk.

Presidio (the usual library) needs spaCy language models that cannot be installed offline, so
this is a deliberately small, conservative regex set. It redacts (in this order):

| placeholder | what | rule |
|---|---|---|
| `[EMAIL]` | e-mail addresses | `local@domain.tld` |
| `[IBAN]` | IBAN-like account numbers | 2 capital letters, 2 digits, 11–30 letters/digits (spaces allowed every 4) |
| `[CARD]` | payment-card numbers | 13–19 digits, spaces/dashes allowed, **Luhn checksum valid** |
| `[IP]` | IPv4 and IPv6 addresses | dotted quad with octets ≤ 255; ≥ 3 colon-separated hex groups |
| `[PHONE]` | phone numbers | optional `+CC`/`(area)`, 3–5 digit groups, 7–15 digits in all |
| `[NUMBER]` | other numbers | 6+ digits, single spaces/dashes allowed: account or passport numbers, |
|  |  | card-like numbers failing Luhn (`X1234567` → `X[NUMBER]`) |

It over-redacts rather than under-redacts (a numeric date such as 2024-01-15 becomes `[PHONE]`).
It does not find names, postal addresses or free-text identifiers: texts are stored only when
the caller opted in, and the stored items are for labelling, under a retention limit.
"""

from __future__ import annotations

import re
from collections import Counter

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){3,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,5}(?:[\s.-]?\d{2,5}){1,4}(?!\w)")
_NUMBER = re.compile(r"\d(?:[ -]?\d){5,}")


def luhn_valid(digits: str) -> bool:
    """The payment-card checksum: doubles every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """The text with PII replaced by placeholders, and how many of each kind were replaced."""
    found: Counter[str] = Counter()

    def sub(pattern: re.Pattern, kind: str, s: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            found[kind] += 1
            return f"[{kind.upper()}]"

        return pattern.sub(repl, s)

    def card(s: str) -> bool:
        return luhn_valid(re.sub(r"\D", "", s))

    def phone(s: str) -> bool:
        return 7 <= sum(c.isdigit() for c in s) <= 15

    text = sub(_EMAIL, "email", text)
    text = sub(_IBAN, "iban", text)
    text = sub(_CARD, "card", text, card)
    text = sub(_IPV4, "ip", text)
    text = sub(_IPV6, "ip", text, lambda s: sum(c.isalnum() for c in s) >= 3)
    text = sub(_PHONE, "phone", text, phone)
    text = sub(_NUMBER, "number", text)
    return text, dict(found)
