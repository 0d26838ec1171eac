"""Conflicting length preferences (P-DPO paper, experiment 1): some users want long summaries, others short.

Every prompt asks to summarise one short story sentence and comes with two responses on the same topic: a
one-sentence summary (5-9 words) and a 3-4 sentence retelling (25-40 words). "long" users choose the long
one, "short" users the short one, so a single shared policy cannot satisfy both groups; the signal (length)
is visible on the surface and the vocabulary is a few hundred words, so a tiny model can learn it. Test stories
are about subjects and objects that no training story uses (content-disjoint).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from prlhf.data.schema import PreferenceRecord
from prlhf.data.tasks.common import Task, assign_poles, make_user_ids, sample_per_user, split_items

GROUPS = ("long", "short")  # first = majority pole

SUBJECTS = ("farmer", "teacher", "girl", "boy", "baker", "sailor", "doctor", "painter",
            "fox", "dog", "cat", "king", "queen", "pilot", "student", "nurse")
SUBJECT_ADJECTIVES = ("old", "young", "tired", "happy", "brave", "quiet", "clever", "lonely")
VERBS = ("found", "lost", "painted", "carried", "fixed", "sold", "hid", "chased", "built", "opened")
OBJECTS = ("kite", "box", "letter", "boat", "lamp", "basket", "map", "key", "drum", "coat", "wheel", "bell")
OBJECT_ADJECTIVES = ("red", "small", "heavy", "broken", "shiny", "wooden", "blue", "strange")
PLACES = ("near the river", "in the forest", "at the market", "on the hill", "by the sea",
          "in the garden", "at the station", "behind the school", "in the village", "on the bridge")
TIMES = ("at dawn", "at night", "after lunch", "in the rain", "on sunday",
         "before dinner", "last winter", "in the morning")
FEELINGS = ("proud", "surprised", "calm", "curious", "glad", "worried")

# Extra sentences for the long response; they reuse the story's words so both responses stay on topic.
LONG_FOLLOWUPS = (
    "The {subject} did not expect to see a {object} there.",
    "Everyone in the village talked about the {object} for weeks.",
    "Later the {subject} told a friend about the {object}.",
    "The {object} was {object_adj} and looked very old.",
    "In the end the {subject} took the {object} home and smiled.",
    "Nobody knew who had left the {object} {place}.",
    "The {subject} felt {feeling} and thought about it all day.",
    "It was a long day for the {subject} {place}.",
)
SHORT_TEMPLATES = (
    "The {subject} {verb} a {object}.",
    "A {subject} {verb} a {object} {place}.",
    "The {subject_adj} {subject} {verb} a {object}.",
    "The {subject} {verb} a {object_adj} {object} {place}.",
)
HELD_OUT_WORD_FRACTION = 0.25  # subjects and objects that only test stories use
SHORT_WORDS = (5, 9)
LONG_WORDS = (25, 40)


@dataclass(frozen=True)
class Story:
    """The parts of one story sentence; the prompt and both responses are rendered from them."""

    subject: str
    subject_adj: str | None
    verb: str
    object: str
    object_adj: str | None
    place: str
    time: str | None

    def sentence(self) -> str:
        words = ["the", self.subject_adj, self.subject, self.verb, "a", self.object_adj, self.object,
                 self.place, self.time]
        return _sentence(" ".join(w for w in words if w))


def word_count(text: str) -> int:
    """Whitespace word count (what "long"/"short" means in this task)."""
    return len(text.split())


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[0].upper() + text[1:] + "."


def _random_story(rng: random.Random, subjects: Sequence[str], objects: Sequence[str]) -> Story:
    # optional adjectives/time vary the sentence length (8-12 words) and the prompt space
    return Story(
        subject=rng.choice(subjects),
        subject_adj=rng.choice(SUBJECT_ADJECTIVES) if rng.random() < 0.6 else None,
        verb=rng.choice(VERBS),
        object=rng.choice(objects),
        object_adj=rng.choice(OBJECT_ADJECTIVES) if rng.random() < 0.6 else None,
        place=rng.choice(PLACES),
        time=rng.choice(TIMES) if rng.random() < 0.6 else None,
    )


def _fill(template: str, story: Story, rng: random.Random) -> str:
    return template.format(
        subject=story.subject,
        subject_adj=story.subject_adj or rng.choice(SUBJECT_ADJECTIVES),
        verb=story.verb,
        object=story.object,
        object_adj=story.object_adj or rng.choice(OBJECT_ADJECTIVES),
        place=story.place,
        feeling=rng.choice(FEELINGS),
    )


def short_response(story: Story, rng: random.Random) -> str:
    """A one-sentence summary of 5-9 words."""
    # only templates whose adjectives the story actually has: a summary should not invent details
    usable = [t for t in SHORT_TEMPLATES
              if ("{subject_adj}" not in t or story.subject_adj) and ("{object_adj}" not in t or story.object_adj)]
    text = _fill(rng.choice(usable), story, rng)
    assert SHORT_WORDS[0] <= word_count(text) <= SHORT_WORDS[1], text  # templates are sized to fit
    return text


def long_response(story: Story, rng: random.Random) -> str:
    """The full story sentence plus 2-3 follow-up sentences, 25-40 words in total."""
    # story 8-12 words + two follow-ups of 8-11 words is always 25-34; a third is added when it still fits
    followups = [_fill(t, story, rng) for t in rng.sample(LONG_FOLLOWUPS, 3)]
    sentences = [story.sentence()] + followups[:2]
    if rng.random() < 0.5 and word_count(" ".join(sentences + followups[2:])) <= LONG_WORDS[1]:
        sentences.append(followups[2])
    text = " ".join(sentences)
    assert LONG_WORDS[0] <= word_count(text) <= LONG_WORDS[1], text
    return text


def _unique_stories(n: int, rng: random.Random, subjects: Sequence[str], objects: Sequence[str]) -> list[Story]:
    seen: set[str] = set()
    stories: list[Story] = []
    for _ in range(n * 100):  # the story space is ~10^6 even for the held-out words, so duplicates are rare
        story = _random_story(rng, subjects, objects)
        if story.sentence() not in seen:
            seen.add(story.sentence())
            stories.append(story)
            if len(stories) == n:
                return stories
    raise ValueError(f"could not generate {n} distinct prompts")


def build_length_task(
    n_seen_users: int = 10,
    n_unseen_users: int = 4,
    majority_share: float = 0.7,
    n_prompts: int = 300,
    test_fraction: float = 0.2,
    train_pairs_per_user: int | None = None,
    test_pairs_per_user: int | None = None,
    seed: int = 0,
) -> Task:
    """Build the conflicting-length task; deterministic for a given seed (see module docstring)."""
    if n_seen_users < 1 or n_unseen_users < 0:
        raise ValueError("need n_seen_users >= 1 and n_unseen_users >= 0")
    meta = dict(n_seen_users=n_seen_users, n_unseen_users=n_unseen_users, majority_share=majority_share,
                n_prompts=n_prompts, test_fraction=test_fraction, train_pairs_per_user=train_pairs_per_user,
                test_pairs_per_user=test_pairs_per_user, seed=seed)
    rng = random.Random(seed)

    # Content-disjoint split: test stories are about subjects and objects that no training prompt or response
    # mentions, so a model must have learned length, not its training stories.
    train_subjects, test_subjects = split_items(SUBJECTS, HELD_OUT_WORD_FRACTION, rng)
    train_objects, test_objects = split_items(OBJECTS, HELD_OUT_WORD_FRACTION, rng)
    n_test = min(max(1, round(test_fraction * n_prompts)), n_prompts - 1)
    stories = (_unique_stories(n_prompts - n_test, rng, train_subjects, train_objects)
               + _unique_stories(n_test, rng, test_subjects, test_objects))
    # One fixed (short, long) pair per prompt: users differ only in which side they choose.
    pairs = {f"Summarize: {s.sentence()}": {"short": short_response(s, rng), "long": long_response(s, rng)}
             for s in stories}
    prompts = list(pairs)
    train_prompts, test_prompts = prompts[:n_prompts - n_test], prompts[n_prompts - n_test:]
    meta.update(test_subjects=sorted(test_subjects), test_objects=sorted(test_objects))

    # Seen and unseen groups are drawn separately so each side gets both poles (when it has >= 2 users).
    users: dict[str, dict] = {}
    seen_ids, unseen_ids = make_user_ids("user", n_seen_users), make_user_ids("unseen", n_unseen_users)
    for ids, seen in ((seen_ids, True), (unseen_ids, False)):
        for uid, group in zip(ids, assign_poles(len(ids), majority_share, rng, GROUPS)):
            users[uid] = {"group": group, "seen": seen}

    def records(uid: str, prompts: list[str]) -> list[PreferenceRecord]:
        group = users[uid]["group"]
        other = "short" if group == "long" else "long"
        return [PreferenceRecord(uid, p, pairs[p][group], pairs[p][other]) for p in prompts]

    train: list[PreferenceRecord] = []
    for uid in seen_ids:
        train += records(uid, sample_per_user(train_prompts, train_pairs_per_user, rng, "train_pairs_per_user"))
    test: list[PreferenceRecord] = []
    for uid in seen_ids + unseen_ids:
        test += records(uid, sample_per_user(test_prompts, test_pairs_per_user, rng, "test_pairs_per_user"))
    return Task(name="length", train=train, test=test, users=users, meta=meta)
