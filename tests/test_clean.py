"""Text cleaning: each fix on realistic dirty strings, text that is not HTML (comparisons, generics, placeholders, code,
markdown) left alone, code indentation kept, and property tests: idempotent, clean text unchanged with no fixes, never
raises on arbitrary text."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.clean import FIX_NAMES, CleanOptions, clean_text

SCRAPED_ANSWER = (
    "<p>You can use the join method for this:</p>\r\n"
    "<ul>\r\n  <li>It&#39;s <strong>faster</strong> than <em>+=</em> in a loop</li>\r\n"
    "  <li>It works with any iterable</li>\r\n</ul>\r\n"
    '<p>See the <a href="https://docs.python.org/3/library/stdtypes.html#str.join">docs</a>&nbsp;for details.<br/>'
    "Hope this helps!</p>\r\n"
)

MARKDOWN = """# Installing

Run **one** command, then check the [docs](https://example.com/docs?a=1&b=2):

- item one
- item *two* -> done

> Quoted text with a < b and c > d.

| column | value |
|--------|-------|
| x<y    | 1     |

Use `<br>` for a line break and `&amp;` for an ampersand, or `List<String>` in Java.

```html
<p>Hello <b>world</b></p>
&nbsp;
```

~~~
</div>   indented fence content
~~~

Autolink: <https://example.com>"""

PYTHON_CODE = '''import os


class Config:
    """Settings."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("empty")
        self.path = path  # keep


def main() -> None:
	print(Config("x").path)  # a tab-indented line'''

NOT_HTML = [
    "a < b and c > d",
    "List<String> names = new ArrayList<>();",
    "Map<String, List<Integer>> index;",
    "fn map<U>(self) -> Box<U> where U: Pair<A>",
    "Dear <NAME>, your order <ORDER_ID> ships to <EMAIL>.",
    "if (x<y) { return a<b>c; }",
    "x <- c(1, 2); y <= 3; z >= 4; i << 2 >> 1; a <=> b",
    "I <3 you",
    "a<b and c>d",
    "<!-- a comment --> and <script>alert(1)</script>",
    "Fish & chips; R&D; AT&T; &copy 2020; ?a=1&para=2&not=3; &unknown;",
    "Use &lt;br&gt; to break a line",  # decoding would create a tag; see test_escaped_markup_stays_escaped
    MARKDOWN,
    PYTHON_CODE,
]


def test_scraped_html_answer_becomes_plain_text() -> None:
    text, fixes = clean_text(SCRAPED_ANSWER)
    assert text == (
        "You can use the join method for this:\n\n"
        "- It's faster than += in a loop\n"
        "- It works with any iterable\n\n"
        "See the docs for details.\n"
        "Hope this helps!"
    )
    assert fixes == {"html", "whitespace"}


@pytest.mark.parametrize(
    ("dirty", "clean"),
    [
        (
            "<H1>Heading</H1><DIV>Old <FONT color=red>school</FONT> HTML<BR>next line</DIV>",
            "Heading\n\nOld school HTML\nnext line",
        ),
        ("<table><tr><th>a</th><th>b</th></tr>\n<tr><td>1</td><td>2</td></tr></table>", "a b\n1 2"),
        ("Line one<br>\nLine two<br><br>Line three", "Line one\nLine two\n\nLine three"),
        ("<ol><li>first</li><li>second</li></ol>", "- first\n- second"),
        ("<p>x<sup>2</sup> and H<sub>2</sub>O, <small>fine</small> <center>print</center></p>", "x2 and H2O, fine\nprint"),
        (  # pre and code are not in the list: their content may be code, which the tag list must not guess at
            "<p>Run:</p><pre>ls &amp;&amp; cd</pre><p>Use <code>x &lt; y</code></p>",
            "Run:\n\n<pre>ls && cd</pre>\n\nUse <code>x < y</code>",
        ),
        ("<p>&nbsp;</p><p>Only this.</p>", "Only this."),
        ("<p>Code:</p>\n    x = 1\n    y = 2", "Code:\n\n    x = 1\n    y = 2"),
        (
            "Tom &amp; Jerry &quot;quoted&quot; &#39;single&#39; &#x27;hex&#x27; &eacute;t&eacute; &euro;5",
            "Tom & Jerry \"quoted\" 'single' 'hex' été €5",
        ),
        ("a &lt; b and List&lt;String&gt;", "a < b and List<String>"),
    ],
)
def test_html_fix(dirty: str, clean: str) -> None:
    text, fixes = clean_text(dirty)
    assert text == clean
    assert "html" in fixes


@pytest.mark.parametrize("text", NOT_HTML)
def test_text_that_is_not_html_comes_back_unchanged(text: str) -> None:
    assert clean_text(text) == (text, frozenset())


def test_markdown_code_inside_html_is_not_touched() -> None:
    assert clean_text("<p>Write `<br>` or `a &amp; b`</p>") == ("Write `<br>` or `a &amp; b`", frozenset({"html"}))


def test_escaped_markup_stays_escaped() -> None:
    # Decoding would produce text that a second pass would strip or decode again; keeping it makes cleaning idempotent.
    assert clean_text("&lt;p&gt;Hi&lt;/p&gt; &amp;lt; &amp;amp;")[0] == "&lt;p&gt;Hi&lt;/p&gt; &amp;lt; &amp;amp;"
    assert clean_text("<p>Wrap it in &lt;b&gt; tags &amp; done</p>")[0] == "Wrap it in &lt;b&gt; tags & done"


@pytest.mark.parametrize(
    ("dirty", "clean"),
    [
        ("zero\u200bwidth\u200c space\u2060s", "zerowidth spaces"),
        ("\ufeffHello, BOM", "Hello, BOM"),
        ("bell\x07 null\x00 escape\x1b[0m", "bell null escape[0m"),
        ("don\x92t say \x93hi\x94 \x85", "don’t say “hi” …"),  # C1 controls from Windows-1252 text decoded as Latin-1
        ("a\ud800b\udfffc", "abc"),  # lone surrogates (e.g. from JSON "\\ud800")
        ("a\u200db", "ab"),
    ],
)
def test_control_chars_fix(dirty: str, clean: str) -> None:
    assert clean_text(dirty) == (clean, frozenset({"control_chars"}))


def test_joiners_between_non_ascii_characters_are_kept() -> None:
    for text in ("family: 👨\u200d👩\u200d👧", "می\u200cخواهم", "क्\u200dष"):
        assert clean_text(text) == (text, frozenset())


def test_unicode_fix_composes_to_nfc() -> None:
    text, fixes = clean_text("Cafe\u0301 cre\u0300me")
    assert text == "Caf\u00e9 cr\u00e8me" and len(text) == 10
    assert fixes == {"unicode"}
    assert clean_text("ﬁne ＡＢＣ x²")[0] == "ﬁne ＡＢＣ x²"  # NFC keeps compatibility characters
    assert clean_text("ﬁne ＡＢＣ x²", CleanOptions(unicode="NFKC")) == ("fine ABC x2", frozenset({"unicode"}))
    assert clean_text("Cafe\u0301", CleanOptions(unicode=None)) == ("Cafe\u0301", frozenset())


@pytest.mark.parametrize(
    ("dirty", "clean"),
    [
        ("line one\r\nline two\r\n", "line one\nline two"),
        ("old\rmac\rendings", "old\nmac\nendings"),
        ("100\u00a0km at 5\u202fpm,\u2003em\u3000space", "100 km at 5 pm, em space"),
        ("trailing   \nspaces\t\t\nhere ", "trailing\nspaces\nhere"),
        ("a\n\n\n\n\nb", "a\n\nb"),  # four blank lines become one
        ("\n\n   \n  Title\nbody\n\n\n", "  Title\nbody"),  # blank lines at the ends go, indentation stays
        ("   one line only   ", "one line only"),
        ("\u00a0\u00a0indented with no-break spaces\nnext", "  indented with no-break spaces\nnext"),
    ],
)
def test_whitespace_fix(dirty: str, clean: str) -> None:
    assert clean_text(dirty) == (clean, frozenset({"whitespace"}))


def test_code_indentation_and_two_blank_lines_are_kept() -> None:
    assert clean_text(PYTHON_CODE) == (PYTHON_CODE, frozenset())
    snippet = "    return a + b\n\n\n    # two blank lines above\n        deeper  "
    assert clean_text(snippet) == (snippet.rstrip(), frozenset({"whitespace"}))
    windows_code = PYTHON_CODE.replace("\n", "\r\n") + "   \r\n"
    assert clean_text(windows_code) == (PYTHON_CODE, frozenset({"whitespace"}))


def test_fixes_can_be_switched_off() -> None:
    dirty = "<p>x\u200b</p>\r\n"
    nothing = CleanOptions(html=False, control_chars=False, whitespace=False, unicode=None)
    assert clean_text(dirty, nothing) == (dirty, frozenset())
    assert clean_text(dirty, CleanOptions(html=False)) == ("<p>x</p>", frozenset({"control_chars", "whitespace"}))
    # The closing tag and the line end after it are layout at the end of the text, not content.
    assert clean_text(dirty, CleanOptions(whitespace=False)) == ("x", frozenset({"html", "control_chars"}))


def test_fixes_that_expose_each_other_are_all_applied() -> None:
    # Removing the zero-width space creates a <br>; NFKC turns small less/greater-than signs into a tag.
    assert clean_text("a<\u200bbr>b") == ("a\nb", frozenset({"control_chars", "html"}))
    assert clean_text("a\ufe64br\ufe65b", CleanOptions(unicode="NFKC")) == ("a\nb", frozenset({"unicode", "html"}))


def test_bad_input_is_rejected_with_a_message() -> None:
    with pytest.raises(ValueError, match="unicode must be 'NFC', 'NFKC' or None, got 'NFD'"):
        CleanOptions(unicode="NFD")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clean_text expects a string, got bytes"):
        clean_text(b"bytes")  # type: ignore[arg-type]


markup_heavy = st.lists(
    st.sampled_from(
        [*"<>/&;#brpax -`", "\n", "\t", "\r", "```", "~~~", "<br>", "</p>", "<p>", "<li>", "<b>", "</b>", "<td>", "</tr>",
         '<a href="u">', " href='x'", "&lt;", "&gt;", "&amp;", "&#60;", "&nbsp;", "&#x200b;", "&#13;", "lt", "amp",
         "\u200b", "\u200d", "\u00a0", "\u3000", "e", "\u0301", "é", "\x92", "\x0b", "\ufe64", "\ufe65"]
    ),
    max_size=30,
).map("".join)
any_text = st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=200)
any_options = st.builds(
    CleanOptions,
    unicode=st.sampled_from(["NFC", "NFKC", None]),
    control_chars=st.booleans(),
    whitespace=st.booleans(),
    html=st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(markup_heavy | any_text, any_options)
def test_cleaning_is_idempotent_and_never_raises(text: str, options: CleanOptions) -> None:
    cleaned, fixes = clean_text(text, options)
    assert fixes <= set(FIX_NAMES)
    assert (cleaned == text) == (not fixes)
    assert clean_text(cleaned, options) == (cleaned, frozenset())


clean_line = st.tuples(
    st.sampled_from(["", "", "  ", "    ", "\t"]),
    st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"], exclude_characters="<>&`"), min_size=1, max_size=40),
    st.lists(st.sampled_from(["word", "x = 1", "(a)", "é", "東京", "🙂"]), max_size=4),
).map(lambda parts: (parts[0] + " ".join([parts[1], *parts[2]])).rstrip())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(clean_line, st.just("")), min_size=1, max_size=12))
def test_clean_text_comes_back_unchanged(lines: list[str]) -> None:
    text = "\n".join(lines).strip("\n")
    while "\n\n\n\n" in text:
        text = text.replace("\n\n\n\n", "\n\n\n")
    if "\n" not in text:
        text = text.strip()
    text = unicodedata.normalize("NFC", text)
    assert clean_text(text) == (text, frozenset())
