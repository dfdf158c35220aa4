"""Generate the embedded example corpus: short children's stories from a small grammar.

The stories are written by this script (license-clean, no data downloaded) in the style of
TinyStories: a character, a place, a wish, a problem, help from a friend, an ending and
sometimes a lesson, 5 to 12 sentences each. The output is deterministic for a seed:

    python training/example/make_stories.py --count 3000 --seed 0 --out training/example/stories.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random

GIRLS = ["Lily", "Mia", "Sara", "Lucy", "Anna", "Emma", "Zoe", "Ella", "Ruby", "Ivy"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Noah", "Owen", "Theo"]
NAMES = GIRLS + BOYS
ANIMALS = [("dog", "Spot"), ("cat", "Whiskers"), ("bunny", "Hop"), ("bird", "Tweet"), ("frog", "Jumpy"),
           ("bear", "Fuzzy"), ("duck", "Quack"), ("fox", "Red"), ("mouse", "Squeak"), ("turtle", "Slow")]  # fmt: skip
PLACES = ["park", "garden", "forest", "beach", "farm", "town", "hill", "river", "school", "playground", "lake", "zoo"]
ADJ = ["happy", "curious", "brave", "kind", "shy", "little", "silly", "clever", "gentle", "busy"]
TOYS = ["red ball", "blue kite", "toy car", "small boat", "teddy bear", "shiny box", "big drum", "yellow hat",
        "magic stick", "green book", "soft blanket", "wooden train"]  # fmt: skip
FOODS = ["apple", "cookie", "cake", "sandwich", "banana", "pie", "carrot", "muffin"]
WEATHER = ["sunny", "windy", "rainy", "cold", "warm", "bright"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely"]
FEELINGS_GOOD = ["happy", "proud", "glad", "excited", "thankful"]
LESSONS = [
    "It is good to share with friends.", "Being kind makes everyone happy.", "Never give up when things are hard.",
    "Friends help each other.", "It is okay to ask for help.", "Saying sorry can fix a problem.",
    "Trying new things can be fun.", "Listening to others is important.",
]  # fmt: skip


def _character(rng: random.Random) -> tuple[str, str, str]:
    """(name, description, pronoun) of the hero."""
    if rng.random() < 0.3:
        kind, name = rng.choice(ANIMALS)
        return name, _a(f"{rng.choice(ADJ)} {kind}"), "it"
    if rng.random() < 0.5:
        return rng.choice(GIRLS), _a(f"{rng.choice(ADJ)} girl"), "she"
    return rng.choice(BOYS), _a(f"{rng.choice(ADJ)} boy"), "he"


def _a(noun: str) -> str:
    """The noun with its indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def story(rng: random.Random) -> str:
    """One story of 5-12 sentences."""
    name, desc, he = _character(rng)
    his = {"she": "her", "he": "his", "it": "its"}[he]
    He = he.capitalize()
    friend = rng.choice([n for n in NAMES if n != name])
    place, toy, food = rng.choice(PLACES), rng.choice(TOYS), rng.choice(FOODS)
    bad, good = rng.choice(FEELINGS_BAD), rng.choice(FEELINGS_GOOD)
    opening = rng.choice([
        f"Once upon a time, there was {desc} named {name}.",
        f"One {rng.choice(WEATHER)} day, {desc} named {name} went to the {place}.",
        f"{name} was {desc} who lived near the {place}.",
    ])  # fmt: skip
    s = [opening]
    s.append(rng.choice([
        f"{He} loved to play with {his} {toy}.",
        f"{He} wanted to find {_a(toy)} more than anything.",
        f"Every morning, {he} ate {_a(food)} and played outside.",
    ]))  # fmt: skip
    if rng.random() < 0.6:
        s.append(rng.choice([
            f"The sky was {rng.choice(WEATHER)} and the birds were singing.",
            f"The {place} was full of flowers and tall trees.",
            f"{He} had a friend named {friend}.",
        ]))  # fmt: skip
    s.append(rng.choice([
        f"One day, {he} lost {his} {toy} near the {place}.",
        f"But one day, a big storm came to the {place}.",
        f"Then {he} saw that {friend} was {bad}.",
        f"Suddenly, {his} {toy} fell into the {rng.choice(['river', 'mud', 'hole', 'bush'])}.",
    ]))  # fmt: skip
    s.append(rng.choice([f"{name} felt {bad}.", f"{He} did not know what to do.", f'"Oh no!" said {name}.']))
    if rng.random() < 0.7:
        s.append(rng.choice([
            f"{friend} came to help {name}.",
            f"{He} asked {friend} for help.",
            f'"Do not worry," said {friend}. "I will help you."',
        ]))  # fmt: skip
        s.append(rng.choice([
            f"Together, they looked everywhere in the {place}.",
            "They worked hard and did not give up.",
            f"They shared {_a(food)} and made a plan.",
        ]))  # fmt: skip
    s.append(rng.choice([
        f"At last, they found the {toy}.",
        "Soon, everything was fine again.",
        f"In the end, {name} and {friend} became best friends.",
    ]))  # fmt: skip
    s.append(rng.choice([f"{name} was very {good}.", f"{He} smiled and said thank you.", f"Everyone felt {good}."]))
    if rng.random() < 0.4:
        s.append(rng.choice(["They played until the sun went down.", f"Then they went home to eat {food}{'es' if food.endswith('ch') else 's'}."]))
    if rng.random() < 0.5:
        s.append(rng.choice(LESSONS))
    return " ".join(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000, help="number of stories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "stories.jsonl.gz"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = args.out + ".tmp"
    with gzip.GzipFile(tmp, "wb", mtime=0) as raw:  # mtime=0: the same bytes on every run
        for i in range(args.count):
            raw.write((json.dumps({"id": i, "text": story(rng)}) + "\n").encode())
    os.replace(tmp, args.out)
    print(f"wrote {args.count} stories to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
