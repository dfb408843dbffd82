"""The embedded demo corpus: a small parallel multilingual QA set generated from code.

Each article holds passages of facts about a few invented people (birth city and year,
profession, favourite colour) plus one event that involves no person, built from templates
and word lists per language. Every type of answer has same-type distractors in its passage
(the other people's cities, years, professions, colours and names, and the event's city and
year), and people appear in random order, so copying the first entity of the right type
fails: a model has to bind the question's entity to its sentence.

The facts are drawn once from the seed, independently of the languages requested, so a
question has the same id and the same meaning in every language and the clean files are
exact translations of one another. Translation noise is drawn from a second seeded stream,
so the same seed gives the same facts at any noise level.
"""
from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_LANGUAGES = ("en", "es", "de")

# Default noise of the demo run: about one translated question in seven is damaged. Enough
# that a teacher trained on one translated branch learns visible errors, which teachers of
# other branches (damaged elsewhere, English never) can outvote in distillation; small enough
# that every branch is still mostly right, as with real machine-translated training sets.
DEMO_NOISE = 0.15

# Bumped whenever the generator's output changes, so a run directory regenerates its corpus.
GENERATOR_VERSION = 1

PERSONS_PER_PASSAGE = 3
PASSAGES_PER_ARTICLE = 2
QUESTIONS_PER_PASSAGE = 6

# How a damaged translated question is damaged, with relative frequencies. A wrong entity
# is a mistranslated name, city or profession in the question (the answer stays that of the
# original question); a moved span is an answer projected onto a wrong entity of the same
# type in the passage; a lost span is an answer that could not be found again, so the
# question is dropped in that language; a paraphrase rewords the question literally.
NOISE_KINDS = {"wrong_entity": 0.3, "moved_span": 0.3, "lost_span": 0.2, "paraphrase": 0.2}

# ---------------------------------------------------------------------------------------
# Word lists. Names are the same in every language; the others are (en, es, de), with
# (masculine, feminine) forms where the language inflects professions.

_FEMALE_NAMES = (
    "Anna", "María", "Clara", "Elena", "Sofía", "Laura", "Julia", "Paula", "Nora", "Lena",
    "Eva", "Marta", "Irene", "Olga", "Alba", "Vera", "Inés", "Helena", "Lucía", "Greta",
)
_MALE_NAMES = (
    "Paul", "Carlos", "Jonas", "Felix", "Hugo", "Mateo", "David", "Óscar", "Martin", "Lukas",
    "Pablo", "Tomás", "Bruno", "Adrián", "Daniel", "Simon", "Leon", "Diego", "Marco", "Jürgen",
)
_SURNAMES = (
    "Keller", "Romero", "Navarro", "Weber", "Ortega", "Brandt", "Molina", "Hartmann",
    "Vidal", "Serrano", "Wagner", "Castillo", "Lorenz", "Delgado", "Vogel", "Herrera",
    "Schuster", "Campos", "Berger", "Iglesias", "Kramer", "Rubio", "Winter", "Santos",
    "Richter", "Moreno", "Haas", "Cortés", "Köhler", "Peña",
)
_CITIES = (
    ("London", "Londres", "London"), ("Munich", "Múnich", "München"),
    ("Vienna", "Viena", "Wien"), ("Lisbon", "Lisboa", "Lissabon"),
    ("Cologne", "Colonia", "Köln"), ("Geneva", "Ginebra", "Genf"),
    ("Seville", "Sevilla", "Sevilla"), ("Warsaw", "Varsovia", "Warschau"),
    ("Prague", "Praga", "Prag"), ("Rome", "Roma", "Rom"), ("Athens", "Atenas", "Athen"),
    ("Moscow", "Moscú", "Moskau"), ("Copenhagen", "Copenhague", "Kopenhagen"),
    ("Brussels", "Bruselas", "Brüssel"), ("Zurich", "Zúrich", "Zürich"),
    ("Venice", "Venecia", "Venedig"), ("Florence", "Florencia", "Florenz"),
    ("Naples", "Nápoles", "Neapel"), ("Milan", "Milán", "Mailand"),
    ("Paris", "París", "Paris"), ("Berlin", "Berlín", "Berlin"),
    ("Hamburg", "Hamburgo", "Hamburg"), ("Stockholm", "Estocolmo", "Stockholm"),
    ("Dublin", "Dublín", "Dublin"), ("Edinburgh", "Edimburgo", "Edinburgh"),
    ("Krakow", "Cracovia", "Krakau"), ("Antwerp", "Amberes", "Antwerpen"),
    ("Turin", "Turín", "Turin"), ("Bruges", "Brujas", "Brügge"), ("Nice", "Niza", "Nizza"),
)
_PROFESSIONS = (  # en, (es m, es f), (de m, de f)
    ("painter", ("pintor", "pintora"), ("Maler", "Malerin")),
    ("baker", ("panadero", "panadera"), ("Bäcker", "Bäckerin")),
    ("teacher", ("maestro", "maestra"), ("Lehrer", "Lehrerin")),
    ("doctor", ("médico", "médica"), ("Arzt", "Ärztin")),
    ("carpenter", ("carpintero", "carpintera"), ("Tischler", "Tischlerin")),
    ("architect", ("arquitecto", "arquitecta"), ("Architekt", "Architektin")),
    ("lawyer", ("abogado", "abogada"), ("Anwalt", "Anwältin")),
    ("singer", ("cantante", "cantante"), ("Sänger", "Sängerin")),
    ("gardener", ("jardinero", "jardinera"), ("Gärtner", "Gärtnerin")),
    ("tailor", ("sastre", "sastra"), ("Schneider", "Schneiderin")),
    ("pharmacist", ("farmacéutico", "farmacéutica"), ("Apotheker", "Apothekerin")),
    ("engineer", ("ingeniero", "ingeniera"), ("Ingenieur", "Ingenieurin")),
    ("journalist", ("periodista", "periodista"), ("Journalist", "Journalistin")),
    ("photographer", ("fotógrafo", "fotógrafa"), ("Fotograf", "Fotografin")),
    ("watchmaker", ("relojero", "relojera"), ("Uhrmacher", "Uhrmacherin")),
    ("fisherman", ("pescador", "pescadora"), ("Fischer", "Fischerin")),
)
_COLOURS = (
    ("red", "rojo", "Rot"), ("blue", "azul", "Blau"), ("green", "verde", "Grün"),
    ("yellow", "amarillo", "Gelb"), ("black", "negro", "Schwarz"), ("white", "blanco", "Weiß"),
    ("orange", "naranja", "Orange"), ("purple", "morado", "Lila"), ("grey", "gris", "Grau"),
    ("brown", "marrón", "Braun"), ("pink", "rosa", "Rosa"), ("turquoise", "turquesa", "Türkis"),
)
_YEARS = range(1700, 2000)

# ---------------------------------------------------------------------------------------
# Templates. Slots: {name} {city} {year} {job} {colour}, and {a_job} (English article).
# Fact sentences: "born" (city and year), "job", "colour"; "event" involves no person.
# Question kinds: the key slot names what the question is about, the answer slot what it
# asks for, in the sentence of the given fact.


@dataclass(frozen=True)
class _QuestionKind:
    key: str  # slot the question names
    answer: str  # slot holding the answer
    fact: str  # the fact sentence where both are


_QUESTION_KINDS = {
    "year": _QuestionKind("name", "year", "born"),
    "city": _QuestionKind("name", "city", "born"),
    "job": _QuestionKind("name", "job", "job"),
    "colour": _QuestionKind("name", "colour", "colour"),
    "who_city": _QuestionKind("city", "name", "born"),
    "who_job": _QuestionKind("job", "name", "job"),
}


@dataclass(frozen=True)
class _Lexicon:
    title: str
    sentences: dict[str, tuple[str, ...]]
    questions: dict[str, tuple[str, ...]]
    paraphrases: dict[str, tuple[str, ...]]  # literal rewordings used only as noise


_LEXICONS = {
    "en": _Lexicon(
        title="Chronicle {n}",
        sentences={
            "born": ("{name} was born in {city} in {year}.",
                     "In {year}, {name} was born in {city}.",
                     "{name} was born in {year} in the city of {city}."),
            "job": ("{name} worked as {a_job} {job}.",
                    "Later in life, {name} became {a_job} {job}."),
            "colour": ("The favourite colour of {name} was {colour}.",
                       "{name} loved the colour {colour} above all others."),
            "event": ("In {year}, a great flood reached {city}.",
                      "The first railway station of {city} opened in {year}."),
        },
        questions={
            "year": ("In which year was {name} born?", "When was {name} born?"),
            "city": ("Where was {name} born?", "In which city was {name} born?"),
            "job": ("What did {name} work as?", "What was the profession of {name}?"),
            "colour": ("What was the favourite colour of {name}?",
                       "Which colour did {name} love most?"),
            "who_city": ("Who was born in {city}?", "Which person was born in {city}?"),
            "who_job": ("Who worked as {a_job} {job}?", "Which person became {a_job} {job}?"),
        },
        paraphrases={},  # English is the source language and is never damaged
    ),
    "es": _Lexicon(
        title="Crónica {n}",
        sentences={
            "born": ("{name} nació en {city} en {year}.",
                     "En {year}, {name} nació en {city}.",
                     "{name} nació en {year} en la ciudad de {city}."),
            "job": ("{name} trabajó como {job}.",
                    "Con los años, {name} se hizo {job}."),
            "colour": ("El color favorito de {name} era el {colour}.",
                       "{name} amaba el color {colour} más que ningún otro."),
            "event": ("En {year}, una gran inundación llegó a {city}.",
                      "La primera estación de tren de {city} se inauguró en {year}."),
        },
        questions={
            "year": ("¿En qué año nació {name}?", "¿Cuándo nació {name}?"),
            "city": ("¿Dónde nació {name}?", "¿En qué ciudad nació {name}?"),
            "job": ("¿En qué trabajó {name}?", "¿Cuál era la profesión de {name}?"),
            "colour": ("¿Cuál era el color favorito de {name}?", "¿Qué color amaba más {name}?"),
            "who_city": ("¿Quién nació en {city}?", "¿Qué persona nació en {city}?"),
            "who_job": ("¿Quién trabajó como {job}?", "¿Qué persona se hizo {job}?"),
        },
        paraphrases={
            "year": ("¿Qué año fue el nacimiento de {name}?",),
            "city": ("¿Cuál lugar es el nacimiento de {name}?",),
            "job": ("¿Qué hizo {name} como trabajo?",),
            "colour": ("¿El color que {name} prefería fue cuál?",),
            "who_city": ("¿Quién es nacido en {city}?",),
            "who_job": ("¿Quién hizo el trabajo de {job}?",),
        },
    ),
    "de": _Lexicon(
        title="Chronik {n}",
        sentences={
            "born": ("{name} wurde {year} in {city} geboren.",
                     "Im Jahr {year} wurde {name} in {city} geboren.",
                     "{name} kam {year} in der Stadt {city} zur Welt."),
            "job": ("{name} arbeitete als {job}.",
                    "Später wurde {name} {job}."),
            "colour": ("Die Lieblingsfarbe von {name} war {colour}.",
                       "{name} liebte die Farbe {colour} mehr als alle anderen."),
            "event": ("Im Jahr {year} erreichte ein großes Hochwasser {city}.",
                      "Der erste Bahnhof von {city} wurde {year} eröffnet."),
        },
        questions={
            "year": ("In welchem Jahr wurde {name} geboren?", "Wann wurde {name} geboren?"),
            "city": ("Wo wurde {name} geboren?", "In welcher Stadt wurde {name} geboren?"),
            "job": ("Als was arbeitete {name}?", "Welchen Beruf hatte {name}?"),
            "colour": ("Was war die Lieblingsfarbe von {name}?",
                       "Welche Farbe liebte {name} am meisten?"),
            "who_city": ("Wer wurde in {city} geboren?", "Welche Person wurde in {city} geboren?"),
            "who_job": ("Wer arbeitete als {job}?", "Welche Person wurde {job}?"),
        },
        paraphrases={
            "year": ("Welches Jahr war die Geburt von {name}?",),
            "city": ("Was ist der Ort, wo {name} geboren ist?",),
            "job": ("Was hat {name} als Arbeit gemacht?",),
            "colour": ("Welche Farbe war von {name} die liebste?",),
            "who_city": ("Wer ist in {city} geboren worden?",),
            "who_job": ("Wer hat die Arbeit {job} gemacht?",),
        },
    ),
}

_LANG_COLUMN = {lang: i for i, lang in enumerate(SUPPORTED_LANGUAGES)}

# ---------------------------------------------------------------------------------------
# Language-independent facts.


@dataclass(frozen=True)
class _Person:
    name: str
    female: bool
    city: int
    year: int
    job: int
    colour: int


@dataclass(frozen=True)
class _Sentence:
    fact: str  # "born", "job", "colour" or "event"
    owner: int  # index of the person, -1 for the event
    template: int


@dataclass(frozen=True)
class _Question:
    qid: str
    kind: str
    person: int
    template: int


@dataclass(frozen=True)
class _Passage:
    persons: tuple[_Person, ...]
    event_city: int
    event_year: int
    sentences: tuple[_Sentence, ...]
    questions: tuple[_Question, ...]


def _draw_article(rng: random.Random, article: int) -> tuple[_Passage, ...]:
    """Draws the facts of one article: distinct people across the article, distinct values
    of each type inside a passage (so every answer is unambiguous and every distractor is a
    different entity of the answer's type)."""
    # Every language has as many templates of each kind as English; a sentence or question
    # uses the same template index in all of them, so the versions are translations.
    n_sentences = {fact: len(t) for fact, t in _LEXICONS["en"].sentences.items()}
    n_questions = {kind: len(t) for kind, t in _LEXICONS["en"].questions.items()}
    n_persons = PERSONS_PER_PASSAGE * PASSAGES_PER_ARTICLE
    genders = [rng.random() < 0.5 for _ in range(n_persons)]
    female = iter(rng.sample(_FEMALE_NAMES, n_persons))
    male = iter(rng.sample(_MALE_NAMES, n_persons))
    surnames = iter(rng.sample(_SURNAMES, n_persons))
    passages = []
    for p in range(PASSAGES_PER_ARTICLE):
        cities = rng.sample(range(len(_CITIES)), PERSONS_PER_PASSAGE + 1)
        years = rng.sample(_YEARS, PERSONS_PER_PASSAGE + 1)
        jobs = rng.sample(range(len(_PROFESSIONS)), PERSONS_PER_PASSAGE)
        colours = rng.sample(range(len(_COLOURS)), PERSONS_PER_PASSAGE)
        persons = []
        for i in range(PERSONS_PER_PASSAGE):
            is_female = genders[p * PERSONS_PER_PASSAGE + i]
            first = next(female) if is_female else next(male)
            persons.append(_Person(f"{first} {next(surnames)}", is_female, cities[i], years[i],
                                   jobs[i], colours[i]))
        blocks = []
        for i in range(PERSONS_PER_PASSAGE):
            facts = ["born", "job", "colour"]
            rng.shuffle(facts)
            blocks.append([_Sentence(f, i, rng.randrange(n_sentences[f])) for f in facts])
        rng.shuffle(blocks)
        event = _Sentence("event", -1, rng.randrange(n_sentences["event"]))
        blocks.insert(rng.randrange(len(blocks) + 1), [event])
        candidates = [(kind, i) for i in range(PERSONS_PER_PASSAGE) for kind in _QUESTION_KINDS]
        questions = tuple(
            _Question(f"demo-{article:04d}-{p}-{q}", kind, person, rng.randrange(n_questions[kind]))
            for q, (kind, person) in enumerate(rng.sample(candidates, QUESTIONS_PER_PASSAGE))
        )
        passages.append(_Passage(tuple(persons), cities[-1], years[-1],
                                 tuple(s for block in blocks for s in block), questions))
    return tuple(passages)


# ---------------------------------------------------------------------------------------
# Rendering one language.


def _values(person: _Person, lang: str) -> dict[str, str]:
    """The slot values of a person's facts in one language."""
    column = _LANG_COLUMN[lang]
    job = _PROFESSIONS[person.job][column]
    if not isinstance(job, str):
        job = job[int(person.female)]
    return {
        "name": person.name,
        "city": _CITIES[person.city][column],
        "year": str(person.year),
        "job": job,
        "a_job": "an" if job[0] in "aeiou" else "a",
        "colour": _COLOURS[person.colour][column],
    }


def _fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fills a template; returns the text and the character span of each slot."""
    text, spans = [], {}
    length = 0
    for literal, slot, _, _ in string.Formatter().parse(template):
        text.append(literal)
        length += len(literal)
        if slot is not None:
            spans[slot] = (length, length + len(values[slot]))
            text.append(values[slot])
            length += len(values[slot])
    return "".join(text), spans


@dataclass(frozen=True)
class _Mention:
    slot: str
    fact: str
    owner: int
    start: int
    text: str


def _render_passage(passage: _Passage, lang: str) -> tuple[str, list[_Mention]]:
    """The passage text in one language and every entity mention in it, with offsets."""
    lexicon = _LEXICONS[lang]
    event_values = {"city": _CITIES[passage.event_city][_LANG_COLUMN[lang]],
                    "year": str(passage.event_year)}
    parts, mentions = [], []
    offset = 0
    for sentence in passage.sentences:
        values = event_values if sentence.owner < 0 else _values(passage.persons[sentence.owner], lang)
        text, spans = _fill(lexicon.sentences[sentence.fact][sentence.template], values)
        for slot, (start, end) in spans.items():
            if slot != "a_job":
                mentions.append(_Mention(slot, sentence.fact, sentence.owner, offset + start,
                                         text[start:end]))
        parts.append(text)
        offset += len(text) + 1
    return " ".join(parts), mentions


def _answer_mention(mentions: list[_Mention], question: _Question) -> _Mention:
    kind = _QUESTION_KINDS[question.kind]
    return next(m for m in mentions if m.slot == kind.answer and m.fact == kind.fact
                and m.owner == question.person)


def _render_question(question: _Question, passage: _Passage, lang: str) -> str:
    template = _LEXICONS[lang].questions[question.kind][question.template]
    return _fill(template, _values(passage.persons[question.person], lang))[0]


def _damage(rng: random.Random, kind: str, qa: dict, question: _Question, passage: _Passage,
            mentions: list[_Mention], lang: str) -> dict | None:
    """Damages one translated question the way machine translation does; None = dropped."""
    if kind == "lost_span":
        return None
    if kind == "paraphrase":
        values = _values(passage.persons[question.person], lang)
        template = rng.choice(_LEXICONS[lang].paraphrases[question.kind])
        return {**qa, "question": _fill(template, values)[0]}
    if kind == "wrong_entity":
        # A question template names only its key slot, so asking it about another person of
        # the passage swaps the key entity for one of the same type; the answer stays.
        other = rng.choice([i for i in range(len(passage.persons)) if i != question.person])
        wrong = _Question(question.qid, question.kind, other, question.template)
        return {**qa, "question": _render_question(wrong, passage, lang)}
    # moved_span: the answer lands on another entity of the answer's type in the passage.
    answer = _answer_mention(mentions, question)
    slot = _QUESTION_KINDS[question.kind].answer
    wrong_spans = sorted({(m.start, m.text) for m in mentions
                          if m.slot == slot and m.text != answer.text})
    start, text = rng.choice(wrong_spans)
    return {**qa, "answers": [{"text": text, "answer_start": start}]}


def _squad_files(articles: list[tuple[_Passage, ...]], languages: tuple[str, ...], seed: int,
                 noise: float) -> dict[str, dict]:
    """Renders every article in every language as a SQuAD v1.1 object, then damages a
    `noise` fraction of each non-English language's questions (drawn from a stream per
    language, so languages are damaged in different places, whichever others are asked for)."""
    files = {}
    for lang in languages:
        data = []
        qas_by_id, where = {}, {}
        for a, passages in enumerate(articles):
            paragraphs = []
            for passage in passages:
                context, mentions = _render_passage(passage, lang)
                qas = []
                for question in passage.questions:
                    answer = _answer_mention(mentions, question)
                    qa = {"id": question.qid,
                          "question": _render_question(question, passage, lang),
                          "answers": [{"text": answer.text, "answer_start": answer.start}]}
                    qas.append(qa)
                    qas_by_id[question.qid] = qa
                    where[question.qid] = (question, passage, mentions)
                paragraphs.append({"context": context, "qas": qas})
            data.append({"title": _LEXICONS[lang].title.format(n=a + 1), "paragraphs": paragraphs})
        if lang != "en" and noise > 0:
            noise_rng = random.Random(f"dist_xqa-demo-noise:{seed}:{lang}")
            ids = sorted(qas_by_id)
            damaged = noise_rng.sample(ids, round(noise * len(ids)))
            kinds = noise_rng.choices(list(NOISE_KINDS), weights=list(NOISE_KINDS.values()),
                                      k=len(damaged))
            replaced = {qid: _damage(noise_rng, kind, qas_by_id[qid], *where[qid], lang)
                        for qid, kind in zip(damaged, kinds)}
            for article in data:
                for paragraph in article["paragraphs"]:
                    kept = (replaced.get(qa["id"], qa) for qa in paragraph["qas"])
                    paragraph["qas"] = [qa for qa in kept if qa is not None]
        files[lang] = {"version": "1.1", "data": data}
    return files


def _write_atomic(path: Path, text: str) -> None:
    """Writes via a temporary name and a rename, so concurrent writers of the same content
    and readers never see a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate_demo_corpus(out_dir: str | os.PathLike, languages: tuple[str, ...] = SUPPORTED_LANGUAGES,
                         n_articles: int = 60, seed: int = 0, noise: float = 0.0) -> dict[str, Path]:
    """Writes `demo.<lang>.json` (SQuAD v1.1) for each language into `out_dir` and returns
    {lang: path}.

    n_articles articles of PASSAGES_PER_ARTICLE passages with QUESTIONS_PER_PASSAGE
    questions each; the same seed gives the same bytes. Question ids are shared by all
    languages; with noise = 0 every language has every id and every answer span is exact.
    With noise > 0, round(noise * n_questions) questions of each non-English language are
    damaged (see NOISE_KINDS); lost spans remove the question from that language."""
    unknown = [lang for lang in languages if lang not in SUPPORTED_LANGUAGES]
    if unknown:
        raise ValueError(f"demo corpus languages {unknown} not supported; "
                         f"choose from {list(SUPPORTED_LANGUAGES)}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"demo corpus noise must be a fraction in [0, 1], got {noise}")
    if n_articles < 1:
        raise ValueError(f"demo corpus needs at least one article, got n_articles={n_articles}")
    rng = random.Random(f"dist_xqa-demo:{seed}")
    articles = [_draw_article(rng, a) for a in range(n_articles)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for lang, squad in _squad_files(articles, tuple(languages), seed, noise).items():
        paths[lang] = out / f"demo.{lang}.json"
        _write_atomic(paths[lang], json.dumps(squad, ensure_ascii=False, indent=1) + "\n")
    return paths


PARAMS_FILE = "demo_params.json"


def ensure_demo_corpus(data_dir: str | os.PathLike, languages: tuple[str, ...] = SUPPORTED_LANGUAGES,
                       n_articles: int = 60, seed: int = 0, noise: float = DEMO_NOISE) -> dict[str, Path]:
    """Returns the demo corpus in the folder `data_dir`, generating it on first use only.

    The parameters (and GENERATOR_VERSION) are recorded in `data_dir/demo_params.json`, written
    after the corpus files; a later call with the same parameters reuses the files, one with
    different parameters regenerates them. Unlike generate_demo_corpus, the default noise is
    DEMO_NOISE: this is the corpus the demo run trains on."""
    data_dir = Path(data_dir)
    params = {"generator_version": GENERATOR_VERSION, "languages": list(languages),
              "n_articles": n_articles, "seed": seed, "noise": noise}
    params_path = data_dir / PARAMS_FILE
    paths = {lang: data_dir / f"demo.{lang}.json" for lang in languages}
    if (params_path.exists() and json.loads(params_path.read_text(encoding="utf-8")) == params
            and all(p.exists() for p in paths.values())):
        return paths
    paths = generate_demo_corpus(data_dir, tuple(languages), n_articles, seed, noise)
    _write_atomic(params_path, json.dumps(params, indent=1) + "\n")
    return paths
