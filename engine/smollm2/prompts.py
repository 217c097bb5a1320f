"""Chat prompts for distilling the draft and for benchmarking speculation, built from templates with a fixed seed.

Two disjoint sets: `training_prompts` (what the draft learns from) and `held_out_prompts` (what benchmarks send);
no subject appears in both, so a benchmark never measures a prompt the draft was trained on.
"""

from __future__ import annotations

import random

TEMPLATES = (
    "Explain {subject} to a beginner.",
    "What is {subject}? Answer in a short paragraph.",
    "Give me three facts about {subject}.",
    "Write a short poem about {subject}.",
    "What are the advantages and disadvantages of {subject}?",
    "Summarise the history of {subject} in a few sentences.",
    "How would you teach {subject} to a ten-year-old?",
    "List five questions a student might ask about {subject}.",
    "Write a short story that involves {subject}.",
    "Why is {subject} important?",
    "Describe {subject} in simple terms.",
    "What are common misconceptions about {subject}?",
)
CODE_TEMPLATES = (
    "Write a Python function that {task}.",
    "Write a Python function that {task}, with a docstring and an example.",
    "How would you {task} in Python? Show the code.",
    "Write a JavaScript function that {task}.",
)
TRAIN_SUBJECTS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the human heart", "climate change", "the Roman Empire", "electricity", "gravity", "the internet",
    "democracy", "vaccines", "the stock market", "renewable energy", "the solar system", "DNA",
    "the Industrial Revolution", "coffee", "chess", "the ocean", "honey bees", "recycling", "earthquakes",
    "the moon", "rainbows", "bread making", "the printing press", "sleep", "music theory", "bicycles",
    "the immune system", "inflation", "the Great Wall of China", "penguins", "cloud computing", "friendship",
    "the Olympic Games", "rain forests", "nuclear energy", "compound interest", "the piano", "dinosaurs",
    "public libraries", "tea", "mountains", "airplanes", "the brain", "the alphabet",
)
HELD_OUT_SUBJECTS = (
    "magnets", "the Renaissance", "tides", "bacteria", "the Amazon river", "glaciers", "satellites",
    "the violin", "deserts", "the Egyptian pyramids", "solar panels", "octopuses", "trains", "the heart of a star",
    "gardening", "the metric system",
)
TRAIN_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the nth Fibonacci number",
    "counts the vowels in a string", "merges two sorted lists", "finds the largest element of a list",
    "removes duplicates from a list", "checks whether a string is a palindrome", "computes a factorial",
    "converts Celsius to Fahrenheit", "sorts a list of dictionaries by a key", "counts words in a text",
    "flattens a nested list", "computes the average of a list", "finds the common elements of two lists",
    "reads a file and counts its lines", "validates an email address", "computes the greatest common divisor",
)
HELD_OUT_TASKS = (
    "capitalises every word in a sentence", "returns the second largest number in a list",
    "checks whether two strings are anagrams", "sums the digits of an integer",
)


def _render(subjects: tuple[str, ...], tasks: tuple[str, ...]) -> list[str]:
    prompts = [template.format(subject=subject) for subject in subjects for template in TEMPLATES]
    prompts += [template.format(task=task) for task in tasks for template in CODE_TEMPLATES]
    return prompts


def training_prompts(seed: int = 0) -> list[str]:
    """Every training prompt (672) in a seeded order."""
    prompts = _render(TRAIN_SUBJECTS, TRAIN_TASKS)
    random.Random(seed).shuffle(prompts)
    return prompts


def held_out_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts on subjects and tasks the draft never saw (cycling when more are asked than exist)."""
    prompts = _render(HELD_OUT_SUBJECTS, HELD_OUT_TASKS)
    random.Random(seed).shuffle(prompts)
    return [prompts[index % len(prompts)] for index in range(count)]
