"""Text cleaning for dataset fields: HTML residue, invisible and control characters, Unicode form, whitespace.

    from tunelab.data.clean import CleanOptions, clean_text
    text, fixes = clean_text(row["response"])                  # fixes: names of the fixes that changed something
    text, fixes = clean_text(code, CleanOptions(html=False))   # leave markup alone

Every fix is conservative, so that text which is already clean -- prose, markdown, code -- comes back unchanged with an
empty fix set: leading indentation is never touched, markdown code spans and fenced blocks are never touched by the
HTML fix, and tags are stripped only from text that shows real HTML (a closing tag, a `<br>`, a tag with attributes), so
`a < b`, `List<String>`, `Box<U>` and `<EMAIL>` survive. `clean_text` is idempotent: cleaning its output again changes
nothing and reports no fixes.
"""

from __future__ import annotations

import functools
import html
import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from html.entities import html5 as HTML5_ENTITIES
from typing import Literal

FIX_NAMES = ("html", "control_chars", "unicode", "whitespace")  # in the order they are applied
_MAX_PASSES = 6  # a bound only: real texts are stable after the first or second pass


@dataclass(frozen=True)
class CleanOptions:
    """Which fixes `clean_text` applies (each one is described in `clean_text`)."""

    unicode: Literal["NFC", "NFKC"] | None = "NFC"
    control_chars: bool = True
    whitespace: bool = True
    html: bool = True

    def __post_init__(self) -> None:
        if self.unicode not in ("NFC", "NFKC", None):
            raise ValueError(f"unicode must be 'NFC', 'NFKC' or None, got {self.unicode!r}")


def clean_text(text: str, options: CleanOptions = CleanOptions()) -> tuple[str, frozenset[str]]:
    """Return the cleaned text and the names of the fixes that changed something (a subset of `FIX_NAMES`).

    - html: decode entities (`&amp;`, `&nbsp;`, `&#39;`; only complete ones, with the semicolon), and, in text that
      shows real HTML, turn `<br>` into a newline, paragraphs and headings into blank lines, `<li>` into "- ", and drop a
      fixed list of formatting tags (p, div, span, b, i, u, em, strong, font, a -- keeping its text --, lists, headings,
      tables, center, small, sup, sub). An entity that would decode into markup (`&lt;br&gt;`, `&amp;lt;`) is kept,
      so that a second pass has nothing left to do.
    - control_chars: drop C0 controls except tab, newline and carriage return (the whitespace fix handles line ends),
      zero-width spaces (U+200B, U+2060, U+FEFF) and lone surrogates; C1 controls become the Windows-1252 characters
      they almost always are (U+0092 -> "’", as HTML does for `&#146;`) or are dropped; zero-width (non-)joiners are
      kept only between two non-ASCII characters, where they shape scripts and emoji sequences.
    - unicode: normalize to NFC (é as one code point) or NFKC (also fullwidth forms, ligatures, superscripts).
    - whitespace: line ends to "\\n", no-break and other Unicode spaces to " ", trailing spaces and tabs of every line
      removed, three or more blank lines collapsed to one, blank lines at both ends removed. Leading indentation is
      kept, except on a text of a single line, which is stripped on both sides.

    Raises:
        TypeError: if `text` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_text expects a string, got {type(text).__name__}")
    fixes = _enabled_fixes(options)
    applied: set[str] = set()
    # One fix can expose work for another (a zero-width space inside "<\u200bbr>", NFKC turning "﹤br﹥" into "<br>"),
    # so passes repeat until nothing changes. The second pass almost always confirms the first.
    for _ in range(_MAX_PASSES):
        before = text
        for name, fix in fixes:
            fixed = fix(text)
            if fixed != text:
                applied.add(name)
                text = fixed
        if text == before:
            break
    return text, frozenset(applied)


def _enabled_fixes(options: CleanOptions) -> list[tuple[str, Callable[[str], str]]]:
    fixes: list[tuple[str, Callable[[str], str]]] = []
    if options.html:
        fixes.append(("html", _fix_html))
    if options.control_chars:
        fixes.append(("control_chars", _remove_control_chars))
    if options.unicode is not None:
        fixes.append(("unicode", functools.partial(_normalize_unicode, form=options.unicode)))
    if options.whitespace:
        fixes.append(("whitespace", _normalize_whitespace))
    return fixes


def _normalize_unicode(text: str, form: Literal["NFC", "NFKC"]) -> str:
    return text if unicodedata.is_normalized(form, text) else unicodedata.normalize(form, text)


# ---------------------------------------------------------------------------------------------------------- control chars

_ALWAYS_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u2060\ufeff\ud800-\udfff]+")
_C1_CONTROL = re.compile("[\x80-\x9f]")
_JOINERS = re.compile("[\u200c\u200d]+")


def _windows_1252_character(c1_control: str) -> str:
    try:
        return bytes([ord(c1_control)]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned in Windows-1252
        return ""


_C1_REPLACEMENTS = {chr(code): _windows_1252_character(chr(code)) for code in range(0x80, 0xA0)}


def _remove_control_chars(text: str) -> str:
    text = _ALWAYS_INVISIBLE.sub("", text)
    text = _C1_CONTROL.sub(lambda match: _C1_REPLACEMENTS[match.group()], text)
    return _JOINERS.sub(lambda match: match.group() if _joins_non_ascii(text, match.start(), match.end()) else "", text)


def _joins_non_ascii(text: str, start: int, end: int) -> bool:
    """Whether the joiner run text[start:end] sits between two non-ASCII, non-space characters (Persian ZWNJ, emoji ZWJ)."""
    if start == 0 or end == len(text):
        return False
    before, after = text[start - 1], text[end]
    return not (before.isascii() or after.isascii() or before.isspace() or after.isspace())


# ------------------------------------------------------------------------------------------------------------- whitespace

_LINE_END = re.compile("\r\n?|[\u2028\u2029]")
_UNICODE_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile("[ \t]+$", re.MULTILINE)
_THREE_OR_MORE_BLANK_LINES = re.compile("\n{4,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _normalize_whitespace(text: str) -> str:
    text = _LINE_END.sub("\n", text)
    # One space per Unicode space, so indentation made of no-break spaces keeps its width.
    text = _UNICODE_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    # Two blank lines survive: PEP 8 puts them between top-level definitions.
    text = _THREE_OR_MORE_BLANK_LINES.sub("\n\n", text)
    text = _LEADING_BLANK_LINES.sub("", text).rstrip(" \t\n")
    if "\n" not in text:
        # One line has no indentation to keep: its leading spaces are scraping residue, not code structure.
        text = text.lstrip(" \t")
    return text


# ------------------------------------------------------------------------------------------------------------------- html

_SPACE = "[ \t\n\r\f]"  # HTML whitespace; not \s, which also matches no-break spaces inside prose
_ATTRIBUTE = rf"{_SPACE}+[A-Za-z_:][-A-Za-z0-9_:.]*{_SPACE}*={_SPACE}*(?:\"[^\"<>]*\"|'[^'<>]*'|[^ \t\n\r\f\"'=<>`]+)"
_TAG_NAMES = "p|div|span|b|i|u|em|strong|font|a|ul|ol|li|h[1-6]|table|thead|tbody|tfoot|tr|td|th|center|small|sup|sub|br"
# Attributes must have a value, so `a<b and c>d` is not a <b> tag with attributes "and" and "c".
_TAG = re.compile(rf"<(?P<closing>/?)(?P<name>{_TAG_NAMES})(?P<attributes>(?:{_ATTRIBUTE})*){_SPACE}*/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_FENCED_CODE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[`~]*[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.DOTALL)

_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6"})
_LINE_TAGS = frozenset({"div", "ul", "ol", "table", "thead", "tbody", "tfoot", "tr", "center"})
_CELL_TAGS = frozenset({"td", "th"})


@dataclass(frozen=True)
class _BreakMarkers:
    """Private-use characters absent from the text that stand for layout while tags are replaced; `_resolve_breaks`
    turns runs of them and the whitespace around them into newlines, because HTML whitespace next to a block tag is
    not content but `<li>a</li>\\n<li>b</li>` should still give one line per item."""

    line_break: str  # <br>: one newline each
    line: str  # block element: at least one newline
    paragraph: str  # paragraph or heading: at least one blank line
    cell: str  # end of a table cell: a space

    @property
    def all(self) -> str:
        return self.line_break + self.line + self.paragraph + self.cell


def _fix_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    segments = _split_code(text)
    markers = _pick_markers(text)
    if markers is not None and any(
        _is_html_evidence(match) for segment, is_code in segments if not is_code for match in _TAG.finditer(segment)
    ):
        stripped = "".join(
            segment if is_code else _decode_entities(_replace_tags(segment, markers)) for segment, is_code in segments
        )
        return _resolve_breaks(stripped, markers)
    return "".join(segment if is_code else _decode_entities(segment) for segment, is_code in segments)


def _split_code(text: str) -> list[tuple[str, bool]]:
    """The text as (segment, is_markdown_code) pieces: fenced code blocks and inline code spans are code."""
    segments: list[tuple[str, bool]] = []
    position = 0
    for fence in _FENCED_CODE.finditer(text):
        segments.extend(_split_inline_code(text[position : fence.start()]))
        segments.append((fence.group(), True))
        position = fence.end()
    segments.extend(_split_inline_code(text[position:]))
    return segments


def _split_inline_code(text: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    position = 0
    for span in _INLINE_CODE.finditer(text):
        segments.append((text[position : span.start()], False))
        segments.append((span.group(), True))
        position = span.end()
    segments.append((text[position:], False))
    return segments


def _is_html_evidence(tag: re.Match[str]) -> bool:
    # An opening tag without attributes could be a generic type (Box<U>, Pair<A>); these never are.
    return bool(tag.group("closing") or tag.group("attributes")) or tag.group("name").lower() == "br"


def _pick_markers(text: str) -> _BreakMarkers | None:
    unused = (chr(code) for code in itertools.chain(range(0xE000, 0xF900), range(0xF0000, 0xFFFFE)) if chr(code) not in text)
    chosen = [next(unused, None) for _ in range(4)]
    return None if None in chosen else _BreakMarkers(*chosen)  # a text holding ~72k private-use characters: not HTML


def _replace_tags(segment: str, markers: _BreakMarkers) -> str:
    def replacement(tag: re.Match[str]) -> str:
        name, closing = tag.group("name").lower(), bool(tag.group("closing"))
        if name == "br":
            return markers.line_break
        if name == "li":
            return markers.line if closing else markers.line + "- "
        if name in _PARAGRAPH_TAGS:
            return markers.paragraph
        if name in _LINE_TAGS:
            return markers.line
        if name in _CELL_TAGS:
            return markers.cell if closing else ""
        return ""  # inline formatting: keep the text, drop the tag

    # Removing a tag can join its neighbours into a new one ("<<b>br</b>>"), so repeat until none is left.
    while True:
        replaced = _TAG.sub(replacement, segment)
        if replaced == segment:
            return segment
        segment = replaced


def _resolve_breaks(text: str, markers: _BreakMarkers) -> str:
    run_of_breaks = re.compile(f"[ \t\r\n]*[{markers.all}][ \t\r\n{markers.all}]*")

    def replacement(run: re.Match[str]) -> str:
        layout = run.group()
        last_newline = layout.rfind("\n")
        last_marker = max(layout.rfind(marker) for marker in markers.all)
        # Spaces after the run's last source newline indent the next line (markdown or code mixed into the HTML).
        indentation = layout[last_newline + 1 :] if last_newline > last_marker else ""
        if run.start() == 0 or run.end() == len(text):
            return indentation if run.start() == 0 else ""
        if markers.paragraph in layout:
            block_newlines = 2
        elif markers.line in layout:
            block_newlines = 1
        elif markers.line_break not in layout:
            return " "  # only ends of table cells: cells of one row stay on one line
        else:
            block_newlines = 0
        # A blank line typed into the source survives (capped at one, as the whitespace fix would anyway).
        return "\n" * max(block_newlines, layout.count(markers.line_break), min(layout.count("\n"), 2)) + indentation

    return run_of_breaks.sub(replacement, text)


def _decode_entities(segment: str) -> str:
    """Decode complete, known entities, except those whose decoded character would form a tag or an entity with its
    neighbours (`&lt;br&gt;` -> "<br>", `&amp;lt;` -> "&lt;"): those are kept, or a second pass would change the text."""
    pieces: list[str] = []
    originals: dict[int, str] = {}  # piece index -> the entity it decodes
    position = 0
    for entity in _ENTITY.finditer(segment):
        value = _entity_value(entity.group())
        if value is None:
            continue
        pieces.append(segment[position : entity.start()])
        originals[len(pieces)] = entity.group()
        pieces.append(value)
        position = entity.end()
    if not originals:
        return segment
    pieces.append(segment[position:])
    while True:
        decoded_spans = []
        offset = 0
        for index, piece in enumerate(pieces):
            if index in originals and piece != originals[index]:
                decoded_spans.append((offset, offset + len(piece), index))
            offset += len(piece)
        joined = "".join(pieces)
        markup = [match.span() for pattern in (_TAG, _ENTITY) for match in pattern.finditer(joined)]
        to_restore = {
            index
            for start, end, index in decoded_spans
            for markup_start, markup_end in markup
            if (start < markup_end and markup_start < end) or (start == end and markup_start < start < markup_end)
        }
        if not to_restore:
            return joined
        for index in to_restore:
            pieces[index] = originals[index]


def _entity_value(entity: str) -> str | None:
    if entity[1] != "#" and entity[1:] not in HTML5_ENTITIES:
        return None  # "&foo;" is text, not an entity
    return html.unescape(entity)
