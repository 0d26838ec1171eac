"""Conflicting style preferences: users disagree on formality, layout and tone of short team notes.

Each user holds one pole on three opposing dimensions: formality (formal / casual), layout (bullets / prose)
and tone (warm / blunt). Each comparison shows two renderings of the same content that differ in exactly one
dimension; the user chooses the one matching their pole there. Styles are marked on the surface (openers,
sign-offs, case, contractions, "- " bullet lines, pleasantries vs "That is all."), with a few alternative
phrasings per marker so a model has to learn the style rather than one string. Test notes are about topics that
no training prompt or note mentions (content-disjoint).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks.common import Task, assign_poles, make_user_ids, split_items

# dimension -> (first pole = majority, second pole); render flags are "value == first pole"
DIMENSIONS: dict[str, tuple[str, str]] = {
    "formality": ("formal", "casual"),
    "layout": ("bullets", "prose"),
    "tone": ("warm", "blunt"),
}
TEST_TOPIC_FRACTION = 0.25  # share of the topics reserved for test prompts (content-disjoint: 3 of 12)
MAX_FACT_WORDS = 13  # keeps every rendered note at <= 40 words

TOPICS = ("the team meeting", "the budget review", "the office move", "the product launch",
          "the client visit", "the training day", "the quarterly report", "the holiday party",
          "the server update", "the hiring plan", "the design review", "the safety check")
AUDIENCES = ("the team", "the staff", "my group", "the office", "the new hires", "the managers")
PROMPT_TEMPLATES = ("Write a note to {audience} about {topic}.",
                    "Send {audience} a short update on {topic}.",
                    "Draft a message for {audience} about {topic}.")

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
HOURS = ("nine", "ten", "noon", "two", "four")
ITEMS = ("report", "slides", "laptop", "badge", "budget sheet", "checklist", "contract", "notes")
PEOPLE = ("sam", "alex", "maria", "chen", "priya", "tom")
ROOMS = ("1", "2", "3", "4", "5", "6")
# Facts are written uncontracted; the casual renderer contracts them ("we will" -> "we'll").
FACT_TEMPLATES = ("it moves to {day}", "it starts at {hour}", "bring the {item}", "room {room} is booked",
                  "{person} will lead it", "the {item} is due on {day}", "do not forget the {item}",
                  "we will meet in room {room}", "{person} is the contact", "send the {item} to {person}",
                  "lunch is not provided", "it is on {day} at {hour}")

FORMAL_OPENERS = ("Dear team,", "Dear colleagues,", "To all staff,")
CASUAL_OPENERS = ("hey team,", "hi all,", "yo folks,")
FORMAL_HEADERS = ("Please note regarding {topic}:", "Please be advised about {topic}:",
                  "An update regarding {topic}:")
CASUAL_HEADERS = ("here is the deal on {topic}:", "quick heads up on {topic}:", "ok so about {topic}:")
FORMAL_WARM_OPENS = ("I hope you are all well.", "I hope your week goes well.",
                     "It is a pleasure to write.")
CASUAL_WARM_OPENS = ("hope you are all good!", "hope your week is going great!", "you are all awesome!")
FORMAL_WARM_CLOSES = ("Thank you for your wonderful work!", "Hope this helps, you are doing great!",
                      "Many thanks, I appreciate you all!")
CASUAL_WARM_CLOSES = ("hope this helps, you are doing great!", "thanks heaps, you are the best!",
                      "love you all, keep it up!")
FORMAL_BLUNT_CLOSES = ("That is all.", "No further comment.", "End of message.")
CASUAL_BLUNT_CLOSES = ("that is all.", "nothing else.", "end of story.")
FORMAL_SIGNOFFS = ("Regards.", "Sincerely.", "Respectfully.")
CASUAL_SIGNOFFS = ("later.", "bye.", "see ya.")

CONTRACTIONS = (("we will", "we'll"), ("do not", "don't"), ("is not", "isn't"), ("it is", "it's"),
                ("here is", "here's"), ("you are", "you're"), ("that is", "that's"), ("week is", "week's"))


@dataclass(frozen=True)
class Content:
    """What a note says, independent of style: its topic and 2-3 short facts (lowercase, uncontracted)."""

    topic: str
    facts: tuple[str, ...]


def random_content(topic: str, rng: random.Random) -> Content:
    """2-3 distinct facts about `topic` from the fact templates, at most MAX_FACT_WORDS words together."""
    while True:  # a redraw is needed only for the longest 3-fact combinations
        templates = rng.sample(FACT_TEMPLATES, rng.choice((2, 3)))
        facts = tuple(t.format(day=rng.choice(DAYS), hour=rng.choice(HOURS), item=rng.choice(ITEMS),
                               person=rng.choice(PEOPLE), room=rng.choice(ROOMS)) for t in templates)
        if sum(len(f.split()) for f in facts) <= MAX_FACT_WORDS:
            return Content(topic=topic, facts=facts)


def _contract(text: str) -> str:
    # whole words only: "it is" must not fire inside "visit is"
    for full, short in CONTRACTIONS:
        text = re.sub(rf"\b{full}\b", short, text)
    return text


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def render_style(content: Content, formal: bool, bullets: bool, warm: bool, variant: int = 0) -> str:
    """Render `content` as a short note in the given style.

    `variant` picks the phrasing alternatives. The picks are drawn in a fixed order whatever the flags, so two
    renderings with the same variant that differ in one flag differ only in that dimension's markers.
    """
    pick_rng = random.Random(variant)
    idx = {slot: pick_rng.randrange(1 << 16) for slot in ("opener", "warm_open", "header", "close", "signoff")}

    def pick(formal_opts: tuple[str, ...], casual_opts: tuple[str, ...], slot: str) -> str:
        opts = formal_opts if formal else casual_opts
        return opts[idx[slot] % len(opts)]

    opener = pick(FORMAL_OPENERS, CASUAL_OPENERS, "opener")
    header = pick(FORMAL_HEADERS, CASUAL_HEADERS, "header").format(topic=content.topic)
    if warm:
        intro = [pick(FORMAL_WARM_OPENS, CASUAL_WARM_OPENS, "warm_open")]
        close = pick(FORMAL_WARM_CLOSES, CASUAL_WARM_CLOSES, "close")
    else:  # blunt: no pleasantries at all
        intro, close = [], pick(FORMAL_BLUNT_CLOSES, CASUAL_BLUNT_CLOSES, "close")
    signoff = pick(FORMAL_SIGNOFFS, CASUAL_SIGNOFFS, "signoff")

    facts = list(content.facts)
    if bullets:
        # formal bullets are full sentences; casual ones are bare lowercase fragments
        body = [f"- {_cap(f)}." if formal else f"- {f}" for f in facts]
        text = "\n".join([opener] + intro + [header] + body + [close, signoff])
    else:
        joined = ", ".join(facts[:-1]) + " and " + facts[-1] + "."
        text = " ".join([opener] + intro + [header, joined, close, signoff])
    # casual = all lowercase + contractions; formal text never contains either (the case is the marker)
    return text if formal else _contract(text.lower())


def classify_style(text: str) -> dict[str, str]:
    """Recover {"formality", "layout", "tone"} from a rendered note's surface markers.

    Raises ValueError when the markers are missing or contradictory (i.e. the text was not made by
    `render_style`).
    """
    first_line = text.split("\n", 1)[0]
    is_formal = any(first_line.startswith(o) for o in FORMAL_OPENERS)
    is_casual = any(first_line.startswith(o) for o in CASUAL_OPENERS)
    if is_formal == is_casual:
        raise ValueError(f"no unique formality marker in {text!r}")
    if is_formal != (text != text.lower()):  # case must agree with the opener
        raise ValueError(f"case contradicts the opener in {text!r}")
    layout = "bullets" if any(line.startswith("- ") for line in text.split("\n")) else "prose"
    if layout == "prose" and "\n" in text:
        raise ValueError(f"multi-line text without bullets: {text!r}")
    casual_warm = tuple(_contract(p) for p in CASUAL_WARM_OPENS + CASUAL_WARM_CLOSES)
    casual_blunt = tuple(_contract(p) for p in CASUAL_BLUNT_CLOSES)
    warm = any(p in text for p in FORMAL_WARM_OPENS + FORMAL_WARM_CLOSES + casual_warm)
    blunt = any(p in text for p in FORMAL_BLUNT_CLOSES + casual_blunt)
    if warm == blunt:
        raise ValueError(f"no unique tone marker in {text!r}")
    return {"formality": "formal" if is_formal else "casual", "layout": layout, "tone": "warm" if warm else "blunt"}


def profile_text(profile: dict[str, str]) -> str:
    """Plain-English description of a user's style poles (the optional `user_text`)."""
    layout = "in bullet points" if profile["layout"] == "bullets" else "in plain prose"
    return f"I prefer {profile['formality']} replies, {layout}, with a {profile['tone']} tone."


def _render(content: Content, style: dict[str, str], variant: int) -> str:
    return render_style(content, formal=style["formality"] == "formal", bullets=style["layout"] == "bullets",
                        warm=style["tone"] == "warm", variant=variant)


def _make_pair(prompt: str, topic: str, profile: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) for one comparison: same content, differing in one random dimension only."""
    content = random_content(topic, rng)
    dim = rng.choice(list(DIMENSIONS))
    # the two shared dimensions are random per pair so a model can't key on co-occurring markers
    base = {d: rng.choice(poles) for d, poles in DIMENSIONS.items()}
    variant = rng.randrange(1 << 30)
    pole = profile[dim]
    other = DIMENSIONS[dim][1] if pole == DIMENSIONS[dim][0] else DIMENSIONS[dim][0]
    chosen = _render(content, {**base, dim: pole}, variant)
    rejected = _render(content, {**base, dim: other}, variant)
    return chosen, rejected


def _prompt_space(topics: list[str]) -> list[tuple[str, str]]:
    """Every (prompt, topic) combination for `topics`, in a fixed order."""
    return [(t.format(audience=a, topic=topic), topic)
            for t in PROMPT_TEMPLATES for a in AUDIENCES for topic in topics]


def build_style_task(
    n_seen_users: int = 16,
    n_unseen_users: int = 4,
    majority_share: float = 0.7,
    train_pairs_per_user: int = 100,
    test_pairs_per_user: int = 25,
    seed: int = 0,
    with_user_text: bool = False,
) -> Task:
    """Build the conflicting-style task; deterministic for a given seed (see module docstring)."""
    if n_seen_users < 1 or n_unseen_users < 0:
        raise ValueError("need n_seen_users >= 1 and n_unseen_users >= 0")
    if train_pairs_per_user < 0 or test_pairs_per_user < 0:
        raise ValueError("pairs per user must be >= 0")
    meta = dict(n_seen_users=n_seen_users, n_unseen_users=n_unseen_users, majority_share=majority_share,
                train_pairs_per_user=train_pairs_per_user, test_pairs_per_user=test_pairs_per_user, seed=seed,
                with_user_text=with_user_text, test_topic_fraction=TEST_TOPIC_FRACTION)
    rng = random.Random(seed)
    # Topics (not just prompts) are split: every test note is about a topic no training prompt or note
    # mentions, so a model must have learned the style rather than its training texts.
    train_topics, test_topics = split_items(list(TOPICS), TEST_TOPIC_FRACTION, rng)
    train_prompts, test_prompts = _prompt_space(train_topics), _prompt_space(test_topics)
    meta["test_topics"] = sorted(test_topics)

    users: dict[str, dict] = {}
    seen_ids, unseen_ids = make_user_ids("user", n_seen_users), make_user_ids("unseen", n_unseen_users)
    for ids, seen in ((seen_ids, True), (unseen_ids, False)):
        poles = {d: assign_poles(len(ids), majority_share, rng, p) for d, p in DIMENSIONS.items()}
        for i, uid in enumerate(ids):
            users[uid] = {**{d: poles[d][i] for d in DIMENSIONS}, "seen": seen}

    def records(uid: str, pool: list[tuple[str, str]], k: int) -> list[PreferenceRecord]:
        profile = {d: users[uid][d] for d in DIMENSIONS}
        user_text = profile_text(profile) if with_user_text else None
        out = []
        for _ in range(k):  # prompts are drawn with replacement: contents differ, so pairs rarely repeat
            prompt, topic = rng.choice(pool)
            chosen, rejected = _make_pair(prompt, topic, profile, rng)
            out.append(PreferenceRecord(uid, prompt, chosen, rejected, user_text))
        return out

    train = [r for uid in seen_ids for r in records(uid, train_prompts, train_pairs_per_user)]
    test = [r for uid in seen_ids + unseen_ids for r in records(uid, test_prompts, test_pairs_per_user)]
    return Task(name="style", train=train, test=test, users=users, meta=meta)
