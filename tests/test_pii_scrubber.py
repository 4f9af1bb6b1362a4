"""The PII scrubber, table-driven: what it must redact (after normalisation) and what it must keep.

Each positive row is (text, kind, secret): the kind is counted and the secret, normalised, is gone
from the output. Each negative row is ordinary review text that must come back unchanged: numbers,
prices, scores, versions and dates that are not a date of birth.
"""

from __future__ import annotations

import pytest

from serving.feedback.pii import iban_valid, normalise, scrub

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
ZW = "\u200b"  # a zero-width space
NBSP = "\u00a0"

POSITIVE = [
    # e-mail: internationalised, quoted, full-width, with invisible characters
    ("mail jane.roe@example.org ok", "email", "jane.roe@example.org"),
    ("mail JANE.ROE+films@Example.CO.UK ok", "email", "JANE.ROE+films"),
    ("mail jäne.röe@bücher.de ok", "email", "jäne.röe@bücher.de"),
    ('mail "john doe"@example.com ok', "email", '"john doe"'),
    ('mail "jane@home"@example.org ok', "email", "jane@home"),
    ("mail 用户@例子.广告 ok", "email", "用户@例子.广告"),
    ("mail имя@почта.рф ok", "email", "имя@почта.рф"),
    ("mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｏｒｇ ok", "email", "jane@example.org"),
    (f"mail jane{ZW}.roe@exam{ZW}ple.org ok", "email", "jane.roe@example.org"),
    # phones: country and area code go too
    ("call +33 1 23 45 67 89 ok", "phone", "+33 1"),
    ("call +33 (0)1 23 45 67 89 ok", "phone", "+33 (0)1"),
    ("call 0033 1 23 45 67 89 ok", "phone", "0033 1"),
    ("call +44 20 7946 0958 ok", "phone", "+44 20"),
    ("call +1-415-555-0142 ok", "phone", "+1-415"),
    ("call +49 30 1234567 ok", "phone", "+49 30"),
    ("call +81 3-1234-5678 ok", "phone", "+81 3"),
    (f"call +33{NBSP}6{NBSP}12{NBSP}34{NBSP}56{NBSP}78 ok", "phone", "+33 6"),
    ("call +33  6  12  34  56  78 ok", "phone", "+33 6"),
    ("call (555) 123-4567 ok", "phone", "(555)"),
    ("call 06 12 34 56 78 ok", "phone", "06 12 34"),
    ("call 030/1234567 ok", "phone", "030/1234567"),
    # cards (Luhn-valid) in every separator style
    ("card 4111 1111 1111 1111 ok", "card", "4111 1111"),
    ("card 4111111111111111 ok", "card", "4111111111111111"),
    ("card 4111-1111-1111-1111 ok", "card", "4111-1111"),
    ("card 4111.1111.1111.1111 ok", "card", "4111.1111"),
    ("card 4111  1111  1111  1111 ok", "card", "4111 1111"),
    ("card 4111/1111/1111/1111 ok", "card", "4111/1111"),
    ("card 3782 822463 10005 ok", "card", "822463"),
    (f"card 5555{ZW}5555{ZW}5555{ZW}4444 ok", "card", "5555555555554444"),
    ("card ４１１１ １１１１ １１１１ １１１１ ok", "card", "4111 1111"),
    ("card 4111-1111-1111-1112 ok", "number", "4111-1111"),  # fails Luhn: still a long number
    ("card 4111 1111 1111 1112 ok", "number", "4111 1111"),
    # IBANs (mod-97 valid), spaced, dashed, lower case
    ("iban GB82 WEST 1234 5698 7654 32 ok", "iban", "5698 7654"),
    ("iban DE89370400440532013000 ok", "iban", "DE89370400440532013000"),
    ("iban DE89-3704-0044-0532-0130-00 ok", "iban", "3704-0044"),
    ("iban fr14 2004 1010 0505 0001 3m02 606 ok", "iban", "2004 1010"),
    ("iban NL91 ABNA 0417 1643 00 ok", "iban", "ABNA 0417"),
    # dates of birth (other dates are kept: see NEGATIVE)
    ("born on 12/03/1990 ok", "dob", "12/03/1990"),
    ("date of birth: 1990-03-12 ok", "dob", "1990-03-12"),
    ("DOB 12.03.1990 ok", "dob", "12.03.1990"),
    ("born on the 3rd of March 1990 ok", "dob", "March 1990"),
    ("birthday: March 3, 1990 ok", "dob", "March 3"),
    ("geboren am 03.12.1985 ok", "dob", "03.12.1985"),
    # addresses
    ("from 192.168.10.254 ok", "ip", "192.168.10.254"),
    ("from 2001:db8:85a3::8a2e:370:7334 ok", "ip", "8a2e:370:7334"),
    # secrets in URLs and tokens
    ("see https://example.com/reset?token=abc123XYZ&lang=en ok", "token", "abc123XYZ"),
    ("see https://api.example.com/v1?access_token=ya29.A0ARrdaM ok", "token", "ya29.A0ARrdaM"),
    ("see example.com/x?api_key=sk_live_51H8 ok", "token", "sk_live_51H8"),
    ("see https://s3.example.com/f.jpg?X-Amz-Signature=9f86d0818 ok", "token", "9f86d0818"),
    ("see https://user:hunter2@example.com/ ok", "token", "hunter2"),
    ("see https://example.com/r/a8Fk29dLq0ZxP3mN9 ok", "token", "a8Fk29dLq0ZxP3mN9"),
    (f"see {JWT} ok", "token", JWT[:20]),
    ("send Authorization: Bearer abcdefghij0123456789XYZ ok", "token", "abcdefghij0123456789XYZ"),
    # other long numbers
    ("passport X1234567 ok", "number", "1234567"),
]

NEGATIVE = [
    "I give it 10 out of 10: the best film of 2019, 2 hours long, at 12:30 in room 4.",
    "bought on 12/03/2024, returned on 15/03/2024",
    "released 2024-01-15 in cinemas",
    "seen on 03.12.2023 with friends",
    "delivered 3/12/24 as promised",
    "the 1990-1995 seasons were better",
    "it cost $1,299.99 and weighs 2.5 kg",
    "over 1,000,000 copies sold",
    "1.000.000 Zuschauer am ersten Tag",
    "1 000 000 views on launch day",
    "only 1 299 € in the sale",
    "rated 4.5/5 by 10,000 users",
    "runtime 2h 30min, 1080p, 60 fps",
    "4K at 3840x2160, HDR10",
    "version 2.0.1 fixed it",
    "episode 7 of season 3, part 2/3",
    "won 3-2 after extra time",
    "99.9% uptime, 24/7 support",
    "room 101, flight BA 2490, gate 12",
    "top 10 films of the 2010s",
    "it is 100% worth the 15 dollars",
    "chapters 12 to 24 are slow",
    "born to run is still a great song",
    "she was born in 1990 and it shows",
    "more at https://example.com/best-headphones-2024-review",
    "watch https://youtu.be/dQw4w9WgXcQ today",
    "https://example.com/search?q=best+film&page=2",
    "the café's crème brûlée was great",
    "showings at 12:30, 14:45 and 18:00",
    "scored 7/10, 8/10 and 9/10",
    "open 9am to 5pm, Mon-Fri",
    "from -5 to 10 degrees",
    "the sequel (2019) beats the 2009 original",
    "paid 49.99 EUR on 2023-11-24",
    "an XPS 13 9310 with 16 GB",
    "vol. 3, no. 12, pp. 45-67",
    "my key takeaway: the token gesture at the end",
]


@pytest.mark.parametrize(("text", "kind", "secret"), POSITIVE)
def test_scrubber_redacts(text, kind, secret):
    clean, found = scrub(text)
    assert found.get(kind, 0) >= 1, (clean, found)
    assert normalise(secret) not in clean, clean
    assert f"[{kind.upper()}]" in clean and clean.startswith(text.split()[0] + " ") and clean.endswith(" ok")


@pytest.mark.parametrize("text", NEGATIVE)
def test_scrubber_keeps_ordinary_review_text(text):
    assert scrub(text) == (text, {})


def test_the_table_is_large_enough():
    assert len(POSITIVE) + len(NEGATIVE) >= 60 and len(NEGATIVE) >= 30


def test_normalisation_defeats_look_alike_characters():
    assert normalise(f"a{ZW}b\u00adc\u2060d \n\t e{NBSP}f ＡＢ１２") == "abcd e f AB12"
    assert normalise("4111\u20131111\u22121111\u20111111") == "4111-1111-1111-1111"
    clean, found = scrub("line one\n\n  line two")
    assert clean == "line one line two" and found == {}


def test_iban_checksum_and_country_length():
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765433")
    clean, found = scrub("iban GB82 WEST 1234 5698 7654 33 ok")  # checksum off by one: not an IBAN
    assert "iban" not in found
    clean, found = scrub("ibans DE89 3704 0044 0532 0130 00 and GB82-WEST-1234-5698-7654-32 ok")
    assert clean == "ibans [IBAN] and [IBAN] ok" and found == {"iban": 2}
