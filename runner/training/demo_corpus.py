"""The demo set's sentences and voices: a larger grammar than `corpus.sentences` (names, animals, things,
numbers, days, places), drawn into disjoint splits for the bundled demo model and its manifests
(`runner.training.demo_recipe`)."""

from __future__ import annotations

import random

from runner.training.corpus import VOICES, Voice

# fmt: off
DEMO_VOICES = VOICES + tuple(f"en-us+f{i}" for i in range(1, 6)) + tuple(f"en-us+m{i}" for i in range(1, 8)) + (
    "en-gb+f1", "en-gb+m2", "en-gb+m4", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
    "en-us-nyc", "en-029+f2", "en-029+m5", "en-us+klatt", "en-gb+klatt2",
)

_DEMO_NAMES = ("anna", "ben", "lucy", "tom", "sarah", "david", "emma", "jack", "maria", "peter", "kate",
               "sam", "linda", "james", "alice", "robert", "nina", "oscar", "julia", "frank")
# (singular, plural)
_DEMO_PEOPLE = tuple((w, {"man": "men", "woman": "women", "child": "children"}.get(w, w + "s")) for w in (
    "man", "woman", "boy", "girl", "teacher", "doctor", "farmer", "driver", "child", "student", "nurse",
    "king", "queen", "cook", "friend", "brother", "sister", "mother", "father", "neighbor", "pilot", "singer",
    "worker", "baker", "painter", "officer", "captain", "visitor", "player", "uncle", "aunt"))
_DEMO_ANIMALS = (("cat", "cats"), ("dog", "dogs"), ("horse", "horses"), ("bird", "birds"), ("fish", "fish"),
                 ("cow", "cows"), ("sheep", "sheep"), ("duck", "ducks"), ("mouse", "mice"),
                 ("rabbit", "rabbits"), ("fox", "foxes"), ("bear", "bears"), ("lion", "lions"),
                 ("frog", "frogs"), ("goat", "goats"), ("pig", "pigs"), ("monkey", "monkeys"),
                 ("chicken", "chickens"), ("puppy", "puppies"), ("kitten", "kittens"))
_DEMO_THINGS = tuple((w, {"box": "boxes", "bus": "buses", "knife": "knives", "glass": "glasses",
                          "watch": "watches", "dress": "dresses", "dish": "dishes", "cherry": "cherries",
                          "strawberry": "strawberries", "candy": "candies", "brush": "brushes"}.get(w, w + "s"))
                     for w in (
    "box", "apple", "house", "letter", "car", "door", "coat", "book", "chair", "boat", "kite", "cup", "table",
    "bag", "hat", "shoe", "ball", "key", "phone", "lamp", "clock", "bottle", "window", "picture", "bed",
    "bike", "train", "bus", "tree", "flower", "egg", "cake", "shirt", "pen", "map", "ring", "basket", "rope",
    "stone", "orange", "banana", "ticket", "radio", "computer", "camera", "blanket", "pillow", "umbrella",
    "wallet", "candle", "mirror", "plate", "spoon", "knife", "fork", "bucket", "ladder", "hammer", "guitar",
    "piano", "glass", "watch", "dress", "dish", "jacket", "sandwich", "pencil", "envelope", "newspaper",
    "backpack", "tomato", "potato", "cherry", "strawberry", "cookie", "candy", "brush", "towel", "button",
    "sock", "glove", "scarf", "helmet", "wheel", "bridge", "tower", "castle", "island", "ship", "truck",
    "plane", "rocket", "drum", "violin", "desk", "shelf", "sofa", "carpet", "fence", "gate", "roof",
    "garden", "kitchen"))
_DEMO_MASS = ("bread", "water", "milk", "tea", "coffee", "soup", "rice", "cheese", "butter", "sugar",
              "juice", "paper", "money", "music", "snow", "sand", "wood", "salt", "honey", "chocolate")
_DEMO_COLORS = ("red", "green", "blue", "yellow", "black", "white", "brown", "pink", "purple", "gray",
                "orange", "golden", "silver")
_DEMO_ADJS = _DEMO_COLORS + (
    "big", "small", "old", "new", "long", "short", "heavy", "light", "warm", "cold", "hot", "clean",
    "dirty", "soft", "hard", "tall", "little", "young", "happy", "sad", "quiet", "loud", "dark", "bright",
    "empty", "full", "round", "broken", "fresh", "sweet", "strange", "lovely", "tiny", "huge", "wet", "dry",
    "cheap", "expensive", "beautiful", "ugly", "famous", "funny", "wooden", "plastic", "shiny", "lazy",
    "clever", "friendly", "hungry", "sleepy", "careful", "noisy", "gentle", "wild", "favorite", "special")
_DEMO_STATES = ("happy", "sad", "tired", "busy", "hungry", "sleepy", "angry", "ready", "late", "early",
                "sick", "bored", "excited", "nervous", "lucky", "afraid", "thirsty", "cold", "worried", "proud")
# (base, third person, past, -ing), transitive, taking a noun phrase
_DEMO_VERBS = (
    ("see", "sees", "saw", "seeing"), ("find", "finds", "found", "finding"), ("like", "likes", "liked", "liking"),
    ("take", "takes", "took", "taking"), ("bring", "brings", "brought", "bringing"),
    ("want", "wants", "wanted", "wanting"), ("open", "opens", "opened", "opening"),
    ("paint", "paints", "painted", "painting"), ("clean", "cleans", "cleaned", "cleaning"),
    ("move", "moves", "moved", "moving"), ("hold", "holds", "held", "holding"),
    ("need", "needs", "needed", "needing"), ("sell", "sells", "sold", "selling"),
    ("draw", "draws", "drew", "drawing"), ("carry", "carries", "carried", "carrying"),
    ("drop", "drops", "dropped", "dropping"), ("wash", "washes", "washed", "washing"),
    ("fix", "fixes", "fixed", "fixing"), ("love", "loves", "loved", "loving"),
    ("watch", "watches", "watched", "watching"), ("catch", "catches", "caught", "catching"),
    ("throw", "throws", "threw", "throwing"), ("push", "pushes", "pushed", "pushing"),
    ("pull", "pulls", "pulled", "pulling"), ("keep", "keeps", "kept", "keeping"),
    ("leave", "leaves", "left", "leaving"), ("make", "makes", "made", "making"),
    ("show", "shows", "showed", "showing"), ("hide", "hides", "hid", "hiding"),
    ("follow", "follows", "followed", "following"), ("count", "counts", "counted", "counting"),
    ("check", "checks", "checked", "checking"), ("visit", "visits", "visited", "visiting"),
    ("lift", "lifts", "lifted", "lifting"), ("kick", "kicks", "kicked", "kicking"),
    ("touch", "touches", "touched", "touching"), ("build", "builds", "built", "building"),
    ("cook", "cooks", "cooked", "cooking"), ("share", "shares", "shared", "sharing"),
    ("borrow", "borrows", "borrowed", "borrowing"), ("return", "returns", "returned", "returning"),
    ("forget", "forgets", "forgot", "forgetting"), ("remember", "remembers", "remembered", "remembering"),
    ("lose", "loses", "lost", "losing"), ("sell", "sells", "sold", "selling"),
    ("hate", "hates", "hated", "hating"), ("enjoy", "enjoys", "enjoyed", "enjoying"),
    ("close", "closes", "closed", "closing"), ("fill", "fills", "filled", "filling"),
    ("look at", "looks at", "looked at", "looking at"), ("wait for", "waits for", "waited for", "waiting for"),
    ("ask for", "asks for", "asked for", "asking for"), ("pick up", "picks up", "picked up", "picking up"),
    ("put down", "puts down", "put down", "putting down"), ("talk about", "talks about", "talked about",
                                                                "talking about"),
)
_DEMO_PLACES = ("garden", "river", "market", "hill", "window", "bridge", "school", "kitchen", "table",
                "station", "park", "beach", "forest", "city", "office", "shop", "lake", "church", "village",
                "road", "yard", "hospital", "library", "farm", "museum", "airport", "bank", "hotel",
                "restaurant", "corner", "harbor", "mountain", "playground", "bakery", "zoo", "cinema")
_DEMO_PREPS = ("in", "near", "at", "on", "by", "under", "behind", "next to", "inside", "outside", "across",
               "in front of", "close to", "far from", "above", "below", "beside")
_DEMO_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DEMO_TIMES = ("in the morning", "in the afternoon", "in the evening", "at night", "after dinner",
               "before lunch", "before noon", "every day", "last week", "next year", "today", "tomorrow",
               "yesterday", "this weekend", "at midnight", "at sunrise", "last summer", "next winter",
               "in the spring", "in the autumn", "right now", "later", "once a month", "twice a week")
_DEMO_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
              "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
              "nineteen")
_DEMO_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_DEMO_VEHICLES = ("train", "bus", "plane", "boat", "ship", "taxi")
_DEMO_OPENERS = ("shop", "bank", "museum", "library", "market", "bakery", "school", "office", "cinema",
                 "restaurant")
_DEMO_POSS = ("my", "your", "his", "her", "our")
# fmt: on


def number_words(n: int) -> str:
    """0..999 spelled out in lowercase words ("one hundred and twenty two")."""
    if n < 20:
        return _DEMO_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _DEMO_TENS[tens] + ("" if ones == 0 else " " + _DEMO_ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _DEMO_ONES[hundreds] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _DemoGrammar:
    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, seq):
        return self.r.choice(seq)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def count_noun(self) -> tuple[str, str]:
        return self.pick(_DEMO_THINGS if self.chance(0.6) else _DEMO_ANIMALS)

    def np(self, plural_ok: bool = True) -> str:
        """A noun phrase: determiner, optional adjective, noun (or a name, or a mass noun)."""
        x = self.r.random()
        if x < 0.08:
            return self.pick(_DEMO_NAMES) + "'s " + self.count_noun()[0]
        if x < 0.16:
            return ("some " if self.chance(0.5) else "the ") + self.pick(_DEMO_MASS)
        noun = self.count_noun() if self.chance(0.8) else self.pick(_DEMO_PEOPLE)
        plural = plural_ok and self.chance(0.25)
        word = noun[1] if plural else noun[0]
        if self.chance(0.55):
            word = self.pick(_DEMO_ADJS) + " " + word
        det = self.r.random()
        if plural:
            return ("the " if det < 0.5 else self.pick(_DEMO_POSS) + " " if det < 0.8 else "some ") + word
        if det < 0.45:
            return "the " + word
        if det < 0.75:
            return _a(word)
        return self.pick(_DEMO_POSS) + " " + word

    def subject(self) -> str:
        x = self.r.random()
        if x < 0.3:
            return self.pick(_DEMO_NAMES)
        noun = self.pick(_DEMO_PEOPLE if x < 0.75 else _DEMO_ANIMALS)[0]
        if self.chance(0.35):
            noun = self.pick(_DEMO_ADJS) + " " + noun
        if self.chance(0.15):
            return _a(noun)
        return self.pick(("the", "the", "my", "your", "his", "her", "our")) + " " + noun

    def place(self) -> str:
        return self.pick(_DEMO_PREPS) + " the " + self.pick(_DEMO_PLACES)

    def number(self) -> str:
        x = self.r.random()
        return number_words(
            self.r.randint(2, 12) if x < 0.5 else self.r.randint(13, 99) if x < 0.85 else self.r.randint(100, 999)
        )

    def hour(self) -> str:
        return number_words(self.r.randint(1, 12))

    def clock(self) -> str:
        x = self.r.random()
        if x < 0.3:
            return self.hour() + " o'clock"
        if x < 0.5:
            return "half past " + self.hour()
        if x < 0.65:
            return "quarter " + self.pick(("past", "to")) + " " + self.hour()
        minutes = self.r.choice((5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55))
        return self.hour() + " " + number_words(minutes)

    def sentence(self) -> str:
        kind = self.r.random()
        r, pick = self.r, self.pick
        if kind < 0.22:  # statement, present or past
            verb = pick(_DEMO_VERBS)
            parts = [self.subject(), verb[1] if self.chance(0.5) else verb[2], self.np()]
            if self.chance(0.45):
                parts.append(self.place())
            if self.chance(0.3):
                parts.append(pick(_DEMO_TIMES) if self.chance(0.7) else "on " + pick(_DEMO_DAYS))
            return " ".join(parts)
        if kind < 0.36:  # questions
            q = r.randrange(12)
            noun = self.count_noun()
            return (
                "where is " + self.np(False),
                "where did " + self.subject() + " put " + self.np(),
                "can you see " + self.np() + " " + self.place(),
                "do you want " + self.np(),
                "who took " + self.np(),
                "is " + self.np(False) + " " + pick(_DEMO_ADJS),
                "why is " + self.np(False) + " so " + pick(_DEMO_ADJS),
                "how many " + noun[1] + " are there " + self.place(),
                "what time does the "
                + pick(_DEMO_OPENERS + _DEMO_VEHICLES)
                + " "
                + pick(("open", "close", "leave", "arrive", "start")),
                "what color is " + self.np(False),
                "are you going to the " + pick(_DEMO_PLACES) + " " + pick(_DEMO_TIMES),
                "have you seen " + self.np() + " " + pick(_DEMO_TIMES),
            )[q]
        if kind < 0.50:  # numbers
            q = r.randrange(9)
            noun = self.count_noun()
            adj = (pick(_DEMO_ADJS) + " ") if self.chance(0.4) else ""
            return (
                self.subject() + " has " + self.number() + " " + adj + noun[1],
                "there are " + self.number() + " " + adj + noun[1] + " " + self.place(),
                "i counted " + self.number() + " " + noun[1] + " " + pick(_DEMO_TIMES),
                pick(_DEMO_NAMES) + " bought " + self.number() + " " + noun[1] + " for " + self.number() + " dollars",
                "the answer is " + number_words(r.randint(0, 999)),
                "it costs " + self.number() + " dollars and " + number_words(r.randint(1, 99)) + " cents",
                "room number "
                + number_words(r.randint(1, 999))
                + " is "
                + pick(("empty", "ready", "locked", "free", "on the left")),
                pick(_DEMO_NAMES) + " is " + number_words(r.randint(5, 95)) + " years old",
                "add " + number_words(r.randint(1, 50)) + " and " + number_words(r.randint(1, 50)),
            )[q]
        if kind < 0.62:  # times and days
            q = r.randrange(8)
            return (
                "it is " + self.clock(),
                "the " + pick(_DEMO_VEHICLES) + " leaves at " + self.clock(),
                "meet me at " + self.clock() + " " + self.place(),
                "the " + pick(_DEMO_OPENERS) + " opens at " + self.hour() + " in the morning",
                "dinner is at " + self.clock() + " on " + pick(_DEMO_DAYS),
                "we start work at " + self.clock() + " every " + pick(_DEMO_DAYS),
                pick(_DEMO_NAMES) + " called me at " + self.clock() + " " + pick(_DEMO_TIMES),
                "see you on " + pick(_DEMO_DAYS) + " at " + self.clock(),
            )[q]
        if kind < 0.72:  # colors and descriptions
            q = r.randrange(7)
            noun = self.count_noun()[0]
            return (
                "the " + noun + " is " + pick(_DEMO_COLORS),
                "my favorite color is " + pick(_DEMO_COLORS),
                pick(_DEMO_POSS)
                + " "
                + pick(("coat", "dress", "shirt", "hat", "scarf", "jacket", "bag"))
                + " is "
                + pick(_DEMO_COLORS)
                + " and "
                + pick(_DEMO_COLORS),
                "the sky is " + pick(("gray", "blue", "dark", "bright", "pink", "orange")) + " " + pick(_DEMO_TIMES),
                "i painted " + self.np() + " " + pick(_DEMO_COLORS),
                self.np(False) + " looks " + pick(_DEMO_ADJS),
                pick(_DEMO_NAMES) + "'s " + noun + " is " + pick(_DEMO_ADJS) + " and " + pick(_DEMO_ADJS),
            )[q]
        if kind < 0.88:  # contractions
            q = r.randrange(16)
            verb = pick(_DEMO_VERBS)
            return (
                "i don't like " + self.np(),
                "it's a " + pick(_DEMO_ADJS) + " day " + pick(_DEMO_TIMES),
                "we're going to the " + pick(_DEMO_PLACES) + " " + pick(_DEMO_TIMES),
                "they're " + verb[3] + " " + self.np(),
                "she can't find her " + self.count_noun()[0],
                "he won't " + verb[0] + " " + self.np(),
                "let's go to the " + pick(_DEMO_PLACES),
                "that's my " + pick(_DEMO_ADJS) + " " + self.count_noun()[0],
                "i'm looking for " + self.np(),
                "you've got " + self.number() + " " + self.count_noun()[1],
                "we'll " + verb[0] + " " + self.np() + " " + pick(_DEMO_TIMES),
                "isn't that " + pick(_DEMO_NAMES) + "'s " + self.count_noun()[0],
                pick(("he's", "she's", "i'm", "we're", "you're", "they're"))
                + " "
                + pick(_DEMO_STATES)
                + " "
                + pick(_DEMO_TIMES),
                "i'd like " + self.np() + " please",
                "don't " + verb[0] + " " + self.np(),
                "i haven't seen " + self.np() + " " + pick(_DEMO_TIMES),
            )[q]
        # imperatives and states
        q = r.randrange(6)
        verb = pick(_DEMO_VERBS)
        return (
            "please " + verb[0] + " " + self.np() + (" " + self.place() if self.chance(0.5) else ""),
            "put " + self.np() + " " + pick(_DEMO_PREPS) + " the " + self.count_noun()[0],
            "give me " + self.np(),
            self.subject() + " was " + pick(_DEMO_STATES) + " " + pick(_DEMO_TIMES),
            self.subject() + " is " + verb[3] + " " + self.np() + " " + self.place(),
            self.subject() + " will " + verb[0] + " " + self.np() + " " + pick(_DEMO_TIMES),
        )[q]


def demo_sentences(count: int, seed: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """`count` distinct sentences of the demo grammar (a few hundred words), none in `exclude`.

    Lowercase letters, spaces and apostrophes only; seeded: the same seed gives the same list.
    """
    rng = random.Random(seed)
    grammar = _DemoGrammar(rng)
    out, seen = [], set(exclude)
    while len(out) < count:
        text = " ".join(grammar.sentence().split())
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def demo_splits(sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Disjoint lists of demo sentences, one per named split (in the order given): no sentence is in
    two splits, so held-out splits never share a sentence with training."""
    pool = demo_sentences(sum(sizes.values()), seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = pool[start : start + size]
        start += size
    return out


def random_demo_voice(rng: random.Random) -> Voice:
    """A voice for the demo corpus: any of `DEMO_VOICES`, 120-200 words per minute, pitch 25-75."""
    return Voice(rng.choice(DEMO_VOICES), rng.randint(120, 200), rng.randint(25, 75))
