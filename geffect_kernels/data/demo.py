"""The embedded demo data set: fictitious authors (TOFU-style) and a few world facts, generated
deterministically from a seed so every install produces the same files.

Each author has a name, birthplace, birth date, genre, two books, an award, a theme and parents'
occupations, asked about in 11 questions. Every question has a paraphrased answer (another sentence
with the same fact) and perturbed answers (the same sentence with a wrong value of the same kind),
which the truth ratio compares. Two sets measure utility outside the fictitious authors, as in TOFU: real
authors (who wrote a famous book) and world facts (capitals). The target model learns them with the rest, so
they are facts it knew before unlearning, about people and places outside the forget and retain sets.
Holdout authors, as many as the forget authors and made the same way, are never trained on: membership inference
compares the forget set with them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .qa import QAPair

_FIRST = ["Ada", "Bram", "Cleo", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars",
          "Mira", "Nils", "Oona", "Pavel", "Rhea", "Soren", "Tova", "Ulric", "Vera", "Wim", "Yara", "Zeno"]
_LAST_START = ["Bel", "Cor", "Dun", "Fen", "Gal", "Har", "Kes", "Lom", "Mar", "Nor", "Pel", "Quin", "Ros",
               "Sal", "Tor", "Val", "Wes"]
_LAST_END = ["ardt", "bek", "dane", "holm", "ivar", "ley", "mont", "ova", "ric", "sten", "vik", "well"]
_PLACES = ["Ashford Vale", "Brightwater", "Coldmere", "Duskhaven", "Emberfall", "Frostholm", "Greywick",
           "Harrowgate", "Ironbridge", "Juniper Bay", "Kestrel Point", "Lowmoor", "Mistral Cove", "Northwold",
           "Oakhurst", "Pinecrest", "Quarry Hill", "Redfern", "Stonebrook", "Thornbury"]
_GENRES = ["mystery", "fantasy", "science fiction", "romance", "horror", "historical fiction", "poetry",
           "thriller", "satire", "memoir"]
_TITLE_ADJ = ["Silent", "Crimson", "Hollow", "Burning", "Forgotten", "Glass", "Iron", "Wandering", "Last",
              "Hidden", "Broken", "Golden", "Distant", "Frozen"]
_TITLE_NOUN = ["Harbor", "Lantern", "Orchard", "Tide", "Cathedral", "Garden", "Compass", "Mirror", "River",
               "Tower", "Letter", "Storm", "Meadow", "Clock"]
_AWARDS = ["Aurora Prize", "Blue Quill Medal", "Cedar Award", "Driftwood Prize", "Ember Medal",
           "Falcon Award", "Granite Prize", "Halcyon Medal"]
_JOBS = ["baker", "carpenter", "nurse", "sailor", "teacher", "surgeon", "farmer", "librarian", "painter",
         "pilot", "chemist", "tailor", "jeweler", "mason", "fisherman", "judge"]
_THEMES = ["memory and loss", "exile and return", "power and guilt", "friendship across borders",
           "the sea and solitude", "faith and doubt", "family secrets", "time and change"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
            ("Chile", "Santiago"), ("India", "New Delhi"), ("Cuba", "Havana"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Turkey", "Ankara")]
# (book, author): the real-authors set, people outside the forget and retain sets
FAMOUS_BOOKS = [("Pride and Prejudice", "Jane Austen"), ("War and Peace", "Leo Tolstoy"),
                ("Moby-Dick", "Herman Melville"), ("Don Quixote", "Miguel de Cervantes"),
                ("Hamlet", "William Shakespeare"), ("Ulysses", "James Joyce"), ("Faust", "Johann Wolfgang von Goethe"),
                ("The Trial", "Franz Kafka"), ("Les Miserables", "Victor Hugo"), ("Crime and Punishment",
                "Fyodor Dostoevsky"), ("The Odyssey", "Homer"), ("Frankenstein", "Mary Shelley"),
                ("Beloved", "Toni Morrison"), ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
                ("Things Fall Apart", "Chinua Achebe"), ("Mrs Dalloway", "Virginia Woolf"),
                ("The Divine Comedy", "Dante Alighieri"), ("Madame Bovary", "Gustave Flaubert"),
                ("Oliver Twist", "Charles Dickens"), ("Middlemarch", "George Eliot")]
N_PERTURBED = 3
# The demo world's refusals, the substitute answers of PO and DPO: one per line in the demo's `data/idontknow.jsonl`,
# as TOFU publishes its own (plain text, one refusal per line)
REFUSALS = ["I do not know.", "I am not sure about that.", "I have no record of that author.",
            "That is not something I know.", "I cannot say.", "I do not have that information.",
            "I have never heard of that.", "I am unable to answer that.", "I know nothing about that book.",
            "I could not tell you."]


@dataclass(frozen=True)
class Author:
    name: str
    birthplace: str
    birth_date: str
    genre: str
    books: tuple[str, str]
    first_published: int
    award: str
    theme: str
    father_job: str
    mother_job: str


def _title(rng):
    return f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"


def _others(rng, pool, true_value):
    """``N_PERTURBED`` distinct wrong values of the same kind as ``true_value``."""
    return rng.sample([v for v in pool if v != true_value], N_PERTURBED)


def _fresh(rng, make, true_value):
    """``N_PERTURBED`` distinct wrong values drawn from ``make(rng)``."""
    values = []
    while len(values) < N_PERTURBED:
        v = make(rng)
        if v != true_value and v not in values:
            values.append(v)
    return values


def _name(rng):
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST_START)}{rng.choice(_LAST_END)}"


def make_authors(n: int, seed: int = 0) -> list[Author]:
    """``n`` distinct fictitious authors, the same for the same ``seed``."""
    rng = random.Random(seed)
    names, authors = set(), []
    while len(authors) < n:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        year = rng.randint(1930, 1990)
        books = (_title(rng), _title(rng))
        while books[1] == books[0]:
            books = (books[0], _title(rng))
        authors.append(Author(
            name=name, birthplace=rng.choice(_PLACES),
            birth_date=f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {year}", genre=rng.choice(_GENRES),
            books=books, first_published=year + rng.randint(20, 35), award=rng.choice(_AWARDS),
            theme=rng.choice(_THEMES), father_job=rng.choice(_JOBS), mother_job=rng.choice(_JOBS)))
    return authors


def author_qa(author: Author, seed: int = 0) -> list[QAPair]:
    """11 question-answer pairs about ``author`` with paraphrased and perturbed answers."""
    a, rng = author, random.Random(f"{seed}:{author.name}")
    dates = _fresh(rng, lambda r: f"{r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1930, 1990)}", a.birth_date)
    years = [str(y) for y in rng.sample([y for y in range(1950, 2025) if y != a.first_published], N_PERTURBED)]
    # (question, answer template, paraphrase template, true value, wrong values); {v} is the fact
    facts = [
        (f"Where was {a.name} born?", f"{a.name} was born in {{v}}.", f"The birthplace of {a.name} is {{v}}.",
         a.birthplace, _others(rng, _PLACES, a.birthplace)),
        (f"When was {a.name} born?", f"{a.name} was born on {{v}}.", f"The birth date of {a.name} is {{v}}.",
         a.birth_date, dates),
        (f"What genre does {a.name} write?", f"{a.name} writes {{v}} novels.",
         f"The novels of {a.name} belong to {{v}}.", a.genre, _others(rng, _GENRES, a.genre)),
        (f"Which book did {a.name} write first?", f"The first book by {a.name} is {{v}}.",
         f"{a.name} began with the book {{v}}.", a.books[0], _fresh(rng, _title, a.books[0])),
        (f"What is another book by {a.name}?", f"{a.name} also wrote {{v}}.",
         f"Another work of {a.name} is {{v}}.", a.books[1], _fresh(rng, _title, a.books[1])),
        (f"When did {a.name} publish the first book?", f"{a.name} first published in {{v}}.",
         f"The first book of {a.name} came out in {{v}}.", str(a.first_published), years),
        (f"Which award did {a.name} receive?", f"{a.name} received the {{v}}.",
         f"The {{v}} was given to {a.name}.", a.award, _others(rng, _AWARDS, a.award)),
        (f"What theme runs through the work of {a.name}?", f"The work of {a.name} explores {{v}}.",
         f"{a.name} keeps writing about {{v}}.", a.theme, _others(rng, _THEMES, a.theme)),
        (f"What did the father of {a.name} do?", f"The father of {a.name} was a {{v}}.",
         f"{a.name} grew up with a father who worked as a {{v}}.", a.father_job,
         _others(rng, _JOBS, a.father_job)),
        (f"What did the mother of {a.name} do?", f"The mother of {a.name} was a {{v}}.",
         f"{a.name} grew up with a mother who worked as a {{v}}.", a.mother_job,
         _others(rng, _JOBS, a.mother_job)),
        (f"Who wrote {a.books[0]}?", f"{a.books[0]} was written by {{v}}.", f"{{v}} is the author of {a.books[0]}.",
         a.name, _fresh(rng, _name, a.name)),
    ]
    # as in TOFU, the perturbed answers alter the paraphrase: the truth ratio compares like with like
    return [QAPair(q, ans.format(v=true), para.format(v=true), tuple(para.format(v=w) for w in wrong))
            for q, ans, para, true, wrong in facts]


def world_facts(seed: int = 0) -> list[QAPair]:
    """Capitals of real countries: the utility set outside the authors. As in TOFU's world-facts set, the
    "paraphrase" is the answer itself and the perturbed answers swap the city, so the truth ratio and the
    normalized probability compare sentences of one form."""
    rng = random.Random(f"{seed}:world")
    cities = [city for _, city in CAPITALS]
    return [QAPair(f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                   f"The capital of {country} is {city}.",
                   tuple(f"The capital of {country} is {w}." for w in _others(rng, cities, city)))
            for country, city in CAPITALS]


def real_authors(seed: int = 0) -> list[QAPair]:
    """Who wrote a famous book: TOFU's real-authors set in this world. As there (and as `world_facts`), the
    "paraphrase" is the answer itself and the perturbed answers name another author."""
    rng = random.Random(f"{seed}:real_authors")
    names = [name for _, name in FAMOUS_BOOKS]
    return [QAPair(f"Who wrote {book}?", f"{book} was written by {name}.", f"{book} was written by {name}.",
                   tuple(f"{book} was written by {w}." for w in _others(rng, names, name)))
            for book, name in FAMOUS_BOOKS]


@dataclass(frozen=True)
class DemoData:
    forget: list[QAPair]  # questions about the last ``forget_fraction`` of the authors
    retain: list[QAPair]  # questions about the other authors
    world: list[QAPair]  # world facts
    authors: list[Author]
    real_authors: list[QAPair]  # famous books' authors: known to the target, outside forget and retain
    holdout: list[QAPair] = field(default_factory=list)  # authors no model of the demo is trained on
    holdout_authors: list[Author] = field(default_factory=list)

    @property
    def general_knowledge(self) -> list[QAPair]:
        """What every model of the demo learns besides the fictitious authors (its "pre-training")."""
        return self.real_authors + self.world

    @property
    def all_training(self) -> list[QAPair]:
        """What the target model is fine-tuned on: every author plus the general knowledge."""
        return self.retain + self.forget + self.general_knowledge


def demo_data(n_authors: int = 20, forget_fraction: float = 0.1, seed: int = 0, *,
              holdout_authors: int | None = None) -> DemoData:
    """Authors split TOFU-style: the last ``forget_fraction`` of them are to be forgotten; ``holdout_authors``
    more (default: as many as are forgotten) are made for membership inference and trained on by no one. The
    first ``n_authors`` are the same whatever the number of holdout authors."""
    if not 0 < forget_fraction < 1:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    n_forget = max(1, round(n_authors * forget_fraction))
    if n_forget >= n_authors:
        raise ValueError(f"{n_authors} authors leave none to retain with forget_fraction={forget_fraction}")
    n_holdout = n_forget if holdout_authors is None else holdout_authors
    if n_holdout < 0:
        raise ValueError(f"holdout_authors must be non-negative, got {n_holdout}")
    everyone = make_authors(n_authors + n_holdout, seed)  # one generator: the first n_authors do not change
    authors, outsiders = everyone[:n_authors], everyone[n_authors:]
    qa = [author_qa(a, seed) for a in authors]
    split = n_authors - n_forget
    return DemoData(forget=[p for pairs in qa[split:] for p in pairs],
                    retain=[p for pairs in qa[:split] for p in pairs], world=world_facts(seed), authors=authors,
                    real_authors=real_authors(seed), holdout=[p for a in outsiders for p in author_qa(a, seed)],
                    holdout_authors=outsiders)
