"""The demo corpus (generation, alignment, noise), then the demo end to end on 2 CPU ranks,
shrunk: its student against the lambda_kd = 0 control and the imp_sign = +1 student on the
same teachers, and a second run of the same command printing the same table."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from dist_xqa.data import demo
from dist_xqa.data.demo import (
    DEMO_NOISE, PASSAGES_PER_ARTICLE, QUESTIONS_PER_PASSAGE, ensure_demo_corpus, generate_demo_corpus,
)
from dist_xqa.data.loader import load_squad

N_ARTICLES = 20
N_QUESTIONS = N_ARTICLES * PASSAGES_PER_ARTICLE * QUESTIONS_PER_PASSAGE


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def questions(squad):
    """{id: (question, context, answers)} of a SQuAD object."""
    return {qa["id"]: (qa["question"], p["context"], qa["answers"])
            for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return {lang: read(p) for lang, p in
            generate_demo_corpus(tmp_path_factory.mktemp("clean"), n_articles=N_ARTICLES).items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_demo_corpus(tmp_path / "a", n_articles=5, seed=3, noise=0.2)
    b = generate_demo_corpus(tmp_path / "b", n_articles=5, seed=3, noise=0.2)
    c = generate_demo_corpus(tmp_path / "c", n_articles=5, seed=4, noise=0.2)
    assert sorted(a) == ["de", "en", "es"] and a["es"].name == "demo.es.json"
    for lang in a:
        assert a[lang].read_bytes() == b[lang].read_bytes()
        assert a[lang].read_bytes() != c[lang].read_bytes()


def test_ids_aligned_and_spans_exact_without_noise(clean):
    per_lang = {lang: questions(squad) for lang, squad in clean.items()}
    assert all(len(q) == N_QUESTIONS for q in per_lang.values())
    assert per_lang["en"].keys() == per_lang["es"].keys() == per_lang["de"].keys()
    for qs in per_lang.values():
        for question, context, answers in qs.values():
            (answer,) = answers
            assert context[answer["answer_start"]:][:len(answer["text"])] == answer["text"]
    # Translations differ in wording, not in facts: the years asked about are the same.
    for qid, (_, _, answers) in per_lang["en"].items():
        if re.fullmatch(r"\d{4}", answers[0]["text"]):
            assert per_lang["de"][qid][2][0]["text"] == answers[0]["text"]


def test_every_language_translates_every_template():
    english = demo._LEXICONS["en"]
    for lexicon in demo._LEXICONS.values():
        assert {k: len(v) for k, v in lexicon.sentences.items()} == {k: len(v) for k, v in english.sentences.items()}
        assert {k: len(v) for k, v in lexicon.questions.items()} == {k: len(v) for k, v in english.questions.items()}


def test_accented_text_present(clean):
    text = json.dumps(clean, ensure_ascii=False)
    assert "¿" in text and "ñ" in text and "ü" in text and "ß" in text


def entity_lists(lang):
    column = demo.SUPPORTED_LANGUAGES.index(lang)
    jobs = [j[column] if isinstance(j[column], str) else j[column][g]
            for j in demo._PROFESSIONS for g in (0, 1)]
    names = [f"{f} {s}" for f in demo._FEMALE_NAMES + demo._MALE_NAMES for s in demo._SURNAMES]
    return [[c[column] for c in demo._CITIES], jobs, [c[column] for c in demo._COLOURS],
            [str(y) for y in demo._YEARS], names]


@pytest.mark.parametrize("lang", ["en", "es", "de"])
def test_distractors_defeat_copying_the_first_entity_of_the_answers_type(clean, lang):
    types = entity_lists(lang)
    first_is_right = 0
    for question, context, answers in questions(clean[lang]).values():
        answer = answers[0]["text"]
        (entities,) = [t for t in types if answer in t]
        found = sorted((m.start(), e) for e in set(entities) if e in context
                       for m in re.finditer(rf"\b{re.escape(e)}\b", context))
        assert len({e for _, e in found}) >= 3, (question, context)  # answer + 2 distractors
        first_is_right += found[0][1] == answer
    assert first_is_right / N_QUESTIONS < 0.5


def test_noise_damages_the_requested_fraction_of_translations_only(tmp_path, clean):
    noisy = {lang: read(p) for lang, p in
             generate_demo_corpus(tmp_path, n_articles=N_ARTICLES, noise=0.3).items()}
    assert noisy["en"] == clean["en"]
    for lang in ("es", "de"):
        before, after = questions(clean[lang]), questions(noisy[lang])
        dropped = before.keys() - after.keys()
        reworded = {q for q in after if after[q][0] != before[q][0]}
        moved = {q for q in after if after[q][2] != before[q][2]}
        assert all(after[q][1] == before[q][1] for q in after)  # passages untouched
        assert dropped and reworded and moved and not (reworded & moved)
        assert len(dropped | reworded | moved) == round(0.3 * N_QUESTIONS)
        for q in moved:  # a moved span is a wrong entity, still an exact span
            (answer,) = after[q][2]
            context = after[q][1]
            assert context[answer["answer_start"]:][:len(answer["text"])] == answer["text"]


@pytest.mark.parametrize("noise", [0.0, DEMO_NOISE])
def test_files_load_without_rejections(tmp_path, noise):
    paths = generate_demo_corpus(tmp_path, n_articles=N_ARTICLES, noise=noise)
    for lang, path in paths.items():
        examples, report = load_squad(path, lang)
        assert report.n_rejected == 0 and report.n_repaired == 0, report.summary()
        assert len(examples) == len(questions(read(path)))


def test_rejects_unsupported_language_and_bad_noise(tmp_path):
    with pytest.raises(ValueError, match="'fr'"):
        generate_demo_corpus(tmp_path, languages=("en", "fr"))
    with pytest.raises(ValueError, match="noise"):
        generate_demo_corpus(tmp_path, noise=1.5)


def test_ensure_generates_on_first_use_only(tmp_path):
    paths = ensure_demo_corpus(tmp_path / "data", n_articles=3, noise=0.0)
    assert set(paths) == {"en", "es", "de"} and all(p.parent == tmp_path / "data" for p in paths.values())
    stamps = {lang: p.stat().st_mtime_ns for lang, p in paths.items()}
    paths["es"].write_text("edited", encoding="utf-8")  # reuse must not rewrite it
    assert ensure_demo_corpus(tmp_path / "data", n_articles=3, noise=0.0) == paths
    assert paths["es"].read_text(encoding="utf-8") == "edited"
    assert paths["en"].stat().st_mtime_ns == stamps["en"]
    regenerated = ensure_demo_corpus(tmp_path / "data", n_articles=4, noise=0.0)
    assert len(questions(read(regenerated["es"]))) == 4 * PASSAGES_PER_ARTICLE * QUESTIONS_PER_PASSAGE


# --- the demo end to end, shrunk ----------------------------------------------------------------

# The demo at half its articles, a shorter window and 2 epochs a role, each rank on one
# intra-op thread: with two threads a rank, two ranks on a 2-core machine shared with other
# jobs ran 10-20 times slower (measured at load 20-40: 2-4 s against 0.1-0.2 s a step).
DEMO_RUN = ("data.demo_articles=30", "model.max_length=96", "model.doc_stride=32", "teacher.epochs=2",
            "student.epochs=2")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LANGUAGES = ("en", "es", "de")


class Run(NamedTuple):
    run_dir: Path
    stdout: str

    def summary(self) -> dict:
        return read(self.run_dir / "eval" / "summary.json")

    def xlt_f1(self, model: str = "student") -> float:
        return self.summary()[model]["test_sets"]["test"]["xlt"]["f1"]

    def logged(self) -> dict[str, list[float]]:
        from tests.test_skd import scalars
        return scalars(self.run_dir / "tb" / "student")

    def logged_steps(self, tag: str) -> list[int]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events,) = (self.run_dir / "tb" / "student").glob("events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        return [event.step for event in accumulator.Scalars(tag)]

    def mean_teacher_weights(self) -> dict[str, float]:
        """Each teacher's imp weight, averaged over the student's logged steps."""
        logged = self.logged()
        return {lang: sum(logged[f"student/teacher_weight/{lang}"]) / len(logged[f"student/teacher_weight/{lang}"])
                for lang in LANGUAGES}

    def table(self) -> str:
        """The EM/F1 table the run printed (from its title to the blank line after it)."""
        start = self.stdout.index("Test set 'test'")
        return self.stdout[start:].split("\n\n")[0]


def run_demo(run_dir: Path, *overrides: str) -> Run:
    from tests.test_pipeline_e2e import launch
    return Run(run_dir, launch(run_dir, *DEMO_RUN, *overrides, env=ONE_THREAD).stdout)


def student_on_the_teachers_of(source: Run, run_dir: Path, *overrides: str) -> Run:
    """Another student on `source`'s teachers, as a user gets one: the run directory copied
    without its distill stage (what `--redo distill` removes, less the results of the
    teachers, so only the new student is trained and scored), then the demo's command with
    `overrides` in the copy."""
    from dist_xqa import stages
    from dist_xqa.config import load_config

    shutil.copytree(source.run_dir, run_dir, ignore=shutil.ignore_patterns("logs"))
    cfg = load_config(None, [f"run_dir={run_dir}", *DEMO_RUN, *overrides])
    for pattern in stages.stage_outputs(cfg, "distill"):
        for path in run_dir.glob(pattern.rstrip("/")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run_demo(run_dir, *overrides)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Run:
    return run_demo(tmp_path_factory.mktemp("demo") / "run")


@pytest.fixture(scope="module")
def nll_control(demo_run, tmp_path_factory) -> Run:
    """The same student with lambda_kd = 0: NLL over D alone, the same teachers' logits streamed."""
    return student_on_the_teachers_of(demo_run, tmp_path_factory.mktemp("control") / "run", "distill.lambda_kd=0")


@pytest.mark.slow
def test_demo_student_learns_from_its_teachers_beyond_the_nll_control(demo_run, nll_control):
    """D is the mixMRC set, so NLL alone makes a student better than its branch teachers;
    what distillation adds is measured against the lambda_kd = 0 student on the same
    teachers, data order and initialisation."""
    f1 = {name: model["test_sets"]["test"]["xlt"]["f1"] for name, model in demo_run.summary().items()}
    assert set(f1) == {"student", *(f"teacher_{lang}" for lang in LANGUAGES)}
    assert f1["student"] > sum(f1[f"teacher_{lang}"] for lang in LANGUAGES) / len(LANGUAGES), f1

    kd, control_kd = demo_run.logged()["student/kd"], nll_control.logged()["student/kd"]
    # Its KD loss fell, and below the control's (which falls too, as NLL moves the student
    # towards the teachers' answers): over the second epoch, at the same logged steps.
    assert len(kd) == len(control_kd) >= 10 and kd[0] == pytest.approx(control_kd[0], rel=1e-4)
    assert sum(kd[-3:]) / 3 < 0.9 * kd[0], kd
    second_epoch = len(kd) // 2
    assert sum(kd[second_epoch:]) < sum(control_kd[second_epoch:]) - 0.1 * len(kd[second_epoch:]), (kd, control_kd)

    # imp weighed the teachers by their confidence: far from 1/K. The weights depend on the
    # teachers alone, so the control logs the same ones.
    weights = demo_run.mean_teacher_weights()
    assert max(weights.values()) - min(weights.values()) > 0.1, weights
    assert nll_control.mean_teacher_weights() == weights

    # Whether the distilled student also scores above the control is not asserted: at this
    # size the margin is within the noise. Test XLT F1, distilled vs control: seed 0 14.9 vs
    # 10.2 and 13.0 vs 12.0 (two versions of the trainer, 2 and 1 threads a rank), seed 1
    # 15.3 vs 14.0; the same control student scored 10.2 and 12.0 in those two seed-0 runs.
    print(f"test XLT F1: distilled student {demo_run.xlt_f1():.1f}, lambda_kd = 0 control {nll_control.xlt_f1():.1f}")


@pytest.mark.slow
def test_imp_sign_plus_one_runs_and_reverses_the_teachers_order(demo_run, tmp_path_factory):
    """distill.imp_sign = +1 (the paper's printed Eq. 7: uncertain teachers count more) end
    to end on the demo's teachers: it finishes, is evaluated on every language, and weighs
    the teachers in the opposite order to s = -1 (the weights depend on the teachers' logits
    of the same rows alone). It logs every 5 steps (monitor.every), not every 10."""
    plus = student_on_the_teachers_of(demo_run, tmp_path_factory.mktemp("imp_sign") / "run", "distill.imp_sign=1",
                                      "monitor.every=5")
    assert read(plus.run_dir / "student" / "DONE.json")["epochs"] == 2
    steps = plus.logged_steps("student/kd")
    assert steps[:4] == [0, 5, 10, 15] and steps == sorted(set(steps)), steps
    assert len([step for step in steps if step % 5]) <= 2, steps  # besides: the flush at each epoch's end
    assert len(steps) > 1.8 * len(demo_run.logged()["student/kd"]), steps
    report = plus.summary()["student"]["test_sets"]["test"]
    assert set(report["per_language"]) == set(LANGUAGES) and len(report["matrix"]["f1"]) == len(LANGUAGES)
    assert "student" in plus.table()

    minus, plus_weights = demo_run.mean_teacher_weights(), plus.mean_teacher_weights()
    assert sorted(minus, key=minus.get) == sorted(plus_weights, key=plus_weights.get)[::-1], (minus, plus_weights)
    assert max(abs(minus[t] - plus_weights[t]) for t in LANGUAGES) > 0.1, (minus, plus_weights)


@pytest.mark.drill
def test_the_same_command_prints_the_same_table(demo_run, tmp_path_factory):
    """The demo is deterministic on one machine: the same command in another run directory
    trains the same teachers and student and prints the same table, to the last digit."""
    again = run_demo(tmp_path_factory.mktemp("again") / "run")
    assert again.table() == demo_run.table()
    # every model's scores, selected epoch and dev F1, exactly; and the student's training
    assert again.summary() == demo_run.summary()
    for tag in ("student/nll", "student/kd"):
        assert again.logged()[tag] == demo_run.logged()[tag], tag
