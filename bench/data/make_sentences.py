#!/usr/bin/env python3
"""Writes sentences.txt: 1000 synthetic English sentences (1-3 clauses, about 6-45 words), the
fixed input of `metal-candle bench embed` and bench/peers/embed_st.py. Deterministic (seed 0)."""
import random

random.seed(0)
subj = ["A man", "The woman", "Two children", "An old dog", "The committee", "My neighbour", "A small bird", "The engineer",
        "Several students", "The river", "A young musician", "The city council", "Our team", "The cat", "A pilot"]
verb = ["is eating", "walks along", "looks at", "writes about", "builds", "repairs", "sings near", "reads", "carries",
        "paints", "studies", "crosses", "discusses", "watches", "follows"]
obj = ["a piece of bread", "the quiet harbour", "an unfinished bridge", "the morning newspaper", "a wooden boat",
       "the mountain road", "a long letter", "the new library", "an empty field", "the evening train", "a broken violin",
       "the annual report", "a field of sunflowers", "the distant lighthouse", "a basket of apples"]
tail = ["before the storm arrives", "while the sun sets over the hills", "because nobody else would do it",
        "with great care and patience", "after a long and tiring day", "in the middle of the crowded market",
        "despite the heavy rain", "as the bells ring in the old tower", "without saying a single word",
        "for the third time this week"]
lines = []
for i in range(1000):
    n = random.choice([1, 1, 1, 2, 2, 3])
    parts = []
    for _ in range(n):
        s = f"{random.choice(subj)} {random.choice(verb)} {random.choice(obj)}"
        if random.random() < 0.6:
            s += " " + random.choice(tail)
        parts.append(s)
    lines.append(". ".join(parts) + ".")
open("sentences.txt", "w").write("\n".join(lines) + "\n")
