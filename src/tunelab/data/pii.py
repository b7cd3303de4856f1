"""PII anonymization for fine-tuning data: replace personal data in free text by typed placeholders.

    from tunelab.data.pii import PiiScrubber
    scrub = PiiScrubber(region="GB")
    text, counts = scrub("Mail jane.doe+uk@example.co.uk or ring 020 7946 0958")
    # text == "Mail <EMAIL> or ring <PHONE>", counts == Counter({"email": 1, "phone": 1})

Every detector is a candidate pattern followed by a validator, so that near misses survive untouched: card numbers
must pass the Luhn check, IBANs the ISO 13616 mod-97 check and the country length table, IP addresses must parse with
`ipaddress`, and phone numbers come from `phonenumbers` plus the guards described at `_find_phone_spans`.

Detectors run one after another on the text the previous one produced, in `_RUN_ORDER`; an earlier detector's
placeholder hides its digits from the later ones. URL credentials go before e-mail (so `pass@host` is not an e-mail
address), IP addresses before cards (so "10.0.0.1-4111 ..." is not "part of a decimal number"), and IBANs, IP
addresses and cards before phone numbers (so their digit groups are not counted twice).

Placeholders contain no digit, `@` or `:`. A replacement can still change what a guard sees next to it (a number
right after a replaced one is no longer "part of a longer number"), so the pattern detectors repeat until a pass finds
nothing: scrubbing scrubbed text then changes nothing, by construction. Person names (NER) are the exception.

"person" is optional: it needs presidio-analyzer and an installed spaCy English model, neither of which is a
dependency of tunelab.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable

import phonenumbers

from tunelab.errors import TunelabError

PII_TYPES: tuple[str, ...] = ("email", "phone", "credit_card", "ip", "iban", "url_credentials", "person")
PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "ip": "<IP_ADDRESS>",
    "iban": "<IBAN>",
    "url_credentials": "<CREDENTIALS>",
    "person": "<PERSON>",
}
# "person" needs an NER model that tunelab does not ship, so it is opt-in.
DEFAULT_TYPES: tuple[str, ...] = tuple(pii_type for pii_type in PII_TYPES if pii_type != "person")

# Why this order: see the module docstring.
_RUN_ORDER: tuple[str, ...] = ("url_credentials", "email", "iban", "ip", "credit_card", "phone", "person")

Span = tuple[int, int]
SpanFinder = Callable[[str], list[Span]]

# --- url_credentials ------------------------------------------------------------------------------------------------
# `scheme://user:password@` with an optional empty user (`redis://:secret@host`). The password may itself contain `@`
# or `:` (people paste them unencoded); the greedy password stops at the last `@` before the path starts.
_URL_CREDENTIALS = re.compile(
    r"\b[A-Za-z][A-Za-z0-9+.\-]*://(?P<credentials>[^\s:/?#@]+:[^\s/?#]*|:[^\s/?#]+)@",
)

# --- email ----------------------------------------------------------------------------------------------------------
# Dot-atom local part with the characters real addresses use (letters, digits, `_ % + -`, dots between atoms) and a
# domain of DNS labels ending in an alphabetic TLD. Deliberately not matched: `user@localhost` and `user@10.0.0.1`
# (no public TLD: these are system accounts, not people), quoted local parts, and non-ASCII addresses.
_EMAIL = re.compile(
    # Starts with a letter, digit or underscore, so a hyphen that joins it to the previous word stays outside.
    r"(?<![A-Za-z0-9_%+.])"
    r"[A-Za-z0-9_][A-Za-z0-9_%+\-]*(?:\.[A-Za-z0-9_%+\-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
    # Not inside a word or a local part ("a@b.cox+y@c.de" holds no "a@b.co"); a hyphen may follow ("a@b.com-related").
    r"(?![A-Za-z0-9_%+])",
)

# --- iban -----------------------------------------------------------------------------------------------------------
# Country code, two check digits, then the BBAN either unbroken or in groups of four separated by single spaces (the
# paper format). Upper case only: lower-case "IBANs" are rare and the shape would match ordinary words far more often.
_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}"
    r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)"
    r"(?![A-Za-z0-9])",
)
# Total IBAN length per country, from the SWIFT IBAN registry. Countries not listed are not IBAN countries, so a
# string that starts with their code is not an IBAN however its checksum comes out.
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip

# --- credit_card ----------------------------------------------------------------------------------------------------
# A maximal run of digit groups joined by single spaces or dashes; which groups form a card is decided in code
# (`_find_card_spans`). Not inside a word or a decimal number, and not right after an IBAN-like prefix ("DE89 "), so
# the digits of an IBAN that failed its checksum stay as they are.
_DIGIT_RUN = re.compile(
    r"(?<!\w)(?<![0-9][.,\-])(?<![A-Z]{2}[0-9]{2} )"
    r"[0-9]+(?:[ \-][0-9]+)*"
    r"(?!\w)(?![.,][0-9])",
)
_GROUP = re.compile(r"[0-9]+")
# Issuer prefixes start with 2 (Mastercard 2-series), 3 (Amex, Diners, JCB), 4 (Visa), 5 (Mastercard, Maestro) or
# 6 (Discover, UnionPay, Maestro); other leading digits are far more often order or tracking numbers.
_CARD_FIRST_DIGITS = frozenset("23456")

# --- ip -------------------------------------------------------------------------------------------------------------
# Not part of a longer dotted number (a version such as 1.2.3.4.5) nor glued to a word (v1.2.3.4).
_IPV4 = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?!\w)(?!\.[0-9])")
# Hex groups with at least two colons, optionally ending in a dotted IPv4 (::ffff:192.0.2.1); `ipaddress` decides.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![\w:])(?!\.[0-9])",
)

# --- phone ----------------------------------------------------------------------------------------------------------
# Cheap pre-check: a phone number has at least 7 digits with at most a few separators between neighbours. `\d`, as
# phonenumbers also reads non-ASCII digits.
_SEVEN_DIGIT_RUN = re.compile(r"\d(?:[ \t\-./()\[\]]{0,3}\d){6}")
_PHONE_DIGIT_GROUP = re.compile(r"\d+")
_DATE_SHAPED = re.compile(r"[0-9]{4}[-/.][0-9]{1,2}[-/.][0-9]{1,2}|[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{2,4}")
# Numbers right after these are amounts or ids ("#4155552671", "$4155552671"), the tail of a longer number or word
# ("a426614174000" in a UUID), or after "DE89 " the digits of an IBAN that failed its checksum.
_NOT_A_PHONE_BEFORE = re.compile(r"(?:[#$€£¥№]|\w|[0-9][ \-.]|[A-Z]{2}[0-9]{2} ?)$")
_NOT_A_PHONE_AFTER = re.compile(r"\w|[\-.][0-9]")  # glued to a word, or the head of a longer dotted/dashed number

# --- person ---------------------------------------------------------------------------------------------------------
_SPACY_ENGLISH_MODELS: tuple[str, ...] = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
_PLACEHOLDER_TOKEN = re.compile("|".join(re.escape(placeholder) for placeholder in PLACEHOLDERS.values()))
_PERSON_UNAVAILABLE = (
    "data.pii: 'person' needs presidio-analyzer and a spaCy English model: pip install presidio-analyzer, then "
    "python -m spacy download en_core_web_sm (or pip install that model's wheel); or drop 'person' from data.pii"
)


class PiiScrubber:
    """Replace PII in text by typed placeholders (`PLACEHOLDERS`) and count what was replaced, per type.

    One instance compiles everything once (and loads the NER model once, for "person"); call it on every row.

    Args:
        types: which PII types to look for, from `PII_TYPES`; a single string is taken as one type.
            Defaults to every type except "person".
        region: ISO 3166 two-letter region used to read phone numbers written without a `+` country code.

    Raises:
        TunelabError: a type is unknown, the region is unknown, or "person" is asked for but presidio-analyzer or a
            spaCy English model is not installed.
    """

    def __init__(self, types: Iterable[str] = DEFAULT_TYPES, region: str = "US") -> None:
        requested = {types} if isinstance(types, str) else set(types)
        for pii_type in sorted(requested):
            if pii_type not in PII_TYPES:
                raise TunelabError(_unknown_name_message("type", pii_type, PII_TYPES))
        region_code = region.upper()
        if region_code not in phonenumbers.SUPPORTED_REGIONS:
            raise TunelabError(
                f"data.pii: unknown phone region {region!r}; use a two-letter ISO 3166 code such as 'US', 'GB' or 'DE'"
            )
        self.types: tuple[str, ...] = tuple(pii_type for pii_type in PII_TYPES if pii_type in requested)
        self.region: str = region_code
        finders: dict[str, SpanFinder] = {
            "url_credentials": _find_url_credential_spans,
            "email": _find_email_spans,
            "iban": _find_iban_spans,
            "credit_card": _find_card_spans,
            "ip": _find_ip_spans,
            "phone": self._find_phone_spans,
        }
        if "person" in requested:
            finders["person"] = _build_person_finder()
        self._pattern_detectors: list[tuple[str, SpanFinder]] = [
            (pii_type, finders[pii_type]) for pii_type in _RUN_ORDER if pii_type in requested and pii_type != "person"
        ]
        self._find_person_spans: SpanFinder | None = finders.get("person")

    def __call__(self, text: str) -> tuple[str, Counter[str]]:
        """Return `text` with every PII span replaced by its placeholder, and how many spans of each type were found.

        Text without PII comes back unchanged (the same characters), and scrubbing a scrubbed text changes nothing.
        """
        counts: Counter[str] = Counter()
        # Every span found holds a digit, `@` or `:` and no placeholder does, so each pass that replaces something
        # leaves fewer of them and the loop ends. Clean text costs one pass, text with PII two (the second finds none).
        found_something = True
        while found_something:
            found_something = False
            for pii_type, find_spans in self._pattern_detectors:
                spans = find_spans(text)
                if spans:
                    text = _replace_spans(text, spans, PLACEHOLDERS[pii_type])
                    counts[pii_type] += len(spans)
                    found_something = True
        # NER is costly and statistical (not repeatable to a fixed point), so person names get exactly one pass.
        if self._find_person_spans is not None:
            spans = self._find_person_spans(text)
            if spans:
                text = _replace_spans(text, spans, PLACEHOLDERS["person"])
                counts["person"] += len(spans)
        return text, counts

    def _find_phone_spans(self, text: str) -> list[Span]:
        """Phone numbers found by `phonenumbers`, with guards against the numbers that are not phones.

        `phonenumbers`' VALID leniency only accepts numbers in assigned ranges, so it misses the fictional numbers
        used everywhere in examples and test data (555-123-4567: 555 is no US area code), which synthetic fine-tuning
        data is full of. So we take two kinds of match:
        - matches that VALID leniency also accepts (assigned range, national prefix where the region needs one),
          however written, including as a bare run of digits - the call libphonenumber itself makes;
        - POSSIBLE leniency matches (right length for the region) only with 10+ digits AND written the way phone
          numbers are: a `+` country code, parentheses, or digit groups exactly as the region formats that number
          (555-123-4567, 555.123.4567). That drops "12-34-56-78-90", "1 234 567 890" and bare ids like 5551234567.
        Neither kind is kept with fewer than 7 digits, in a date shape, after `#` or a currency sign, or glued to a word
        or a longer number.
        """
        if not _SEVEN_DIGIT_RUN.search(text):
            return []
        spans: list[Span] = []
        for match in phonenumbers.PhoneNumberMatcher(text, self.region, leniency=phonenumbers.Leniency.POSSIBLE):
            if not _stands_alone_as_phone(text, match, spans[-1][1] if spans else 0):
                continue
            raw = match.raw_string
            digit_groups = _PHONE_DIGIT_GROUP.findall(raw)
            written_like_a_phone = sum(len(group) for group in digit_groups) >= 10 and (
                raw.startswith("+") or ("(" in raw and ")" in raw) or _grouped_like_a_phone(digit_groups, match.number)
            )
            # Re-matching only the raw string with VALID leniency costs far less than a second pass over the text.
            if written_like_a_phone or any(
                valid.raw_string == raw
                for valid in phonenumbers.PhoneNumberMatcher(raw, self.region, leniency=phonenumbers.Leniency.VALID)
            ):
                spans.append((match.start, match.end))
        return spans


def _unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """One-line error for an unknown name, with the closest valid one when there is a close one."""
    choices = tuple(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"data.pii: unknown {kind} {name!r}; {hint}choose from {', '.join(choices)}"


def _replace_spans(text: str, spans: list[Span], placeholder: str) -> str:
    """Replace each (start, end) span of `text`, sorted and non-overlapping, by `placeholder`."""
    pieces: list[str] = []
    previous_end = 0
    for start, end in spans:
        pieces.append(text[previous_end:start])
        pieces.append(placeholder)
        previous_end = end
    pieces.append(text[previous_end:])
    return "".join(pieces)


def _find_url_credential_spans(text: str) -> list[Span]:
    """The `user:password` part of URLs; scheme and host stay, so the text still reads as a URL."""
    if "://" not in text:
        return []
    return [match.span("credentials") for match in _URL_CREDENTIALS.finditer(text)]


def _find_email_spans(text: str) -> list[Span]:
    """E-mail addresses (see `_EMAIL` for what is deliberately not an address)."""
    if "@" not in text:
        return []
    return [match.span() for match in _EMAIL.finditer(text)]


def _iban_checksum_ok(compact_iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod-97-10: move the first four characters to the end, letters to 10..35, remainder 1."""
    rearranged = compact_iban[4:] + compact_iban[:4]
    return int("".join(str(int(character, 36)) for character in rearranged)) % 97 == 1


def _find_iban_spans(text: str) -> list[Span]:
    """IBANs with the registry length for their country and a valid mod-97 checksum."""
    spans: list[Span] = []
    for match in _IBAN.finditer(text):
        candidate = match.group()
        expected_length = _IBAN_LENGTHS.get(candidate[:2])
        if expected_length is None:
            continue
        # A grouped IBAN may be followed by an unrelated short token ("... 7034 OK"); cut at the registry length when
        # that falls on a group boundary.
        end_in_candidate = _index_after_alphanumerics(candidate, expected_length)
        if end_in_candidate is None or (end_in_candidate < len(candidate) and candidate[end_in_candidate] != " "):
            continue
        compact = candidate[:end_in_candidate].replace(" ", "")
        if _iban_checksum_ok(compact):
            spans.append((match.start(), match.start() + end_in_candidate))
    return spans


def _index_after_alphanumerics(candidate: str, count: int) -> int | None:
    """Index just after the `count`-th non-space character of `candidate`, or None when it has fewer."""
    seen = 0
    for index, character in enumerate(candidate):
        if character != " ":
            seen += 1
            if seen == count:
                return index + 1
    return None


def _luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number satisfies."""
    total = 0
    for position, character in enumerate(reversed(digits)):
        digit = int(character)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _card_grouping_ok(group_sizes: list[int]) -> bool:
    """Whether digit groups are laid out as cards are printed: unbroken, 4-4-4-4(-1..4), or Amex/Diners 4-6-5 / 4-6-4."""
    if len(group_sizes) == 1:
        return True
    if all(size == 4 for size in group_sizes[:-1]) and 1 <= group_sizes[-1] <= 4:
        return True
    return group_sizes in ([4, 6, 5], [4, 6, 4])


def _find_card_spans(text: str) -> list[Span]:
    """Payment card numbers: 13-19 digits, card-like grouping with one kind of separator, issuer prefix, Luhn."""
    spans: list[Span] = []
    for run in _DIGIT_RUN.finditer(text):
        if run.end() - run.start() < 13:
            continue
        groups = [(group.start(), group.end()) for group in _GROUP.finditer(text, run.start(), run.end())]
        first = 0
        while first < len(groups):
            card_end = _longest_card_from(text, groups, first)
            if card_end is None:
                first += 1
                continue
            spans.append((groups[first][0], groups[card_end][1]))
            first = card_end + 1
    return spans


def _longest_card_from(text: str, groups: list[Span], first: int) -> int | None:
    """Index of the last group of the longest card number that starts at group `first`, or None."""
    if text[groups[first][0]] not in _CARD_FIRST_DIGITS:
        return None
    best: int | None = None
    group_sizes: list[int] = []
    separators: set[str] = set()
    for last in range(first, len(groups)):
        start, end = groups[last]
        if last > first:
            separators.add(text[groups[last - 1][1]])
        group_sizes.append(end - start)
        # Cheap exits first (long runs of numbers are common in tables): one kind of separator, grouped cards start
        # with a group of four, and no card has more than 19 digits.
        if len(separators) > 1 or (len(group_sizes) > 1 and group_sizes[0] != 4) or sum(group_sizes) > 19:
            break
        if (
            sum(group_sizes) >= 13
            and _card_grouping_ok(group_sizes)
            and _luhn_ok("".join(text[group_start:group_end] for group_start, group_end in groups[first : last + 1]))
        ):
            best = last
    return best


def _find_ip_spans(text: str) -> list[Span]:
    """IPv6 then IPv4 addresses that `ipaddress` accepts (see `_ipv6_plausible` for what is skipped on purpose)."""
    spans: list[Span] = []
    if "::" in text or text.count(":") >= 7:
        for match in _IPV6.finditer(text):
            candidate, start = match.group(), match.start()
            if candidate.endswith(":") and not candidate.endswith("::"):
                candidate = candidate[:-1]  # "2001:db8::1: unreachable" - the colon is punctuation
            if _ipv6_plausible(candidate):
                spans.append((start, start + len(candidate)))
    if "." in text:
        ipv4_spans = [match.span() for match in _IPV4.finditer(text) if _parses(ipaddress.IPv4Address, match.group())]
        if ipv4_spans:
            # Only the tail of an IPv4-mapped IPv6 address can overlap, and that address is already in `spans`.
            spans.extend(span for span in ipv4_spans if not any(start <= span[0] < end for start, end in spans))
            spans.sort()
    return spans


def _parses(address_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address], candidate: str) -> bool:
    """Whether `ipaddress` accepts `candidate` as an address of `address_type`."""
    try:
        address_type(candidate)
    except ValueError:
        return False
    return True


def _ipv6_plausible(candidate: str) -> bool:
    """A valid IPv6 address that is not more likely something else.

    Skipped on purpose: strings without a decimal digit ("::", "dead::beef", C++ scopes), MAC/EUI-64 strings (eight
    groups of two hex digits, no "::"), and short forms whose groups are all one or two characters ("::2", "1::2"),
    which are Python slices far more often than addresses - "::1" (loopback) is not personal data anyway.
    """
    if not any(character.isdigit() for character in candidate) or not _parses(ipaddress.IPv6Address, candidate):
        return False
    groups = [group for group in re.split(r"[:.]", candidate) if group]
    if "::" not in candidate and all(len(group) == 2 for group in groups):
        return False
    return max((len(group) for group in groups), default=0) >= 3


def _stands_alone_as_phone(text: str, match: phonenumbers.PhoneNumberMatch, previous_phone_end: int) -> bool:
    """Whether a phone match is not a date, an amount, an id, or a piece of a longer number or word.

    What comes before is read as it will be once the previous phone number (ending at `previous_phone_end`) is a
    placeholder, so "555-123-4567 555-123-4567" is two numbers, not one number followed by a piece of another.
    """
    raw = match.raw_string
    if sum(len(group) for group in _PHONE_DIGIT_GROUP.findall(raw)) < 7 or _DATE_SHAPED.fullmatch(raw):
        return False
    context_start = max(0, match.start - 5)
    if previous_phone_end > context_start:
        before = PLACEHOLDERS["phone"] + text[previous_phone_end : match.start]
    else:
        before = text[context_start : match.start]
    return not (_NOT_A_PHONE_BEFORE.search(before) or _NOT_A_PHONE_AFTER.match(text, match.end))


def _grouped_like_a_phone(digit_groups: list[str], number: phonenumbers.PhoneNumber) -> bool:
    """Whether the digit groups as written are those of the number's national or international format.

    A leading country code or trunk prefix group written before the national format ("1-555-123-4567") is allowed.
    """
    written = [len(group) for group in digit_groups]
    for number_format in (phonenumbers.PhoneNumberFormat.NATIONAL, phonenumbers.PhoneNumberFormat.INTERNATIONAL):
        formatted = [len(group) for group in _PHONE_DIGIT_GROUP.findall(phonenumbers.format_number(number, number_format))]
        if len(formatted) > 1 and (written == formatted or (written[1:] == formatted and written[0] <= 3)):
            return True
    return False


def _build_person_finder() -> SpanFinder:
    """Person names via presidio-analyzer's spaCy recognizer, restricted to PERSON.

    Checks for an installed model first: presidio would otherwise try to download one, which fails offline.
    NER is statistical, so unlike the other detectors a second pass is not guaranteed to find nothing new.

    Raises:
        TunelabError: presidio-analyzer, spaCy or an English spaCy model is not installed.
    """
    try:
        import spacy.util
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpEngineProvider
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer
    except ImportError as error:
        raise TunelabError(_PERSON_UNAVAILABLE) from error
    model_name = next((name for name in _SPACY_ENGLISH_MODELS if spacy.util.is_package(name)), None)
    if model_name is None:
        raise TunelabError(_PERSON_UNAVAILABLE)
    nlp_engine = NlpEngineProvider(
        nlp_configuration={"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model_name}]}
    ).create_engine()
    registry = RecognizerRegistry(recognizers=[SpacyRecognizer(supported_entities=["PERSON"])], supported_languages=["en"])
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])

    def find_person_spans(text: str) -> list[Span]:
        placeholders = [match.span() for match in _PLACEHOLDER_TOKEN.finditer(text)]
        spans: list[Span] = []
        for result in sorted(analyzer.analyze(text=text, entities=["PERSON"], language="en"), key=lambda r: r.start):
            overlaps_placeholder = any(result.start < end and start < result.end for start, end in placeholders)
            if overlaps_placeholder or (spans and result.start < spans[-1][1]):
                continue
            spans.append((result.start, result.end))
        return spans

    return find_person_spans
