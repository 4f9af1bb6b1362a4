"""A documented regular-expression PII scrubber for texts, applied before anything touches disk.

Presidio (the usual library) needs spaCy language models that cannot be installed offline, so
this is a deliberately small, conservative rule set. The text is first normalised, so that
look-alike characters cannot hide a number from the rules: Unicode NFKC (full-width digits and
`＠` become ASCII), invisible format characters removed (zero-width spaces and joiners, soft
hyphens, direction marks), dashes unified to `-`, and every run of white space (newlines
included) collapsed to one space. The stored text is this normalised text. Then, in this order
(rules and examples: docs/privacy.md, "PII scrubber"):

- `[TOKEN]`  credential-named query values (`token`, `access_token`, `api_key`, `sig`, ...), URL
             user:password, long letters+digits URL segments, JWTs, `Bearer ...`
- `[EMAIL]`  e-mail addresses, internationalised (Unicode) and quoted local parts included
- `[IBAN]`   IBANs of their country's length, spaced or dashed, mod-97 checksum valid
- `[CARD]`   13-19 digits, plain or grouped with one separator (space, dash, dot, slash), Luhn valid
- `[DOB]`    a date at most 3 words after `born`, `birth(day)`, `DOB`, `née`, `geboren`, ...
- (kept)     other dates, year ranges and grouped amounts, shielded from the number rules below
- `[IP]`     IPv4 and IPv6 addresses
- `[PHONE]`  `+CC`/`00CC` then 1-5-digit groups (8-15 digits); national groups (7-15 digits)
- `[NUMBER]` 6+ digits (single dashes allowed) or 3+ space-separated groups of 3+ digits

A date is personal data when it is someone's date of birth, and ordinary otherwise ("bought on
12/03/2024"): the scrubber redacts dates only in a birth context and keeps the others, so reviews
keep their meaning. It does not find names, postal addresses or identifiers written in words:
texts are stored only when the caller opted in, and the stored items are for labelling, under a
retention limit.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

# ---------------------------------------------------------------- normalisation

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"), "-")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, invisible format characters (Unicode category Cf) removed, dashes unified, white space collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _SPACE.sub(" ", text.translate(_DASHES)).strip()


# ---------------------------------------------------------------- checksums


def luhn_valid(digits: str) -> bool:
    """The payment-card checksum: doubles every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length per country (ISO 13616 registry).
IBAN_LENGTH = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24,
    "XK": 20,
}  # fmt: skip


def iban_valid(compact: str) -> bool:
    """ISO 7064 mod 97-10 over the IBAN with its first four characters moved to the end."""
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


# ---------------------------------------------------------------- rules

_SECRET_NAME = (r"(?:(?:[\w.-]*[_-])?(?:access|refresh|id|auth|session|csrf|xsrf|api|private|client)?[_-]?"
                r"(?:token|key|secret|sig|signature|password|passwd|pwd|code|sid|sessionid|auth|jwt|otp))")  # fmt: skip
_URL_PARAM = re.compile(rf"(?i)(?<=[?&;#]){_SECRET_NAME}=([^&#\s]+)")
_URL = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)[^\s<>\"']+")
_URL_USERINFO = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")
_URL_SEGMENT = re.compile(r"(?<=[/=])[A-Za-z0-9_-]{16,}(?=[/?&#.]|$)")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(?<=\bbearer )[A-Za-z0-9._~+/-]{16,}=*")

_EMAIL = re.compile(
    r"""(?:"[^"@\s][^"]{0,62}"|[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*)"""
    r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,}"
)
_IBAN_START = re.compile(r"(?i)\b[A-Z]{2}\d{2}")
_CARD = re.compile(r"(?<![\d./-])(?:\d{13,19}|\d{4}(?P<cs>[ ./-])\d{4,6}(?:(?P=cs)\d{3,5}){1,3})(?![\d/]|[.-]\d)")

_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DAY, _MONTH, _YEAR = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])", r"(?:1[89]|20)\d{2}"


def _numeric_date(tag: str) -> str:
    """d/m/y or m/d/y (one separator: / . -, 2- or 4-digit year) or y-m-d; `tag` keeps group names unique."""
    return (rf"(?:{_DAY}(?P<{tag}1>[./-]){_DAY}(?P={tag}1)(?:1[89]|20)?\d{{2}}"
            rf"|{_YEAR}(?P<{tag}2>[./-]){_MONTH}(?P={tag}2){_DAY})")  # fmt: skip


_WORD_DATE = rf"(?:\d{{1,2}}(?:st|nd|rd|th)? (?:of )?{_MONTHS},? \d{{4}}|{_MONTHS} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})"
_BIRTH = (r"(?:birthdate|birthday|birth|born|dob|d\.o\.b\.?|n\u00e9e?|geboren|geb\.|nacid[oa]|"
          r"date de naissance|fecha de nacimiento)")  # fmt: skip
_DOB = re.compile(rf"(?i)\b{_BIRTH}(?!\w):? (?:[\w,]+ ){{0,3}}?({_numeric_date('d')}|{_WORD_DATE})(?![\d/]|[.-]\d)")
_KEEP = re.compile(
    rf"(?<![\d./-])(?:{_numeric_date('k')}"  # an ordinary date
    rf"|{_YEAR} ?- ?(?:{_YEAR}|\d{{2}})"  # a year range
    r"|\d{1,3}(?P<ts>[,.])\d{3}(?:(?P=ts)\d{3})*(?:[.,]\d{1,2})?"  # an amount with thousands separators
    r"|[$€£¥] ?\d{1,3}(?: \d{3})+|\d{1,3}(?: \d{3})+ ?(?:[$€£¥]|eur|usd|gbp|chf|euros?|dollars?|views|copies|"
    r"people|km|miles|pages|words|votes|users|fans)\b"  # space-grouped amounts with a currency or unit
    r")(?![\d/]|[.-]\d)",
    re.IGNORECASE,
)
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){3,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE_INTL = re.compile(r"(?<![\w+])(?:\+|\b00)\d{1,3}(?:[ ./-]?(?:\(\d{1,4}\)|\d{1,5})){2,7}(?!\w)")
_PHONE = re.compile(r"(?<![\w+])(?:\(\d{1,5}\)[ ./-]?)?\d{2,5}(?:[ ./-]?\d{2,5}){1,4}(?!\w)")
_NUMBER = re.compile(r"\d(?:-?\d){5,}|\d{3,}(?: \d{3,}){2,}")  # spaced: 3+ groups of 3+ digits

# Kept spans are swapped for private-use characters (no digit, no word character) while the number
# rules run, then restored.
_PUA = re.compile("[\ue000-\ue00f]")
_SHIELD = re.compile("\ue00a([\ue000-\ue009]+)\ue00b")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _looks_secret(s: str) -> bool:
    """A URL segment that is a token, not a slug: letters and digits, interleaved many times."""
    classes = ["d" if c.isdigit() else "a" if c.isalpha() else "" for c in s]
    runs = sum(1 for a, b in pairwise(classes) if a and b and a != b)
    return _digits(s) >= 2 and runs >= 5


def _iban_spans(text: str) -> list[tuple[int, int]]:
    """Spans of checksum-valid IBANs of their country's length, written with optional single spaces or dashes."""
    spans: list[tuple[int, int]] = []
    for m in _IBAN_START.finditer(text):
        want = IBAN_LENGTH.get(m.group(0)[:2].upper())
        if want is None or (spans and m.start() < spans[-1][1]):
            continue
        compact, i = [], m.start()
        while i < len(text) and len(compact) < want:
            ch = text[i]
            if ch.isascii() and ch.isalnum():
                compact.append(ch.upper())
            elif not (ch in " -" and i + 1 < len(text) and text[i + 1].isascii() and text[i + 1].isalnum()):
                break
            i += 1
        end_ok = i == len(text) or not (text[i].isascii() and text[i].isalnum())
        if len(compact) == want and end_ok and iban_valid("".join(compact)):
            spans.append((m.start(), i))
    return spans


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """The normalised text with PII replaced by placeholders, and how many of each kind were replaced."""
    found: Counter[str] = Counter()
    kept: list[str] = []

    def sub(pattern: re.Pattern, kind: str, s: str, check: Callable[[str], bool] | None = None,
            group: int = 0) -> str:  # fmt: skip
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(group)):
                return m.group(0)
            found[kind] += 1
            start, end = m.start(group) - m.start(), m.end(group) - m.start()
            return m.group(0)[:start] + f"[{kind.upper()}]" + m.group(0)[end:]

        return pattern.sub(repl, s)

    def in_url(m: re.Match) -> str:
        url = sub(_URL_USERINFO, "token", m.group(0))
        return sub(_URL_SEGMENT, "token", url, _looks_secret)

    def shield(m: re.Match) -> str:
        kept.append(m.group(0))
        return "\ue00a" + "".join(chr(0xE000 + int(d)) for d in str(len(kept) - 1)) + "\ue00b"

    def unshield(m: re.Match) -> str:
        return kept[int("".join(str(ord(c) - 0xE000) for c in m.group(1)))]

    text = _PUA.sub("", normalise(text))
    text = sub(_JWT, "token", text)
    text = sub(_BEARER, "token", text)
    text = sub(_URL_PARAM, "token", text, group=1)
    text = _URL.sub(in_url, text)
    text = sub(_EMAIL, "email", text)
    for start, end in reversed(_iban_spans(text)):
        found["iban"] += 1
        text = text[:start] + "[IBAN]" + text[end:]
    text = sub(_CARD, "card", text, lambda s: 13 <= _digits(s) <= 19 and luhn_valid(re.sub(r"\D", "", s)))
    text = sub(_DOB, "dob", text, group=1)
    text = _KEEP.sub(shield, text)
    text = sub(_IPV4, "ip", text)
    text = sub(_IPV6, "ip", text, lambda s: sum(c.isalnum() for c in s) >= 3)
    text = sub(_PHONE_INTL, "phone", text, lambda s: 8 <= _digits(s) <= 15)
    text = sub(_PHONE, "phone", text, lambda s: 7 <= _digits(s) <= 15)
    text = sub(_NUMBER, "number", text)
    return _SHIELD.sub(unshield, text), dict(found)
