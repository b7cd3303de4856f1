"""Generate the tunelab demo dataset: support-ticket extraction.

Task: given a short customer email/chat message sent to an online electronics
and home-goods store, extract a structured ticket as one line of JSON. Each row
uses the ``prompt_response`` format, one JSON object per line::

    {"prompt": "<instruction>\\nMessage: <customer message>",
     "response": "{\\"product\\": ..., \\"category\\": ..., \\"urgency\\": ..., \\"order_id\\": ...}"}

The response is compact JSON with keys in this exact order:

* ``product``  -- canonical product name; it always appears verbatim in the message.
* ``category`` -- one of billing | shipping | defect | account | return.
* ``urgency``  -- high (explicit urgency cues), low (explicitly relaxed), else medium.
* ``order_id`` -- a letter followed by 5 digits (e.g. "A48213", no '#'), exactly as
  it appears in the message, or null when the message mentions no order id.

Output (overwritten on every run), in ``src/tunelab/demo/data/``:
``train.jsonl`` (320 rows), ``validation.jsonl`` (40 rows), ``test.jsonl`` (60 rows).
Generation is fully deterministic (``random.Random(2026)``) and no customer message
appears in more than one split (messages are unique across the whole dataset).

Run from the repository root (stdlib only, Python 3.11+)::

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

SEED = 2026
SPLITS: dict[str, int] = {"train": 320, "validation": 40, "test": 60}
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "tunelab" / "demo" / "data"
MAX_WORDS = 45

INSTRUCTION = (
    "Extract the ticket as JSON with keys product, category "
    "(billing|shipping|defect|account|return), urgency (low|medium|high), "
    "order_id (string or null)."
)

CATEGORIES = ["billing", "shipping", "defect", "account", "return"]
URGENCY_SHARE = {"high": 0.30, "medium": 0.45, "low": 0.25}

# (canonical name, is_plural). Capability tags below keep defect wording realistic.
PRODUCTS: list[tuple[str, bool]] = [
    ("wireless earbuds", True),
    ("standing desk", False),
    ("espresso machine", False),
    ("4K monitor", False),
    ("robot vacuum", False),
    ("air fryer", False),
    ("mechanical keyboard", False),
    ("smart thermostat", False),
    ("noise-cancelling headphones", True),
    ("gaming mouse", False),
    ("electric kettle", False),
    ("office chair", False),
    ("blender", False),
    ("smartwatch", False),
    ("laptop stand", False),
    ("Bluetooth speaker", False),
    ("air purifier", False),
    ("coffee grinder", False),
    ("desk lamp", False),
    ("external hard drive", False),
    ("USB-C hub", False),
    ("portable charger", False),
    ("webcam", False),
    ("stand mixer", False),
    ("security camera", False),
    ("e-reader", False),
]

UNPOWERED = {"office chair", "laptop stand"}
BATTERY = {
    "wireless earbuds", "noise-cancelling headphones", "smartwatch", "portable charger",
    "e-reader", "robot vacuum", "gaming mouse", "Bluetooth speaker", "security camera",
}
CONNECTED = {
    "wireless earbuds", "noise-cancelling headphones", "mechanical keyboard", "gaming mouse",
    "smart thermostat", "smartwatch", "Bluetooth speaker", "4K monitor", "USB-C hub", "webcam",
    "security camera", "robot vacuum", "external hard drive", "air purifier",
}
TAG_OK = {
    "power": lambda p: p not in UNPOWERED,
    "battery": lambda p: p in BATTERY,
    "connected": lambda p: p in CONNECTED,
}

# Noun phrases wrapping the canonical product name (never sentence-initial bare).
NP_FORMS = [
    "my {p}",
    "my {p}",
    "the {p}",
    "the {p}",
    "my new {p}",
    "the new {p}",
    "the {p} I ordered",
    "the {p} I bought last week",
    "our {p}",
    "the {p} I got last month",
]
# Used where the template already says when/how the item was bought.
NP_SHORT = ["my {p}", "the {p}", "my new {p}", "the new {p}", "our {p}"]
NEEDS_SHORT_NP = re.compile(r"(bought|received|ordered|got) \{np\}|\{n\} days")

# Grammar tokens: (singular, plural)
GRAMMAR = {
    "it": ("it", "they"),
    "them": ("it", "them"),
    "is": ("is", "are"),
    "isnt": ("isn't", "aren't"),
    "was": ("was", "were"),
    "has": ("has", "have"),
    "hasnt": ("hasn't", "haven't"),
    "doesnt": ("doesn't", "don't"),
    "s": ("s", ""),
    "es": ("es", ""),
}

# Templates: {np} product phrase, {ord} order phrase (id or generic "my order"),
# {n} small number, {amt} dollar amount, {day} weekday, plus GRAMMAR tokens.
# A leading "[tag]" restricts a template to products passing TAG_OK[tag].
TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for {np}.",
        "I see two identical charges on my statement for {np}.",
        "The amount charged for {np} doesn't match the price shown at checkout.",
        "I was charged ${amt} more than the listed price for {np}.",
        "I still haven't received the refund you promised for {np}.",
        "Can you send me an invoice for {np}? I need it for my expense report.",
        "My coupon code wasn't applied when I paid for {np}.",
        "The discount shown on the product page for {np} wasn't applied at checkout.",
        "I was billed for {np} but I cancelled {ord} before it shipped.",
        "There's a charge on my credit card for {np} that I don't recognize.",
        "The invoice for {ord} lists the wrong price for {np}.",
        "My payment for {np} went through, but {ord} still says payment pending.",
        "You charged me sales tax twice on {np}.",
        "The price of {np} dropped {n} days after I bought {them}. Can I get the difference refunded?",
        "I paid for {np} with a gift card, but my credit card was charged instead.",
        "My refund for {np} was only partial; ${amt} is still missing.",
        "Could you resend the receipt for {ord}? I need it to expense {np}.",
    ],
    "shipping": [
        "{np} still {hasnt} arrived and it's been over a week.",
        "The tracking for {np} hasn't updated in {n} days.",
        "{np} {was} supposed to be delivered on {day} but nothing showed up.",
        "I think {np} got lost in transit.",
        "Tracking says {np} {was} delivered, but {it} {isnt} at my door.",
        "I entered the wrong shipping address for {np}. Can you update it before {ord} ships?",
        "{np} went to my old address instead of the new one.",
        "Can you tell me when {np} will ship? The estimated date has already passed.",
        "The courier left {np} at the wrong house.",
        "Only part of {ord} arrived; {np} {was} missing from the box.",
        "I paid for express shipping on {np}, but it's taking the standard time.",
        "Your site says {np} shipped, but the tracking number doesn't work.",
        "The delivery of {np} keeps getting rescheduled.",
        "{ord} shows as delivered to a different city, and {np} never reached me.",
        "Could you change the delivery date for {np}? I'm away until {day}.",
    ],
    "defect": [
        "[power]{np} won't turn on.",
        "[power]{np} stopped working after {n} days.",
        "[power]{np} make{s} a loud grinding noise when I use {them}.",
        "{np} arrived with a crack along the side.",
        "[connected]{np} keep{s} disconnecting every few minutes.",
        "[power]One of the buttons on {np} is stuck.",
        "[power]{np} overheat{s} after about ten minutes of use.",
        "[battery]{np} {isnt} charging anymore.",
        "[battery]{np} turn{s} off randomly, even when fully charged.",
        "[power]There's a burning smell coming from {np}.",
        "{np} started rattling and feel{s} loose now.",
        "[battery]{np} {doesnt} hold a charge anymore.",
        "[power]{np} stopped responding completely, and a reset didn't help.",
        "[power]The power cable for {np} was frayed right out of the box.",
        "[power]{np} buzz{es} constantly, even when switched off.",
        "{np} broke the second time I used {them}.",
        "A piece snapped off {np} during setup.",
        "{np} arrived with a missing part, so I can't use {them}.",
    ],
    "account": [
        "I can't log in to check the status of {np}.",
        "The password reset email never arrives, so I can't see {ord} for {np}.",
        "Please change the email on my account; I used my old work address when I bought {np}.",
        "Please delete my account. I only made it to buy {np}.",
        "My account got locked after too many login attempts, and I need to register the warranty for {np}.",
        "I'm trying to review {np}, but the site says my account doesn't exist.",
        "Someone changed my account password without my permission. There's now a saved cart with {np} that I never added.",
        "Two-factor codes aren't reaching my phone, so I can't sign in to reorder {np}.",
        "I bought {np} as a guest and want to link {ord} to my account.",
        "I forgot my password and the reset link has expired. I wanted to leave a review for {np}.",
        "Please fix the misspelled name on my account; it's wrong on every email, including the one about {np}.",
        "My login email changed, and now I can't see my purchase history, including {np}.",
        "How do I merge my two accounts? I bought {np} on the old one.",
    ],
    "return": [
        "I'd like to return {np}; {it} {isnt} right for me.",
        "Can I exchange {np} for a different color?",
        "Please send me a return label for {np}.",
        "I changed my mind about {np} and want to send {them} back.",
        "{np} {isnt} what I expected, so I'd like to return {them}.",
        "Is {np} still within the return window? I've had {them} for {n} days.",
        "I'd like to swap {np} for the larger model.",
        "The return label you sent for {np} has expired. Can I get a new one?",
        "I received {np} as a gift and would like to exchange {them} for store credit.",
        "I want to return {np} from {ord}. What's the process?",
        "I shipped {np} back for a return last week. Did {it} reach your warehouse?",
        "{np} clash{es} with the rest of my setup, so I'd like to exchange {them} for the black version.",
        "Can I return {np} without the original box?",
    ],
}

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

# Order-id phrasings.
ORD_SLOT_ID = ["order #{id}", "order number {id}", "order {id}", "order no. {id}", "order ID {id}"]
ORD_SLOT_NONE = ["my order", "the order", "my recent order"]
ORD_SUFFIX = [
    "My order number is {id}.",
    "Order #{id}.",
    "Ref {id}.",
    "The order number is {id}.",
    "It was order {id}.",
    "Reference: {id}.",
]
ORD_PAREN = ["(order {id})", "(order #{id})", "(ref {id})", "(order number {id})"]
ORD_PREFIX = ["Re order #{id}:", "Order {id}:", "Ref {id} -"]

# Urgency cues: (text, categories it fits or None for all).
HIGH_START = [
    ("URGENT:", None),
    ("Urgent -", None),
    ("Please help ASAP!", None),
    ("This is urgent.", None),
    ("I need help immediately!", None),
]
HIGH_END = [
    ("Please fix this today!", None),
    ("This is unacceptable!", None),
    ("I need it for an event tomorrow!", {"shipping", "defect"}),
    ("Please respond ASAP.", None),
    ("I need this resolved immediately.", None),
    ("It's a birthday gift for this weekend, so please hurry!", {"shipping", "defect", "return"}),
    ("This is the third time I'm contacting you!", None),
    ("Please escalate this right away.", None),
    ("I need an answer today.", None),
    ("Urgent, please!", None),
]
LOW_START = [
    ("Not urgent at all.", None),
    ("No rush on this one.", None),
    ("Just a quick question, no hurry.", {"billing", "account", "return", "shipping"}),
    ("Low priority, but wanted to flag it.", None),
]
LOW_END = [
    ("No rush, whenever you get a chance.", None),
    ("Whenever you get a chance is fine.", None),
    ("Just curious how this works.", {"billing", "account", "return"}),
    ("Take your time.", None),
    ("No hurry at all.", None),
    ("Not urgent, just wanted to let you know.", None),
    ("It's not a big deal, so whenever is convenient.", None),
    ("No need to reply quickly.", None),
]
NEUTRAL_CLOSERS = [
    "Can you help?",
    "Please let me know what to do.",
    "Could you look into it?",
    "Thanks in advance.",
    "What are my options?",
    "Let me know if you need anything else from me.",
]

GREETINGS = ["Hi,", "Hello,", "Hello team,", "Hi there,", "Good morning,", "Dear support,", "Hey,"]
SIGNOFF_FORMS = ["Thanks, {n}", "Best, {n}", "Regards, {n}", "Cheers, {n}", "Thank you, {n}", "- {n}"]
NAMES = [
    "Maria", "Tom", "Priya Shah", "Sam", "Daniel", "Alex", "Chen Wei", "Fatima", "Lukas",
    "Olivia R.", "Jamal", "Sofia", "Ken", "Aisha", "Peter Novak", "Grace",
]


def _fill(template: str, plural: bool, rng: random.Random, np_phrase: str, ord_phrase: str) -> str:
    values = {k: v[1] if plural else v[0] for k, v in GRAMMAR.items()}
    values.update(
        np=np_phrase,
        ord=ord_phrase,
        n=str(rng.randint(3, 14)),
        amt=str(rng.choice([5, 12, 15, 20, 25, 30, 40, 49, 60])),
        day=rng.choice(WEEKDAYS),
    )
    text = template.format(**values)
    return text[0].upper() + text[1:]


def _pick_cue(cues: list[tuple[str, set[str] | None]], category: str, rng: random.Random) -> str:
    return rng.choice([text for text, cats in cues if cats is None or category in cats])


def make_row(category: str, urgency: str, rng: random.Random) -> tuple[str, dict]:
    product, plural = rng.choice(PRODUCTS)
    template = rng.choice(
        [
            t
            for t in TEMPLATES[category]
            if not t.startswith("[") or TAG_OK[t[1 : t.index("]")]](product)
        ]
    )
    template = re.sub(r"^\[\w+\]", "", template)
    np_forms = NP_SHORT if NEEDS_SHORT_NP.search(template) else NP_FORMS
    np_phrase = rng.choice(np_forms).format(p=product)
    id_prob = 0.35 if category == "account" else 0.66
    order_id = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(10000, 99999)}" if rng.random() < id_prob else None

    has_slot = "{ord}" in template
    if has_slot:
        ord_phrase = rng.choice(ORD_SLOT_ID if order_id else ORD_SLOT_NONE).format(id=order_id)
    else:
        ord_phrase = ""
    body = _fill(template, plural, rng, np_phrase, ord_phrase)

    parts: list[str] = []
    if order_id and not has_slot:
        style = rng.random()
        if style < 0.45:
            body = f"{body} {rng.choice(ORD_SUFFIX).format(id=order_id)}"
        elif style < 0.8:
            # Insert a parenthetical before the end of the first sentence.
            m = re.search(r"[.?](\s|$)", body)
            cut = m.start() if m else len(body)
            body = f"{body[:cut]} {rng.choice(ORD_PAREN).format(id=order_id)}{body[cut:]}"
        else:
            parts.append(rng.choice(ORD_PREFIX).format(id=order_id))


    start_cue = end_cue = None
    if urgency == "high":
        if rng.random() < 0.4:
            start_cue = _pick_cue(HIGH_START, category, rng)
        else:
            end_cue = _pick_cue(HIGH_END, category, rng)
    elif urgency == "low":
        if rng.random() < 0.35:
            start_cue = _pick_cue(LOW_START, category, rng)
        else:
            end_cue = _pick_cue(LOW_END, category, rng)

    if start_cue:
        parts.append(start_cue)
    parts.append(body)
    closer = rng.choice(NEUTRAL_CLOSERS) if urgency == "medium" and rng.random() < 0.45 else None
    if closer:
        parts.append(closer)
    if end_cue:
        parts.append(end_cue)
    if rng.random() < 0.6:
        # Chat style: continue in lower case after the greeting ("Hi, my kettle ...").
        first = parts[0].split()[0]
        if not (first == "I" or first.startswith("I'") or (first.isupper() and len(first) > 1)):
            parts[0] = parts[0][0].lower() + parts[0][1:]
        parts.insert(0, rng.choice(GREETINGS))
    if rng.random() < 0.5:
        forms = [f for f in SIGNOFF_FORMS if not (closer and closer.startswith("Thank") and f.startswith("Thank"))]
        parts.append(rng.choice(forms).format(n=rng.choice(NAMES)))

    message = " ".join(parts)
    label = {"product": product, "category": category, "urgency": urgency, "order_id": order_id}
    return message, label


def _balanced(items: list[str], n: int, weights: list[float] | None, rng: random.Random) -> list[str]:
    if weights is None:
        weights = [1 / len(items)] * len(items)
    counts = [int(n * w) for w in weights]
    for i in range(n - sum(counts)):
        counts[i % len(counts)] += 1
    out = [item for item, c in zip(items, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for name, n in SPLITS.items():
        cats = _balanced(CATEGORIES, n, None, rng)
        urgs = _balanced(list(URGENCY_SHARE), n, list(URGENCY_SHARE.values()), rng)
        rows = []
        for category, urgency in zip(cats, urgs):
            while True:
                message, label = make_row(category, urgency, rng)
                if message not in seen and len(message.split()) <= MAX_WORDS:
                    break
            seen.add(message)
            rows.append(
                {
                    "prompt": f"{INSTRUCTION}\nMessage: {message}",
                    "response": json.dumps(label, ensure_ascii=False),
                }
            )
        splits[name] = rows
    return splits


def validate(splits: dict[str, list[dict]]) -> None:
    messages: dict[str, str] = {}
    for name, rows in splits.items():
        assert len(rows) == SPLITS[name], (name, len(rows))
        for row in rows:
            assert list(row) == ["prompt", "response"]
            head, message = row["prompt"].split("\nMessage: ", 1)
            assert head == INSTRUCTION
            label = json.loads(row["response"])
            assert list(label) == ["product", "category", "urgency", "order_id"], label
            assert label["product"] in message, (label, message)
            assert label["category"] in CATEGORIES
            assert label["urgency"] in URGENCY_SHARE
            oid = label["order_id"]
            assert oid is None or (re.fullmatch(r"[A-Z]\d{5}", oid) and oid in message), (label, message)
            assert oid is not None or not re.search(r"\b[A-Z]\d{5}\b", message), message
            assert messages.setdefault(message, name) == name, f"message shared across splits: {message}"


def main() -> None:
    splits = generate()
    validate(splits)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = OUT_DIR / f"{name}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        labels = [json.loads(r["response"]) for r in rows]
        cats = Counter(lab["category"] for lab in labels)
        urgs = Counter(lab["urgency"] for lab in labels)
        with_id = sum(lab["order_id"] is not None for lab in labels)
        print(
            f"{path}: {len(rows)} rows | categories {dict(sorted(cats.items()))} | "
            f"urgency {dict(sorted(urgs.items()))} | with order_id {with_id}"
        )


if __name__ == "__main__":
    main()
