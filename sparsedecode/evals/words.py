"""Random needle keys and values: adjective-noun words, 7-digit numbers and UUIDs, as RULER draws them."""
from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Collection
from typing import TypeVar

T = TypeVar("T")

ADJECTIVES = (
    "abundant", "adorable", "agreeable", "alive", "ancient", "angry", "anxious", "bashful", "beautiful",
    "bewildered", "bitter", "blushing", "boundless", "brave", "breezy", "bright", "broad", "bumpy",
    "calm", "careful", "cautious", "cheerful", "chilly", "clever", "cloudy", "clumsy", "colossal",
    "cooing", "courageous", "crooked", "crowded", "cuddly", "curious", "curly", "damp", "dazzling",
    "deafening", "delicate", "delightful", "determined", "dizzy", "dusty", "eager", "elated",
    "elegant", "enchanted", "energetic", "enormous", "fancy", "fearless", "feeble", "fierce",
    "filthy", "flaky", "fluffy", "foggy", "fragile", "frantic", "fresh", "friendly", "fuzzy",
    "gentle", "giant", "gigantic", "glamorous", "gleaming", "glorious", "graceful", "grumpy",
    "handsome", "harmonious", "hollow", "homely", "hungry", "icy", "illustrious", "immense",
    "jolly", "juicy", "kind", "lazy", "lively", "lonely", "loud", "lucky", "magnificent", "majestic",
    "melodic", "misty", "modern", "mysterious", "narrow", "nervous", "noisy", "obedient", "odd",
    "old-fashioned", "orange", "peaceful", "plain", "polite", "powerful", "precious", "proud",
    "puzzled", "quaint", "quick", "quiet", "rapid", "rare", "rustic", "scary", "shaggy", "shiny",
    "silent", "silky", "slimy", "smoggy", "soggy", "sparkling", "spicy", "splendid", "spotless",
    "squeaky", "steady", "sticky", "stormy", "strange", "sturdy", "swift", "tame", "tender",
    "thoughtful", "tidy", "tiny", "tranquil", "vast", "vivacious", "wandering", "wary", "wide-eyed",
    "wild", "witty", "wobbly", "wooden", "zany", "zealous",
)

NOUNS = (
    "acorn", "airport", "anchor", "apple", "apron", "arch", "badge", "bagel", "balloon", "bamboo",
    "banjo", "barn", "basket", "beacon", "bicycle", "blanket", "bonfire", "bottle", "bracelet",
    "bridge", "bucket", "butter", "cabin", "cactus", "camera", "candle", "canoe", "canyon", "carpet",
    "castle", "cathedral", "cello", "chalk", "chimney", "cinnamon", "circus", "cliff", "clock",
    "cloud", "compass", "cookie", "coral", "cottage", "crayon", "crystal", "cupboard", "curtain",
    "daisy", "desert", "diamond", "dolphin", "dragon", "drum", "eagle", "engine", "envelope", "falcon",
    "feather", "fiddle", "flamingo", "forest", "fountain", "galaxy", "garden", "geyser", "glacier",
    "goblet", "guitar", "hammer", "harbor", "harp", "helmet", "honey", "horizon", "island", "jacket",
    "jungle", "kettle", "kitten", "ladder", "lagoon", "lantern", "lemon", "library", "lighthouse",
    "lizard", "locket", "magnet", "mango", "marble", "meadow", "mirror", "mitten", "monastery",
    "mountain", "mushroom", "necklace", "notebook", "oasis", "orchard", "otter", "paddle", "palace",
    "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin",
    "puzzle", "quilt", "rabbit", "raccoon", "rainbow", "river", "rocket", "saddle", "sailboat",
    "sandal", "satchel", "scarf", "seashell", "shadow", "skyline", "sparrow", "spoon", "squirrel",
    "stadium", "statue", "suitcase", "sunflower", "teapot", "telescope", "thimble", "thunder",
    "tiger", "tornado", "tractor", "trumpet", "tulip", "tunnel", "umbrella", "valley", "velvet",
    "violin", "volcano", "wagon", "walrus", "waterfall", "whistle", "willow", "windmill", "zeppelin",
)


def random_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# RULER's `type_needle_k` / `type_needle_v` names
VALUE_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "words": random_word,
    "numbers": random_number,
    "uuids": random_uuid,
}


# every adjective-noun pair: a large pool of distinct words for when a text's own vocabulary runs out
COMPOUND_WORDS: tuple[str, ...] = tuple(f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS)


def draw_unique(draw: Callable[[], T], count: int, exclude: Collection[T] = ()) -> list[T]:
    """`count` distinct draws, none in `exclude`; the first k draws do not depend on `count`."""
    seen = set(exclude)
    drawn: list[T] = []
    while len(drawn) < count:
        item = draw()
        if item not in seen:
            seen.add(item)
            drawn.append(item)
    return drawn
