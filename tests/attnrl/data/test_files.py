"""Data files of every format (attnrl/data/files.py): JSONL, JSON (an array, or one object
per line), CSV, Parquet and saved Hugging Face datasets load the same records, through a
field mapping; what cannot be read is one UserError naming the file; the held-out draw
works for each format."""

import csv
import json

import pytest

from attnrl.data import check_task, file_options, is_file_task, load_prompts
from attnrl.data.unseen import TrainingPool, draw_unseen
from attnrl.errors import UserError

ROWS = [{"problem": "What is 1 + 1?", "solution": "2"},
        {"problem": "Count: 1, 2, 3 -- how many?", "solution": "Three numbers. #### 3"},
        {"problem": "Pad the code\nto three digits: 7", "solution": "007"},
        {"problem": "Big: 999 + 1?", "solution": "#### 1,000"},
        {"problem": "What does NA stand for here?", "solution": "NA"}]
EXPECTED = [(r["problem"], a) for r, a in zip(ROWS, ["2", "3", "007", "1000", "NA"])]
MAPPING = {"question_field": "problem", "answer_field": "solution"}


def write_all(root, rows=ROWS) -> dict:
    """The same rows in every format: {format: task string}."""
    import datasets

    fields = list(rows[0])
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "qa.json").write_text(json.dumps(rows, indent=1))
    (root / "qa_lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "qa.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)
    data = datasets.Dataset.from_list(rows)
    data.to_parquet(str(root / "qa.parquet"))
    data.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(
        str(root / "saved_dict"))
    return {"jsonl": root / "qa.jsonl", "json": root / "qa.json",
            "json lines": root / "qa_lines.json", "csv": root / "qa.csv",
            "parquet": root / "qa.parquet", "saved dataset": root / "saved",
            "saved DatasetDict split": f"{root / 'saved_dict'}:train"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("formats"))


def records(task, **mapping):
    return [(r.question, r.answer) for r in load_prompts(str(task), size=None, **mapping)]


def test_every_format_loads_the_same_records_through_the_field_mapping(tasks):
    for name, task in tasks.items():
        assert is_file_task(str(task)), name
        assert records(task, **MAPPING) == EXPECTED, name
        assert check_task(str(task), fields=MAPPING) == len(ROWS), name
        assert len(load_prompts(str(task), size=2, **MAPPING)) == 2, name  # task_size


def test_default_fields_question_and_answer(tmp_path):
    rows = [{"question": r["problem"], "answer": r["solution"]} for r in ROWS]
    for name, task in write_all(tmp_path, rows).items():
        assert records(task) == EXPECTED, name


def test_a_missing_field_names_the_row_the_fields_it_has_and_the_mapping_key(tasks):
    for task in tasks.values():
        with pytest.raises(UserError, match=r"has no 'question' field.*its fields: problem, "
                                            r"solution; name the one to use with "
                                            r"question_field"):
            load_prompts(str(task), size=None)
        with pytest.raises(UserError, match=r"task: .*(row 1|:1) has no 'answer'"):
            check_task(str(task), fields={"question_field": "problem"})
    with pytest.raises(UserError, match=r"qa.jsonl:1: line has no 'question' field"):
        load_prompts(str(tasks["jsonl"]))
    with pytest.raises(UserError, match=r"qa.csv row 1 has no 'question' field"):
        load_prompts(str(tasks["csv"]))


def test_file_options_apply_to_the_users_files_only():
    config = {**MAPPING, "task": "x"}
    assert file_options(config, "data/qa.csv") == MAPPING
    assert file_options(config, "gsm8k:test") == {} and file_options(config, "chain_sum") == {}
    assert file_options({"question_field": "question"}, "qa.jsonl") == {}


def test_heldout_draw_works_for_every_format(tasks, tmp_path):
    """Training on the first two rows (JSONL, mapped); held-out problems from each format
    are the other three, never a training question."""
    pool = TrainingPool(str(tasks["jsonl"]), size=2, kwargs=MAPPING)
    assert pool.questions() == {"what is 1 + 1?", "count: 1, 2, 3 -- how many?"}
    for name, task in tasks.items():
        draw = draw_unseen(str(task), 3, 0, MAPPING, pool)
        assert [r.question for r in draw.records] == [q for q, _ in EXPECTED[2:]], name
        assert draw.dropped_seen == 2, name
        with pytest.raises(UserError, match="eval_size 4: only 3 problems"):
            draw_unseen(str(task), 4, 0, MAPPING, pool)
    # a job config's pool carries the mapping of its data file
    config = {"task": str(tasks["csv"]), "task_size": 2, **MAPPING}
    assert TrainingPool.from_config(config).questions() == pool.questions()


def test_csv_cells_stay_text_and_blank_cells_are_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('question,answer\n"Zero-pad 7",007\n"Say null",null\n"No answer",\n')
    got = load_prompts(str(path), size=None)
    assert [r.answer for r in got] == ["007", "null", ""]
    with pytest.raises(UserError, match=r"t.csv row 3 has no 'answer'"):
        check_task(str(path))


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '[{"question": "a", "answer": "1"},', r"bad.json: not valid JSON at line 1"),
    ("nested.json", '{"data": [{"question": "a", "answer": "1"}]}',
     r"the records are under the key 'data'"),
    ("number.json", "3", r"holds an array of objects, not int"),
    ("binary.jsonl", b"PAR1\x15\x04\xff\xfe", r"binary.jsonl: not UTF-8 text"),
    ("bad.parquet", b"PAR1 not parquet", r"bad.parquet: not a readable Parquet file"),
    ("bad.csv", 'question,answer\n"open quote,1\n', r"bad.csv: not a readable CSV file"),
    ("empty.csv", "", r"empty.csv holds no prompts"),
    ("qa.txt", "question: a", r"unsupported suffix '.txt'"),
])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    task = str(path)
    with pytest.raises(UserError, match=message) as err:
        load_prompts(task, size=None)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=message):
        check_task(task)


def test_saved_datasets_need_a_split_and_a_dataset(tasks, tmp_path):
    root = tasks["saved dataset"].parent
    with pytest.raises(UserError, match=r"saved DatasetDict with the splits train, test; "
                                        r"name one: .*saved_dict:train"):
        load_prompts(str(root / "saved_dict"), size=None)
    with pytest.raises(UserError, match=r"has no split 'tset' \(did you mean 'test'\?\)"):
        load_prompts(f"{root / 'saved_dict'}:tset", size=None)
    assert len(load_prompts(f"{root / 'saved_dict'}:test", size=None, **MAPPING)) == 1
    with pytest.raises(UserError, match=r"is a saved Dataset without splits"):
        load_prompts(f"{root / 'saved'}:train", size=None)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(UserError, match=r"plain_dir is a directory but no saved Hugging Face "
                                        r"dataset"):
        check_task(str(tmp_path / "plain_dir"))
    with pytest.raises(UserError, match=r"is not an existing .csv file"):
        check_task(str(tmp_path / "missing.csv"))
