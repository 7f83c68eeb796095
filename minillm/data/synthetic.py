"""A deterministic corpus of short children's stories, generated offline from a templated grammar.

Varied enough (characters, places, objects, ``PLOTS`` with several phrasings per sentence, dialogue)
that a ~1M-parameter model learns agreement (he/she/it), who-said-what and plot order in a few CPU
minutes. All randomness comes from one ``random.Random`` seeded with a string (hashed with SHA-512,
independent of PYTHONHASHSEED), so the corpus is a pure function of ``(n_stories, seed, split)``.
"""

import random

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Anna", "Zoe", "Lucy", "Amy", "Ruby", "Ella", "Nina", "Rosa"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Noah", "Finn", "Oscar", "Kai", "Milo"]
ANIMALS = [  # (kind, name, sound)
    ("dog", "Spot", "barked"), ("cat", "Kitty", "meowed"), ("bunny", "Hop", "squeaked"),
    ("bear", "Fuzzy", "growled softly"), ("bird", "Tweet", "chirped"), ("duck", "Quack", "quacked"),
    ("frog", "Ribbit", "croaked"), ("mouse", "Pip", "squeaked"), ("fox", "Rusty", "yipped"),
]
TRAITS = ["kind", "curious", "brave", "shy", "happy", "silly", "clever", "gentle", "busy", "little"]
PLACES = [  # (place, detail)
    ("the park", "the tall green trees"), ("the beach", "the soft warm sand"),
    ("the forest", "the big old oak tree"), ("the garden", "the bright red flowers"),
    ("the farm", "the noisy barn"), ("the school yard", "the shiny slide"),
    ("the meadow", "the tall yellow grass"), ("the lake", "the calm blue water"),
    ("the hill", "the windy top"), ("the village", "the little bakery"),
]
OBJECTS = [  # (object, adjective)
    ("ball", "red"), ("kite", "blue"), ("hat", "yellow"), ("teddy bear", "soft"), ("boat", "little"),
    ("drum", "loud"), ("book", "big"), ("shell", "pretty"), ("crayon box", "new"), ("train", "toy"),
    ("cup", "shiny"), ("scarf", "warm"),
]
FOODS = ["a cookie", "an apple", "a piece of cake", "some bread", "a big carrot", "a warm muffin"]
WEATHER = ["sunny", "warm", "windy", "cloudy", "bright", "cool"]
OPENINGS = [
    "Once upon a time, there was a {trait} {kind} named {hero}.",
    "One day, a {trait} {kind} named {hero} went to {place}.",
    "There once was a {trait} {kind} called {hero}.",
    "Once upon a time, in a small town, there lived a {trait} {kind} named {hero}.",
]
LESSONS = {  # plot name -> lessons that fit it
    "_lost": ["{hero} learned to be careful with the things {he} loves.",
              "{hero} learned that it is good to ask for help."],
    "_share": ["{hero} learned that sharing makes everyone happy.",
               "From that day on, {hero} always shared {his} toys."],
    "_scared": ["{hero} learned that being brave is not the same as not being scared."],
    "_help": ["{hero} learned that it feels good to help others."],
    "_surprise": ["{hero} learned that giving is as much fun as getting."],
    "_storm": ["{hero} learned that friends keep each other safe."],
    "_contest": ["{hero} learned that a friend is more important than winning."],
}


def _character(rng: random.Random, taken: set[str]) -> dict[str, str]:
    """A character with a name, kind, trait and the pronouns that agree with them."""
    roll = rng.random()
    if roll < 0.4:
        name, kind, he, him, his, sound = rng.choice(GIRLS), "girl", "she", "her", "her", "said"
    elif roll < 0.8:
        name, kind, he, him, his, sound = rng.choice(BOYS), "boy", "he", "him", "his", "said"
    else:
        kind, name, sound = rng.choice(ANIMALS)
        he, him, his = "it", "it", "its"
    if name in taken:  # two heroes with one name would make "who did what" unlearnable
        return _character(rng, taken)
    taken.add(name)
    known = f"{name} the {kind}" if kind not in ("girl", "boy") else f"a {kind} named {name}"
    return {"name": name, "kind": kind, "known": known, "he": he, "him": him, "his": his, "sound": sound,
            "trait": rng.choice(TRAITS)}


def _say(rng: random.Random, who: dict[str, str], line: str) -> str:
    """One line of dialogue, with the speaker before or after the quote."""
    verb = rng.choice(["said", "asked" if line.endswith("?") else "shouted", who["sound"]])
    if rng.random() < 0.5:
        quoted = line[:-1] + "," if line.endswith(".") else line
        return f'"{quoted}" {who["name"]} {verb}.'
    return f'{who["name"]} {verb}, "{line}"'


def _lost(rng, h, f, place, obj, adj) -> list[str]:
    return [
        f"{h['name']} loved {h['his']} {adj} {obj} more than anything.",
        f"One {rng.choice(WEATHER)} day, {h['he']} took the {obj} to {place[0]} to play near {place[1]}.",
        f"{h['name']} played and played. When it was time to go home, the {obj} was gone!",
        f"{h['name']} felt very {rng.choice(['sad', 'worried', 'upset'])}.",
        _say(rng, h, f"Where is my {obj}?"),
        f"{h['his'].capitalize()} friend {f['known']} came to help.",
        _say(rng, f, rng.choice(["Let's look together!", "Do not cry. We will find it.",
                                  "I will help you look."])),
        f"They looked under the {rng.choice(['bench', 'bush', 'rocks', 'leaves', 'table'])} "
        f"and behind {place[1]}.",
        f"At last, {f['name']} saw something {adj}. It was the {obj}!",
        _say(rng, h, rng.choice(["Thank you!", "You found it! Thank you so much!",
                                  "You are the best friend ever!"])),
    ]


def _share(rng, h, f, place, obj, adj) -> list[str]:
    return [
        f"{h['name']} had a {adj} {obj}. {h['he'].capitalize()} played with it every day.",
        f"One day, {f['known']} came to {place[0]} and saw the {obj}.",
        _say(rng, f, f"Can I play with your {obj}, please?"),
        _say(rng, h, rng.choice(["No, it is mine!", "No! Go away.", "No, I want it for me."])),
        f"{f['name']} felt sad and walked away. {f['he'].capitalize()} sat alone by {place[1]}.",
        f"Soon {h['name']} felt {rng.choice(['lonely', 'bad', 'sorry'])}. "
        f"Playing alone was not fun.",
        f"{h['name']} went to {f['name']} and gave {f['him']} the {obj}.",
        _say(rng, h, rng.choice(["I am sorry. Let's play together.", "Here, you can have a turn.",
                                  "We can share it."])),
        f"{f['name']} smiled. They played with the {obj} all day and laughed a lot.",
    ]


def _scared(rng, h, f, place, obj, adj) -> list[str]:
    thing = rng.choice(["climb the big tree", "swim in the water", "go down the tall slide",
                        "ride the bike", "jump over the puddle", "sing in front of everyone"])
    return [
        f"{h['name']} wanted to {thing}, but {h['he']} was scared.",
        _say(rng, h, f"What if I fall?"),
        f"{f['known']} was at {place[0]} too.",
        _say(rng, f, rng.choice(["You can do it! I will stay with you.",
                                  "Try a little bit first.", "I was scared too, the first time."])),
        f"{h['name']} took a deep breath. {h['he'].capitalize()} tried once, then again.",
        f"At last, {h['he']} did it! {h['name']} felt {rng.choice(['proud', 'happy', 'strong'])}.",
        _say(rng, h, "I did it! That was fun!"),
    ]


def _help(rng, h, f, place, obj, adj) -> list[str]:
    kind, name, sound = rng.choice(ANIMALS)
    trouble = rng.choice(["was stuck in a bush", "could not find its mom", "had a hurt leg",
                          "was cold and hungry", "was up in a tree and could not get down"])
    return [
        f"{h['name']} and {f['name']} went to {place[0]} to play with a {adj} {obj}.",
        f"Near {place[1]}, they heard a small sound. A little {kind} {trouble}.",
        f"The {kind} {sound}. It looked {rng.choice(['scared', 'sad', 'tired'])}.",
        _say(rng, f, f"We have to help the {kind}!"),
        f"{h['name']} was careful and gentle. {f['name']} gave the {kind} {rng.choice(FOODS)}.",
        f"Soon the {kind} felt better. It {sound} happily and ran home.",
        _say(rng, h, rng.choice(["We did a good thing today.", "I hope it comes back to play.",
                                  "Helping feels good."])),
    ]


def _surprise(rng, h, f, place, obj, adj) -> list[str]:
    return [
        f"Tomorrow was {f['name']}'s birthday. {h['name']} wanted to make a surprise.",
        f"{h['name']} made a card with {rng.choice(['red', 'blue', 'green', 'pink'])} paper "
        f"and found a {adj} {obj} for a gift.",
        f"{h['he'].capitalize()} hid it behind {place[1]} at {place[0]}.",
        f"The next day, {h['name']} took {f['name']} to {place[0]}.",
        _say(rng, h, "Close your eyes!"),
        f"{f['name']} opened {f['his']} eyes and saw the {obj}.",
        _say(rng, f, rng.choice(["Wow! Is it for me?", "What a great surprise!",
                                  "This is the best birthday!"])),
        f"They ate {rng.choice(FOODS)} and played until the sun went down.",
    ]


def _storm(rng, h, f, place, obj, adj) -> list[str]:
    return [
        f"{h['name']} and {f['name']} were playing at {place[0]} with a {adj} {obj}.",
        "Suddenly, the sky got dark. The wind was strong and the rain began to fall.",
        _say(rng, f, rng.choice(["I am scared of the thunder!", "What do we do now?"])),
        _say(rng, h, rng.choice(["Let's go home, quick!", "Hold my hand. We will be safe."])),
        f"They ran home as fast as they could. {h['name']} held the {obj} tight.",
        f"At home, mom gave them {rng.choice(['warm milk', 'a big towel', 'hot soup'])}.",
        f"Soon the rain stopped and the sun came out. They saw a rainbow over {place[0]}.",
    ]


def _contest(rng, h, f, place, obj, adj) -> list[str]:
    race = rng.choice(["a race", "a jumping game", "a game of catch", "a hide and seek game"])
    return [
        f"At {place[0]}, {h['name']} and {f['name']} wanted to play {race}.",
        _say(rng, h, rng.choice(["I will win!", "I am the fastest!", "Ready, set, go!"])),
        f"They played hard. {f['name']} fell down and hurt {f['his']} knee.",
        f"{h['name']} stopped. {h['he'].capitalize()} did not care about winning now.",
        _say(rng, h, "Are you okay? Let me help you."),
        f"{h['name']} helped {f['name']} get up, and they walked to {place[1]} together.",
        _say(rng, f, "Thank you. You are a good friend."),
    ]


PLOTS = [_lost, _share, _scared, _help, _surprise, _storm, _contest]


def _story(rng: random.Random) -> str:
    """One story: opening, a plot with dialogue, an ending feeling and often a lesson."""
    taken: set[str] = set()
    hero, friend = _character(rng, taken), _character(rng, taken)
    place, (obj, adj) = rng.choice(PLACES), rng.choice(OBJECTS)
    fill = {"trait": hero["trait"], "kind": hero["kind"], "hero": hero["name"], "place": place[0]}
    opening = rng.choice(OPENINGS).format(**fill)
    plot = rng.choice(PLOTS)
    body = plot(rng, hero, friend, place, obj, adj)
    end = rng.choice([
        f"{hero['name']} and {friend['name']} were very happy.",
        f"That night, {hero['name']} went to bed with a big smile.",
        "They were best friends forever.",
        f"It was the best day ever for {hero['name']}.",
    ])
    sentences = [opening, *body, end]
    if rng.random() < 0.6:
        lesson = rng.choice(LESSONS[plot.__name__])
        sentences.append(lesson.format(hero=hero["name"], he=hero["he"], his=hero["his"]))
    # Two or three paragraphs, like TinyStories.
    cut = sorted(rng.sample(range(2, len(sentences) - 1), rng.choice([1, 2])))
    paragraphs = [" ".join(sentences[a:b]) for a, b in zip([0, *cut], [*cut, len(sentences)])]
    return "\n".join(paragraphs)


def generate_stories(n_stories: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n_stories`` stories, a pure function of ``(n_stories, seed, split)``."""
    rng = random.Random(f"minillm-synthetic:{seed}:{split}")
    return [_story(rng) for _ in range(n_stories)]
