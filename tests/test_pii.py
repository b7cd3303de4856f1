"""Tests for `tunelab.data.pii`: each PII type in realistic text, the near misses it must leave alone, and properties.

Run: pytest -q tests/test_pii.py
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.pii import DEFAULT_TYPES, PII_TYPES, PLACEHOLDERS, PiiScrubber
from tunelab.errors import TunelabError

# Known-good test values: card numbers from the networks' published test sets, IBANs from the registry examples.
VISA_TEST_CARD = "4111 1111 1111 1111"
MASTERCARD_TEST_CARD = "5500-0000-0000-0004"
AMEX_TEST_CARD = "378282246310005"
LUHN_FAILING_CARD = "4111 1111 1111 1112"
GERMAN_IBAN = "DE89 3704 0044 0532 0130 00"
BRITISH_IBAN = "GB82WEST12345698765432"
BAD_CHECKSUM_IBAN = "DE88 3704 0044 0532 0130 00"


@pytest.fixture(scope="module")
def scrub() -> PiiScrubber:
    return PiiScrubber()


@pytest.fixture(scope="module")
def scrub_gb() -> PiiScrubber:
    return PiiScrubber(region="GB")


# --- each type, in the kind of text fine-tuning data holds ------------------------------------------------------------

FOUND_CASES = [
    (
        "Hi team, please reply to jane.doe+billing@mail.example.co.uk (cc bob_smith@example.org). Thanks!",
        "Hi team, please reply to <EMAIL> (cc <EMAIL>). Thanks!",
        {"email": 2},
    ),
    (
        "Ticket #4821: customer says 'Call me at 555-123-4567 or (555) 123-4567 after 5pm.'",
        "Ticket #4821: customer says 'Call me at <PHONE> or <PHONE> after 5pm.'",
        {"phone": 2},
    ),
    (
        "Our SF office is +1 415 555 2671, London +44 20 7946 0958, Berlin +49 30 901820.",
        "Our SF office is <PHONE>, London <PHONE>, Berlin <PHONE>.",
        {"phone": 3},
    ),
    (
        f"I was charged twice on {VISA_TEST_CARD}; my other cards are {MASTERCARD_TEST_CARD} and {AMEX_TEST_CARD}.",
        "I was charged twice on <CREDIT_CARD>; my other cards are <CREDIT_CARD> and <CREDIT_CARD>.",
        {"credit_card": 3},
    ),
    (
        f"Please refund to {GERMAN_IBAN} (or {BRITISH_IBAN}) by Friday.",
        "Please refund to <IBAN> (or <IBAN>) by Friday.",
        {"iban": 2},
    ),
    (
        "Login from 192.168.1.20 and 10.0.0.1:8080 failed; the IPv6 peer was 2001:db8::1, link fe80::1%eth0.",
        "Login from <IP_ADDRESS> and <IP_ADDRESS>:8080 failed; the IPv6 peer was <IP_ADDRESS>, link <IP_ADDRESS>%eth0.",
        {"ip": 4},
    ),
    (
        "Mapped address ::ffff:192.0.2.1 and full form 2001:0db8:85a3:0000:0000:8a2e:0370:7334.",
        "Mapped address <IP_ADDRESS> and full form <IP_ADDRESS>.",
        {"ip": 2},
    ),
    (
        "Set DATABASE_URL=postgres://admin:s3cr3t@db.example.com:5432/app and redis://:hunter2@cache:6379/0",
        "Set DATABASE_URL=postgres://<CREDENTIALS>@db.example.com:5432/app and redis://<CREDENTIALS>@cache:6379/0",
        {"url_credentials": 2},
    ),
    (
        "Clone https://deploy:p@ss:w0rd@git.example.com/team/repo.git then email ops@example.com.",
        "Clone https://<CREDENTIALS>@git.example.com/team/repo.git then email <EMAIL>.",
        {"url_credentials": 1, "email": 1},
    ),
]


@pytest.mark.parametrize(("text", "expected_text", "expected_counts"), FOUND_CASES)
def test_each_type_is_replaced_by_its_placeholder_and_counted(
    scrub: PiiScrubber, text: str, expected_text: str, expected_counts: dict[str, int]
) -> None:
    assert scrub(text) == (expected_text, Counter(expected_counts))


def test_national_phone_format_uses_the_region(scrub: PiiScrubber, scrub_gb: PiiScrubber) -> None:
    text = "Our London desk: 020 7946 0958."
    assert scrub_gb(text) == ("Our London desk: <PHONE>.", Counter(phone=1))
    assert scrub(text)[1]["phone"] == 0  # read as a US number it has the wrong length


def test_mixed_support_ticket_counts_every_type(scrub: PiiScrubber) -> None:
    ticket = (
        "From: Jane Doe <jane.doe@example.com>\n"
        "Subject: double charge on order #4821 (2024-01-15, $1,234.56)\n\n"
        f"Card {VISA_TEST_CARD} was charged twice. Refund to {GERMAN_IBAN} please.\n"
        "I'm on +1 415 555 2671 or 555-123-4567. The app log shows 203.0.113.7 and 2001:db8::42,\n"
        "and the config had ftp://jane:secret@files.example.com/upload. Version 1.2.3.4.5, at 12:30."
    )
    scrubbed, counts = scrub(ticket)
    assert counts == Counter(email=1, credit_card=1, iban=1, phone=2, ip=2, url_credentials=1)
    assert scrubbed == (
        "From: Jane Doe <<EMAIL>>\n"
        "Subject: double charge on order #4821 (2024-01-15, $1,234.56)\n\n"
        "Card <CREDIT_CARD> was charged twice. Refund to <IBAN> please.\n"
        "I'm on <PHONE> or <PHONE>. The app log shows <IP_ADDRESS> and <IP_ADDRESS>,\n"
        "and the config had ftp://<CREDENTIALS>@files.example.com/upload. Version 1.2.3.4.5, at 12:30."
    )


def test_only_the_requested_types_are_scrubbed() -> None:
    scrub_email_only = PiiScrubber(types=["email"])
    text = "Mail bob@example.com or call 555-123-4567."
    assert scrub_email_only(text) == ("Mail <EMAIL> or call 555-123-4567.", Counter(email=1))
    assert PiiScrubber(types="phone")(text) == ("Mail bob@example.com or call <PHONE>.", Counter(phone=1))
    assert PiiScrubber(types=[])(text) == (text, Counter())


# --- near misses: left exactly as they are ---------------------------------------------------------------------------

NEAR_MISSES = [
    "shipped on 2024-01-15",
    "founded in 1999, relaunched in 2024",
    "total $1,234.56 incl. tax",
    "order #4821",
    "PIN 1234, zip 10115",
    f"card {LUHN_FAILING_CARD} (typo)",
    "order number 1234567890123456",  # 16 digits, leading 1: not an issuer prefix
    f"IBAN {BAD_CHECKSUM_IBAN} (bad check digits)",
    "XX89 3704 0044 0532 0130 00 is no country",
    "release 1.2.3.4.5 and v1.2.3.4",
    "999.1.1.1 is out of range",
    "meet at 12:30 or 12:30:45",
    "MAC 00:1a:2b:3c:4d:5e",
    "Python slice a[::2] and b[1::2], C++ std::vector, dead::beef",
    "user@localhost and root@db-host are system accounts",
    "ref 12-34-56-78-90 and 1 234 567 890 units",
    "id 5551234567 in the database",
    "ISBN 978-3-16-148410-0",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "see https://example.com/login?next=/home#top",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(scrub: PiiScrubber, text: str) -> None:
    assert scrub(text) == (text, Counter())


def test_url_user_without_password_is_taken_for_an_email(scrub: PiiScrubber) -> None:
    # No password, so no credentials; "user@host.tld" is still an address-shaped personal detail and goes.
    assert scrub("clone https://alice@example.org/repo.git") == ("clone https://<EMAIL>/repo.git", Counter(email=1))


def test_card_followed_by_other_digits_is_still_found(scrub: PiiScrubber) -> None:
    assert scrub(f"paid with {VISA_TEST_CARD} 2024 edition") == ("paid with <CREDIT_CARD> 2024 edition", Counter(credit_card=1))
    assert scrub("Amex as printed: 3782 822463 10005.") == ("Amex as printed: <CREDIT_CARD>.", Counter(credit_card=1))


def test_grouped_iban_stops_at_its_registry_length(scrub: PiiScrubber) -> None:
    assert scrub("Belgian account BE68 5390 0754 7034 OK?") == ("Belgian account <IBAN> OK?", Counter(iban=1))


def test_adjacent_phone_numbers_are_two_numbers(scrub: PiiScrubber) -> None:
    assert scrub("Lines: 555-123-4567 555-123-4568") == ("Lines: <PHONE> <PHONE>", Counter(phone=2))


# --- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_type_names_the_closest_and_all_choices() -> None:
    with pytest.raises(TunelabError) as error:
        PiiScrubber(types=["email", "phonee"])
    message = str(error.value)
    assert message.startswith("data.pii: unknown type 'phonee'; did you mean 'phone'? choose from email, phone,")
    assert "\n" not in message
    assert error.value.exit_code == 2


def test_unknown_type_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(TunelabError, match=r"^data\.pii: unknown type 'zzz'; choose from email, phone, credit_card"):
        PiiScrubber(types=["zzz"])


def test_unknown_region_is_an_error() -> None:
    with pytest.raises(TunelabError, match=r"unknown phone region 'XX'"):
        PiiScrubber(region="XX")


def test_person_without_presidio_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # makes `import presidio_analyzer` fail
    with pytest.raises(TunelabError) as error:
        PiiScrubber(types=["email", "person"])
    message = str(error.value)
    assert "presidio-analyzer" in message and "spaCy English model" in message
    assert "drop 'person' from data.pii" in message
    assert "\n" not in message


def test_person_names_via_presidio_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("presidio_analyzer")
    spacy = pytest.importorskip("spacy")
    spacy_util = pytest.importorskip("spacy.util")

    # A rule-based pipeline stands in for en_core_web_*: this checks our presidio wiring offline, not NER quality.
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Alice Johnson"}])
    monkeypatch.setattr(spacy_util, "is_package", lambda name: name == "en_core_web_sm")
    monkeypatch.setattr(spacy, "load", lambda name, **kwargs: nlp)
    scrub_people = PiiScrubber(types=["person", "email"])
    text = "This is Alice Johnson (alice@example.com)."
    assert scrub_people(text) == ("This is <PERSON> (<EMAIL>).", Counter(person=1, email=1))

    monkeypatch.setattr(spacy_util, "is_package", lambda name: False)
    with pytest.raises(TunelabError, match="spaCy English model"):
        PiiScrubber(types=["person"])


def test_public_tables_agree() -> None:
    assert set(PLACEHOLDERS) == set(PII_TYPES)
    assert DEFAULT_TYPES == tuple(pii_type for pii_type in PII_TYPES if pii_type != "person")
    assert PiiScrubber().types == DEFAULT_TYPES


# --- properties ------------------------------------------------------------------------------------------------------

PII_SAMPLES = [
    "jane.doe+x@example.co.uk",
    "555-123-4567",
    "(555) 123-4567",
    "+44 20 7946 0958",
    VISA_TEST_CARD,
    AMEX_TEST_CARD,
    GERMAN_IBAN,
    BRITISH_IBAN,
    "192.168.1.20",
    "2001:db8::1",
    "https://admin:s3cr3t@db.example.com/x",
]
FILLER_WORDS = ["Hello", "please", "call", "me", "at", "or", "refund", "to", "the", "server", "said", "\n", "é", "日本"]

# Text with no digit and no "@" cannot hold any of the default types, whatever else it contains.
text_without_digits_or_at = st.text(alphabet=st.characters(exclude_categories=("Nd", "Cs"), exclude_characters="@"))
# Fragments glued with and without separators, so that placeholders land next to digits, words and punctuation.
pii_rich_text = st.lists(
    st.one_of(st.sampled_from(PII_SAMPLES + NEAR_MISSES + FILLER_WORDS), st.text(max_size=8)), max_size=8
).flatmap(lambda fragments: st.sampled_from(["", " ", ", ", ".", "-", ":"]).map(lambda glue: glue.join(fragments)))
# Near misses kept apart by words, so that no two of them merge into one longer number.
near_miss_text = st.lists(st.sampled_from(NEAR_MISSES + FILLER_WORDS), max_size=6).map(" and ".join)


@settings(max_examples=150, deadline=None)
@given(text=text_without_digits_or_at)
def test_text_without_pii_comes_back_identical(scrub: PiiScrubber, text: str) -> None:
    assert scrub(text) == (text, Counter())


@settings(max_examples=60, deadline=None)
@given(text=near_miss_text)
def test_near_miss_sentences_come_back_identical(scrub: PiiScrubber, text: str) -> None:
    assert scrub(text) == (text, Counter())


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(pii_rich_text, st.text()))
def test_scrubbing_is_idempotent(scrub: PiiScrubber, text: str) -> None:
    once, _ = scrub(text)
    assert scrub(once) == (once, Counter())


@settings(max_examples=60, deadline=None)
@given(sample=st.sampled_from(PII_SAMPLES), before=st.sampled_from(FILLER_WORDS), after=st.sampled_from(FILLER_WORDS))
def test_every_sample_is_found_between_words(scrub: PiiScrubber, sample: str, before: str, after: str) -> None:
    scrubbed, counts = scrub(f"{before} {sample} {after}")
    assert sum(counts.values()) == 1
    assert any(placeholder in scrubbed for placeholder in PLACEHOLDERS.values())
    assert scrubbed.startswith(before) and scrubbed.endswith(after)
