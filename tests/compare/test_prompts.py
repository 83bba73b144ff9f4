"""Prompt sets: generated sets, files through `datasets`, seeded subsets, and clear errors."""

import json

import pytest

from tpm.loading import ACTIVITIES, ANIMALS, PromptSetError, available_sets, load_prompts


def test_animal_activity_is_generated_with_articles():
    prompts = load_prompts("animal-activity")
    assert len(prompts) == len(ANIMALS) * len(ACTIVITIES) == len(set(prompts))
    assert "an elephant riding a bike" in prompts and "a cat playing chess" in prompts


def test_testbed_split_and_seeded_subset():
    from tpm.testbed import get_split

    full = load_prompts("testbed:val")
    assert full == [it.prompt for it in get_split("val")]
    sub = load_prompts("testbed:val", n=10, seed=3)
    assert sub == load_prompts("testbed:val", n=10, seed=3)
    assert sub != load_prompts("testbed:val", n=10, seed=4)
    assert len(set(sub)) == 10 and set(sub) <= set(full)
    assert [full.index(p) for p in sub] == sorted(full.index(p) for p in sub)  # kept in set order


def test_files_through_datasets(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n a blue square \n")
    assert load_prompts(str(txt)) == ["a red circle", "a blue square"]
    csv = tmp_path / "p.csv"
    csv.write_text("id,Prompts\n1,a cat\n2,a dog\n")
    assert load_prompts(f"drawbench={csv}") == ["a cat", "a dog"]  # DrawBench's default column
    js = tmp_path / "p.jsonl"
    js.write_text("\n".join(json.dumps({"prompt": p, "tag": "x"}) for p in ["one", "two"]))
    assert load_prompts(str(js)) == ["one", "two"]
    assert load_prompts(str(js), column="tag") == ["x", "x"]


def test_bad_prompt_sets(tmp_path):
    with pytest.raises(PromptSetError, match="valid names") as e:
        load_prompts("drawbnch")
    assert "testbed:val" in str(e.value) and "animal-activity" in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptSetError, match="is empty"):
        load_prompts(str(empty))
    csv = tmp_path / "p.csv"
    csv.write_text("id,caption\n1,a cat\n")
    with pytest.raises(PromptSetError, match=r"no column 'Prompts'; its columns are \['id', 'caption'\]"):
        load_prompts(f"drawbench={csv}")
    nocol = tmp_path / "q.csv"
    nocol.write_text("id,words\n1,a cat\n")
    with pytest.raises(PromptSetError, match="no prompt column"):
        load_prompts(str(nocol))
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptSetError, match="drawbench=FILE_OR_HUB_ID"):
        load_prompts("drawbench")
    assert {"coco", "geneval", "t2i-compbench", "drawbench"} <= set(available_sets())


def test_flow_grpo_folder_layout(tmp_path):
    # dataset/NAME/{train,test}.txt: the split picks the file; the recipe reads train / test from it
    folder = tmp_path / "dataset" / "ocr"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("a sign saying hello\na sign saying bye\n")
    (folder / "test.txt").write_text("a sign saying held out\n")
    assert load_prompts(str(folder)) == ["a sign saying hello", "a sign saying bye"]
    assert load_prompts(str(folder), split="test") == ["a sign saying held out"]
    with pytest.raises(PromptSetError, match=r"has no val\.txt \(it has test\.txt, train\.txt\)"):
        load_prompts(str(folder), split="val")


def test_recipe_prompts_go_through_the_same_loader(tmp_path, monkeypatch):
    # tpm train reads its prompt sets with tpm.loading.load_prompts, like tpm compare: check the calls
    import tpm.loading
    from tpm.app.train import main

    folder = tmp_path / "dataset" / "ocr"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("a\nb\n")
    (folder / "test.txt").write_text("c\n")
    calls = []

    def spy(spec, n=None, seed=0, column=None, split="train"):
        calls.append((spec, split, column))
        return load_prompts(spec, n, seed, column, split)

    def stop(*args, **kwargs):
        raise tpm.loading.LoadError("stop here")

    monkeypatch.setattr(tpm.loading, "load_prompts", spy)
    monkeypatch.setattr(tpm.loading, "load_model", stop)
    with pytest.raises(SystemExit, match="stop here"):
        main(["--train-prompts", str(folder), "--eval-prompts", str(folder), "--output-dir", str(tmp_path / "o"),
              "--report-to", "none"])
    assert calls == [(str(folder), "train", None), (str(folder), "test", None)]
