"""Regenerate tdrl/resources/bundled_prompts.jsonl: the bundled instruction set (deterministic).

    python scripts/make_bundled_prompts.py

Nine task families (factual, definition, list, rewrite, summary, code, classification, arithmetic,
how-to), written from templates and word lists with a fixed seed; duplicates removed; split about
80/10/10 by :func:`assign_splits` so that no (family, answer) or (family, subject) group and no
near-duplicate pair (word-set Jaccard >= 0.8) crosses splits. Some families carry a short ``reference``
answer (arithmetic, capitals, classification labels). These splits still share templates: the test of
generalisation is the separate held-out split (``tdrl/resources/heldout_prompts.jsonl``, written by hand,
following no template here).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tdrl" / "resources" / "bundled_prompts.jsonl"
rng = random.Random(20250526)
#: Word-set Jaccard at or above which two prompts are near-duplicates (never in two splits).
NEAR_DUPLICATE = 0.8

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Egypt": "Cairo",
    "India": "New Delhi",
    "China": "Beijing",
    "Russia": "Moscow",
    "Mexico": "Mexico City",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Peru": "Lima",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Austria": "Vienna",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "Cuba": "Havana",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "New Zealand": "Wellington",
    "Colombia": "Bogota",
    "Switzerland": "Bern",
    "Czech Republic": "Prague",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Saudi Arabia": "Riyadh",
    "Pakistan": "Islamabad",
    "Ethiopia": "Addis Ababa",
}
FACT_QUESTIONS = [
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many days are in a leap year?", "366"),
    ("How many continents are there?", "seven"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the longest river in Africa?", "the Nile"),
    ("How many legs does a spider have?", "eight"),
    ("How many sides does a hexagon have?", "six"),
    ("What is the hardest natural substance?", "diamond"),
    ("What is the closest star to Earth?", "the Sun"),
    ("Which organ pumps blood through the body?", "the heart"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("How many minutes are in an hour?", "60"),
    ("How many hours are in a day?", "24"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the smallest prime number?", "2"),
    ("What is the square root of 81?", "9"),
    ("Which animal is known as the king of the jungle?", "the lion"),
    ("What do bees make?", "honey"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("How many strings does a standard guitar have?", "six"),
    ("What is the capital letter of the Roman numeral for ten?", "X"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What is the largest mammal?", "the blue whale"),
    ("What instrument has 88 keys?", "the piano"),
]
WORDS = [
    "photosynthesis",
    "democracy",
    "gravity",
    "algorithm",
    "metaphor",
    "ecosystem",
    "inflation",
    "molecule",
    "friction",
    "erosion",
    "empathy",
    "recursion",
    "volcano",
    "vaccine",
    "satellite",
    "tariff",
    "habitat",
    "evaporation",
    "compiler",
    "hypothesis",
    "biodiversity",
    "irony",
    "latitude",
    "momentum",
    "nutrition",
    "orbit",
    "pollination",
    "renewable energy",
    "symbiosis",
    "thermometer",
    "unemployment",
    "velocity",
    "wavelength",
    "archive",
    "budget",
    "census",
    "dialect",
    "encryption",
    "fossil",
    "glacier",
    "harvest",
    "immunity",
    "journalism",
    "kinetic energy",
    "legislation",
    "migration",
    "neuron",
    "oxygen",
    "parliament",
    "quarantine",
    "rainforest",
    "sculpture",
    "telescope",
    "urbanization",
    "vocabulary",
    "weather",
    "yeast",
    "zoology",
    "alliteration",
    "bandwidth",
    "cell membrane",
    "database",
    "electricity",
    "fraction",
    "genome",
    "hurricane",
    "interest rate",
    "justice",
    "keyboard",
    "lens",
    "mammal",
    "nutrient",
    "opinion",
    "protein",
]
CATEGORIES = [
    "fruits",
    "vegetables",
    "colors",
    "animals that live in the ocean",
    "musical instruments",
    "European countries",
    "programming languages",
    "sports played with a ball",
    "kitchen tools",
    "birds",
    "planets",
    "board games",
    "things you can recycle",
    "ways to save energy at home",
    "tips for better sleep",
    "healthy breakfast foods",
    "ways to reduce stress",
    "school subjects",
    "types of weather",
    "jobs in a hospital",
    "tools in a garage",
    "flowers",
    "things to pack for a beach trip",
    "indoor hobbies",
    "outdoor activities",
    "insects",
    "trees",
    "ways to stay hydrated",
    "reasons to learn a new language",
    "household chores",
    "breakfast cereals grains",
    "units of length",
    "shapes",
    "parts of a computer",
    "parts of a plant",
    "farm animals",
    "desserts",
]
NUMBERS = ["three", "four", "five"]
SENTENCES = [
    "I walk to school every day",
    "She writes a letter to her grandmother",
    "They play football after lunch",
    "We cook dinner together on Sundays",
    "He reads the newspaper in the morning",
    "The dog chases the ball",
    "The children build a sandcastle",
    "My brother fixes his bike",
    "The teacher explains the lesson",
    "The bakery sells fresh bread",
    "The river flows into the sea",
    "The team wins the match",
    "I drink a cup of tea",
    "The students finish their homework",
    "The cat sleeps on the sofa",
    "Our neighbours plant tomatoes",
    "The company hires new engineers",
    "The bus arrives late",
    "The musician plays the violin",
    "The farmer feeds the chickens",
    "The wind moves the leaves",
    "The chef tastes the soup",
    "My sister paints the fence",
    "The pilot lands the plane",
    "The library opens at nine",
    "The baby laughs at the clown",
    "The scientist tests the idea",
    "The old man feeds the pigeons",
    "The shop closes early on Friday",
    "The girls sing in the choir",
]
INFORMAL = [
    "gonna grab some food, u want anything",
    "cant make it 2day sorry",
    "that movie was super cool",
    "hey can u send me the file asap",
    "lol the meeting got moved again",
    "pls fix the bug when u can",
    "wanna hang out this weekend",
    "ur report looks kinda long",
    "thx for the help yesterday",
    "the wifi is down again ugh",
    "need the numbers by tmrw",
    "i dunno what time it starts",
    "gotta leave early, doc appointment",
    "the food there is meh",
    "can we push the call to 3",
]
REWRITE_KINDS = [
    ("Rewrite this sentence in the past tense: {s}.", SENTENCES),
    ("Rewrite this sentence in the future tense: {s}.", SENTENCES),
    ("Rewrite this sentence as a question: {s}.", SENTENCES),
    ("Rewrite this sentence in the passive voice: {s}.", SENTENCES),
    ('Make this message more formal: "{s}"', INFORMAL),
    ('Fix the spelling and grammar: "{s}"', INFORMAL),
    ("Rewrite this sentence in the negative: {s}.", SENTENCES),
    ("Rewrite this sentence using the word 'yesterday': {s}.", SENTENCES),
]
HOW_TO = [
    "boil an egg",
    "make a cup of tea",
    "plant a tree",
    "write a thank-you note",
    "change a flat tyre",
    "start learning to code",
    "save money each month",
    "prepare for a job interview",
    "clean a laptop keyboard",
    "make a paper airplane",
    "remember new vocabulary",
    "stay focused while studying",
    "set up a budget",
    "wash a wool sweater",
    "take care of a houseplant",
    "keep a conversation going",
    "organize a small closet",
    "cook rice on the stove",
    "make a simple salad",
    "back up my phone",
    "train for a 5 km run",
    "write a good email subject line",
    "fall asleep faster",
    "reduce food waste",
    "care for a new puppy",
    "prepare a short presentation",
    "make friends in a new city",
    "learn to juggle",
    "fix a squeaky door",
    "choose a good password",
    "make homemade lemonade",
    "read more books",
    "teach a child to ride a bike",
    "pack a suitcase efficiently",
    "give constructive feedback",
    "brew coffee without a machine",
    "calm down before an exam",
    "write a short poem",
    "plan a birthday party",
    "store fresh herbs",
]
SUMMARY_SENTENCES = [
    "The meeting was moved from Monday to Friday because the conference room was booked for a training session.",
    "After three weeks of heavy rain, the river rose above its banks and flooded several fields near the village.",
    "The city council voted to build a new library downtown, which will open next spring and include a cafe.",
    "Researchers found that people who walk for thirty minutes a day sleep better and report less stress.",
    "The bakery on Main Street closed for a month to renovate its kitchen and will reopen with a larger menu.",
    "Because the train was delayed by two hours, many passengers missed their connecting flights at the airport.",
    "The school started a garden project where students grow vegetables and learn about healthy eating.",
    "A small startup released an app that helps users track their spending and set monthly savings goals.",
    "The museum extended its opening hours on weekends after the new dinosaur exhibit attracted large crowds.",
    "Scientists discovered a new species of frog in the rainforest that changes color when it is threatened.",
    "The local football team won the championship after scoring a late goal in the final minute of the match.",
    "Due to a software update, the online store was unavailable for six hours, and orders were delayed.",
    "The company announced that employees can work from home two days a week starting next month.",
    "A heat wave pushed temperatures above forty degrees, so the city opened cooling centers for residents.",
    "The author spent ten years writing her first novel, which became a bestseller within a few weeks.",
    "Volunteers cleaned up the beach on Saturday and collected more than two hundred bags of plastic waste.",
    "The hospital added twenty new beds and hired more nurses to reduce waiting times in the emergency room.",
    "After the bridge was repaired, traffic returned to normal and the detour through the town was removed.",
    "The orchestra will perform a free concert in the park to celebrate the city's two hundredth birthday.",
    "A new study suggests that drinking enough water improves concentration during long periods of work.",
    "The farmer switched to drip irrigation, which cut his water use in half during the dry summer.",
    "Two students built a small robot that sorts recycling and won first prize at the science fair.",
    "The airline cancelled dozens of flights because a snowstorm closed the runways for most of the day.",
    "The town replaced its old streetlights with LED lamps, saving money and reducing light pollution.",
]
SUMMARY_TEMPLATES = [
    "Summarize in one short sentence: {s}",
    "Give a one-line summary of this: {s}",
    "What is the main point of this sentence? {s}",
    "Summarize in fewer than ten words: {s}",
    "Write a short headline for this news: {s}",
    "In a few words, what happened? {s}",
    "Rewrite this as a shorter sentence: {s}",
]
CODE_SNIPPETS = [
    "print(sum(range(10)))",
    "x = [i * i for i in range(5)]",
    "def add(a, b):\n    return a + b",
    "for i in range(3):\n    print(i)",
    "names = sorted(['bob', 'alice', 'carol'])",
    "s = 'hello'[::-1]",
    "if n % 2 == 0:\n    print('even')",
    "d = {'a': 1, 'b': 2}\nprint(d.get('c', 0))",
    "while x > 0:\n    x -= 1",
    "nums = [3, 1, 2]\nnums.sort()\nprint(nums[0])",
    "text = 'a,b,c'.split(',')",
    "print(len('tdrl'))",
    "def f(n):\n    return 1 if n <= 1 else n * f(n - 1)",
    "squares = {n: n ** 2 for n in range(4)}",
    "with open('data.txt') as fh:\n    lines = fh.readlines()",
    "max_value = max([4, 9, 2])",
    "words = ['a', 'bb', 'ccc']\nprint([len(w) for w in words])",
    "try:\n    1 / 0\nexcept ZeroDivisionError:\n    print('oops')",
    "import math\nprint(math.sqrt(16))",
    "evens = list(filter(lambda n: n % 2 == 0, range(10)))",
    "a, b = b, a",
    "print('-'.join(['x', 'y', 'z']))",
    "total = 0\nfor v in [1, 2, 3]:\n    total += v",
    "SELECT name FROM users WHERE age > 30;",
    "console.log([1, 2, 3].map(x => x * 2));",
    "let count = 0;\ncount++;",
    "x = int('42') + 1",
    "print(' '.join(reversed('a b c'.split())))",
]
CODE_TEMPLATES = [
    "Explain what this code does:\n{c}",
    "What does this code print or compute?\n{c}",
    "Describe this snippet in one sentence:\n{c}",
    "Is there anything wrong with this code? Explain briefly:\n{c}",
]
REVIEWS = [
    ("I loved every minute of this film.", "positive"),
    ("The food was cold and the service was slow.", "negative"),
    ("Great value for the price, would buy again.", "positive"),
    ("The battery died after two days.", "negative"),
    ("The staff were friendly and helpful.", "positive"),
    ("This book was boring and too long.", "negative"),
    ("Absolutely fantastic concert!", "positive"),
    ("The hotel room was dirty and noisy.", "negative"),
    ("My new shoes are very comfortable.", "positive"),
    ("The app keeps crashing on my phone.", "negative"),
    ("The park is clean and beautiful.", "positive"),
    ("I waited an hour and nobody answered.", "negative"),
    ("The lesson was clear and fun.", "positive"),
    ("The package arrived broken.", "negative"),
    ("What a wonderful surprise party!", "positive"),
    ("The movie ending made no sense.", "negative"),
]
ANIMALS = [
    ("dolphin", "mammal"),
    ("shark", "fish"),
    ("eagle", "bird"),
    ("frog", "amphibian"),
    ("snake", "reptile"),
    ("bat", "mammal"),
    ("penguin", "bird"),
    ("salmon", "fish"),
    ("turtle", "reptile"),
    ("whale", "mammal"),
    ("owl", "bird"),
    ("crocodile", "reptile"),
    ("salamander", "amphibian"),
    ("tuna", "fish"),
    ("horse", "mammal"),
    ("parrot", "bird"),
    ("lizard", "reptile"),
    ("toad", "amphibian"),
    ("goldfish", "fish"),
    ("kangaroo", "mammal"),
]
TOPICS = [
    ("The striker scored twice in the second half.", "sports"),
    ("The central bank raised interest rates.", "economy"),
    ("The new phone has a faster processor.", "technology"),
    ("The senate passed the new law.", "politics"),
    ("The vaccine trial showed strong results.", "health"),
    ("The band released its third album.", "music"),
    ("The stock market fell sharply today.", "economy"),
    ("The marathon attracted ten thousand runners.", "sports"),
    ("The software update fixes security bugs.", "technology"),
    ("Doctors recommend more sleep for teens.", "health"),
    ("The president met foreign leaders.", "politics"),
    ("The orchestra played a new symphony.", "music"),
]
ODD_ONE_OUT = [
    ["apple", "banana", "carrot", "grape"],
    ["red", "blue", "green", "table"],
    ["dog", "cat", "car", "horse"],
    ["Paris", "London", "Mars", "Rome"],
    ["piano", "violin", "flute", "hammer"],
    ["circle", "square", "triangle", "river"],
    ["Monday", "Friday", "April", "Sunday"],
    ["copper", "iron", "silver", "wood"],
    ["rose", "tulip", "oak", "daisy"],
]
NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jamal",
    "Kofi",
    "Lena",
    "Marco",
    "Nina",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "coins", "cards", "shells"]


def arithmetic(n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(3, 60), rng.randint(1, 30)
        kind = rng.randrange(5)
        if kind == 0:
            out.append((f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", str(a + b)))
        elif kind == 1 and a > b:
            out.append(
                (f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?", str(a - b))
            )
        elif kind == 2:
            c = rng.randint(2, 9)
            out.append((f"A box holds {c} {item}. How many {item} are in {b} boxes?", str(b * c)))
        elif kind == 3:
            c = rng.randint(2, 6)
            out.append(
                (f"{name} shares {b * c} {item} equally among {c} friends. How many does each friend get?", str(b))
            )
        else:
            price = rng.randint(2, 15)
            out.append((f"One ticket costs {price} dollars. How much do {b} tickets cost?", str(price * b)))
    return out


def build() -> list[dict]:
    items: list[tuple[str, str, str | None, str]] = []  # (family, prompt, reference, subject)
    for country, capital in CAPITALS.items():
        for t in (
            "What is the capital of {c}?",
            "Name the capital city of {c}.",
            "Which city is the capital of {c}?",
            "Tell me the capital of {c} in one word.",
        ):
            items.append(("factual", t.format(c=country), capital, country))
    for q, a in FACT_QUESTIONS:
        items.append(("factual", q, a, q))
        items.append(("factual", f"Answer briefly: {q}", a, q))
    for w in WORDS:
        for t in (
            "Define the word '{w}'.",
            "What does '{w}' mean? Answer in one sentence.",
            "Explain '{w}' to a ten-year-old.",
            "Give a short definition of {w}.",
        ):
            items.append(("definition", t.format(w=w), None, w))
    for cat in CATEGORIES:
        for n in NUMBERS:
            for t in ("Name {n} {c}.", "List {n} {c}.", "Give me a list of {n} {c}, separated by commas."):
                items.append(("list", t.format(n=n, c=cat), None, cat))
    for template, pool in REWRITE_KINDS:
        for s in pool:
            items.append(("rewrite", template.format(s=s), None, s))
    for t in SUMMARY_TEMPLATES:
        for s in SUMMARY_SENTENCES:
            items.append(("summary", t.format(s=s), None, s))
    for t in CODE_TEMPLATES:
        for c in CODE_SNIPPETS:
            items.append(("code", t.format(c=c), None, c))
    for review, label in REVIEWS:
        for t in (
            'Is this review positive or negative? "{r}"',
            'Classify the sentiment of: "{r}"',
            "Sentiment (positive or negative): {r}",
        ):
            items.append(("classification", t.format(r=review), label, review))
    for animal, cls in ANIMALS:
        for t in (
            "Is a {a} a mammal, bird, fish, reptile or amphibian?",
            "Classify the animal: {a}.",
            "Which animal class does the {a} belong to?",
        ):
            items.append(("classification", t.format(a=animal), cls, animal))
    for text, topic in TOPICS:
        items.append(("classification", f'What is the topic of this headline: "{text}"', topic, text))
        items.append(
            (
                "classification",
                f"Classify this sentence as sports, economy, technology, politics, health or music: {text}",
                topic,
                text,
            )
        )
    for group in ODD_ONE_OUT:
        for _ in range(3):
            shuffled = group[:]
            rng.shuffle(shuffled)
            items.append(("classification", f"Which word does not belong: {', '.join(shuffled)}?", None, group[-1]))
    for task in HOW_TO:
        for t in ("How do I {t}?", "Give three short steps to {t}.", "What is the easiest way to {t}?"):
            items.append(("how-to", t.format(t=task), None, task))
    for prompt, answer in arithmetic(560):
        items.append(("arithmetic", prompt, answer, prompt))
    return assign_splits(items)


def words(text: str) -> frozenset[str]:
    """The word set near-duplicates are measured on (lower case, letters, digits and apostrophes)."""
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _bucket(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def assign_splits(items: list[tuple[str, str, str | None, str]]) -> list[dict]:
    """Records with splits that test generalisation, from (family, prompt, reference, subject) items.

    1. Groups: prompts that share a (family, reference answer) pair or a (family, subject) pair (the
       slot filler: the country, the word, the sentence, ...) are joined (union-find); a group's split is
       decided by a hash of its smallest member, so whole groups land in one split.
    2. Near-duplicates: a prompt outside train whose word set has Jaccard >= NEAR_DUPLICATE with a prompt
       of another split is dropped (templates differing by one slot: "Tell me the capital of Peru in one
       word." / "... of Chile ..."); dropping never creates a new crossing.
    Result: no group and no near-duplicate pair crosses splits (checked by tests/test_splits.py).
    """
    seen, unique = set(), []
    for item in items:
        if item[1] not in seen:
            seen.add(item[1])
            unique.append(item)
    parent = list(range(len(unique)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, (family, _, reference, subject) in enumerate(unique):
        for key in ((family, "answer", reference), (family, "subject", subject)):
            if key[2] is None:
                continue
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    members: dict[int, list[int]] = {}
    for i in range(len(unique)):
        members.setdefault(find(i), []).append(i)
    split = {}
    for group in members.values():
        name = _bucket(min(unique[i][1] for i in group))
        split.update({i: name for i in group})
    sets = [words(item[1]) for item in unique]
    dropped = set()
    order = {"train": 0, "validation": 1, "test": 2}
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            if split[i] != split[j] and jaccard(sets[i], sets[j]) >= NEAR_DUPLICATE:
                dropped.add(max((i, j), key=lambda k: order[split[k]]))  # keep the train side
    records = []
    for i, (family, prompt, reference, _) in enumerate(unique):
        if i in dropped:
            continue
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        record = {
            "id": f"{family}-{digest[:10]}",
            "family": family,
            "split": split[i],
            "prompt": prompt,
            "group": f"{family}-{hashlib.sha256(unique[find(i)][1].encode()).hexdigest()[:8]}",
        }
        if reference is not None:
            record["reference"] = reference
        records.append(record)
    return records


if __name__ == "__main__":
    records = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    from collections import Counter

    print(len(records), Counter(r["family"] for r in records), Counter(r["split"] for r in records))
