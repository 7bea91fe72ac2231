"""Small input files for the eval commands, shared by their tests and the CLI tests: a
qa50-shaped questions file (eval answer), a VQA-RAD folder (eval vqa), and questions with
answers for eval judge."""

from __future__ import annotations

import json

from PIL import Image

from llavamed.data.figures import DOMAINS


def qa50(tmp_path):
    """A qa50-shaped questions file (and its images folder) for eval answer: two good
    questions, one whose image is missing, a duplicate id, one without an id, and an
    image-only text."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.new("RGB", (20, 20), (120, 30, 30)).save(img_dir / "a.jpg")
    recs = [
        {
            "question_id": 1,
            "image": "a.jpg",
            "pair_id": "p",
            "text": "What is shown?\n<image>",
            "gpt4_answer": "x",
            "type": "conversation",
        },
        {
            "question_id": 2,
            "image": "a.jpg",
            "text": "<image>\nDescribe it.",
            "type": "detailed_description",
        },
        {"question_id": 3, "image": "missing.jpg", "text": "Anything?"},
        {"question_id": 1, "image": "a.jpg", "text": "dup"},
        {"image": "a.jpg", "text": "no id"},
        {"question_id": 4, "image": "a.jpg", "text": "<image>"},
    ]
    q = tmp_path / "qa50.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return q, img_dir


def vqa_rad(tmp_path):
    """A VQA-RAD folder for eval vqa: 8 questions over 3 images (6 in the test split, open and
    closed alternating) and one test question whose image is gone."""
    root = tmp_path / "vqa_rad"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (24, 24), (60 * i, 20, 200)).save(
            root / "VQA_RAD Image Folder" / f"i{i}.jpg"
        )
    recs = []
    for i in range(8):
        closed = i % 2 == 0
        recs.append(
            {
                "qid": i,
                "image_name": f"i{i % 3}.jpg",
                "question": f"Question {i}?",
                "answer": "yes" if closed else "liver",
                "answer_type": "CLOSED" if closed else "OPEN",
                "question_type": "PRES" if closed else "ORGAN",
                "phrase_type": "test_freeform" if i < 6 else "freeform",
            }
        )
    recs.append(
        {
            "qid": 99,
            "image_name": "gone.jpg",
            "question": "q",
            "answer": "no",
            "answer_type": "CLOSED",
            "phrase_type": "test_freeform",
        }
    )
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    return root


def _dom(*names):
    return {d: d in names for d in DOMAINS}


JUDGE_QUESTIONS = [
    # (n, type, domain flags, reference words, model words)
    (1, "conversation", _dom("chest_xray"), 8, 4),
    (2, "detailed_description", _dom("mri"), 6, 9),
    (3, "conversation", _dom("histology"), 5, 5),
    (4, "conversation", _dom("ct_scan", "chest_xray"), 9, 2),  # chest_xray comes first
    (5, "detailed_description", _dom("gross"), 3, 3),
    (6, "conversation", _dom("mri"), 3, 3),  # no answer in the answers file
]


def write_judge_inputs(tmp_path):
    """qa50.jsonl and answers.jsonl for eval judge, from JUDGE_QUESTIONS (test_judge's
    hand-computed scores are the word counts given there)."""
    qs, ans = tmp_path / "qa50.jsonl", tmp_path / "answers.jsonl"
    with open(qs, "w") as fq, open(ans, "w") as fa:
        for n, typ, dom, rw, mw in JUDGE_QUESTIONS:
            fq.write(
                json.dumps(
                    {
                        "question_id": n,
                        "image": f"{n}.jpg",
                        "pair_id": f"P{n}",
                        "text": f"Q{n} what is shown?\n<image>",
                        "gpt4_answer": " ".join(["ref"] * rw),
                        "fig_caption": "A figure.",
                        "in_text_mention": None,
                        "domain": dom,
                        "type": typ,
                        "fig_label": "Fig 1",
                    }
                )
                + "\n"
            )
            if n != 6:
                fa.write(
                    json.dumps(
                        {
                            "question_id": n,
                            "prompt": "",
                            "text": " ".join(["mod"] * mw),
                            "answer_id": f"a{n}",
                            "model_id": "m",
                            "metadata": {},
                        }
                    )
                    + "\n"
                )
    return qs, ans
