"""`pifa eval` and `pifa bench` end to end on tiny local models."""

import json
import math

import pytest
import torch

from helpers import CALIB_TEXT, char_tokenizer, make_dense_dir
from pifa.app.cli import main


@pytest.fixture
def dense_dir(tmp_path):
    return make_dense_dir(tmp_path)


def direct_perplexity(model, ids, seq_len):
    """Token-weighted mean of transformers' own loss over non-overlapping windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            window = ids[start: start + seq_len][None]
            total += float(model(input_ids=window, labels=window).loss) * (seq_len - 1)
            count += seq_len - 1
    return math.exp(total / count)


def test_eval_perplexity_matches_transformers(dense_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppl.json"
    assert main(["eval", str(dense_dir), "--ppl", str(tmp_path / "calib.txt"), "--seq-len", "32",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"][0]
    for field in ("ppl", "seq_len", "windows", "tokens", "dtype", "bos_handling", "tokenizer", "model"):
        assert field in result
    model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    ids = torch.tensor(char_tokenizer()(CALIB_TEXT, add_special_tokens=False)["input_ids"])
    assert result["ppl"] == pytest.approx(direct_perplexity(model, ids, 32), rel=1e-4)
    assert result["windows"] == ids.numel() // 32
    assert "ppl" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [(["--ppl", "nope.txt", "--seq-len", "32"], "is not a file, a folder or a known dataset"),
     (["--ppl", "calib.txt", "--seq-len", "100000"], "longer than the model's context"),
     (["--ppl", "short.txt", "--seq-len", "32"], "seq_len"),
     ([], "nothing to evaluate")],
)
def test_eval_bad_input(dense_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text("tiny text")
    assert main(["eval", str(dense_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_encoder_fidelity_of_an_unmodified_model_is_one(tmp_path, capsys):
    from helpers import tiny_model

    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "bert")
    char_tokenizer(64).save_pretrained(tmp_path / "bert")
    (tmp_path / "sentences.txt").write_text("\n".join(f"sentence number {w} about things" for w in "abcdefgh"))
    out = tmp_path / "fid.json"
    assert main(["eval", str(tmp_path / "bert"), "--sentences", str(tmp_path / "sentences.txt"),
                 "--dense", str(tmp_path / "bert"), "--device", "cpu", "--json", str(out)]) == 0
    fidelity = json.loads(out.read_text())["fidelity"]
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-6) and fidelity["top1_agreement"] == 1.0


TASK_YAML = """task: pifa_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_local_lm_eval_task_gives_the_directly_computed_accuracy(dense_dir, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    docs = [{"question": q, "choices": ["yes", "no", "maybe"], "answer": a}
            for q, a in [("is the fox quick", 0), ("is the dog lazy", 0), ("can a fox fly", 1),
                         ("is water dry", 1), ("will it rain", 2), ("is this a test", 0)]]
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pifa_toy.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "zs.json"
    assert main(["eval", str(dense_dir), "--tasks", "pifa_toy", "--include-path", str(tasks),
                 "--device", "cpu", "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["zero_shot"]["pifa_toy"]["acc"]

    model, tok = AutoModelForCausalLM.from_pretrained(dense_dir).eval(), char_tokenizer()
    correct = 0
    with torch.no_grad():
        for doc in docs:
            context = tok(doc["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
                logp = model(input_ids=torch.tensor([context + cont])).logits.log_softmax(-1)[0]
                scores.append(sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(cont)))
            correct += int(max(range(3), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(correct / len(docs))


def test_unknown_lm_eval_task(dense_dir, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    assert main(["eval", str(dense_dir), "--tasks", "no_such_task_xyz", "--device", "cpu"]) == 2
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err


def test_bench_layer_and_model_small(tmp_path, capsys):
    assert main(["bench", "layer", "--out-features", "64", "--in-features", "48", "--rank", "16", "--tokens", "1", "8",
                 "--dtypes", "float32", "--rounds", "1", "--repeats", "2", "--device", "cpu",
                 "--json", str(tmp_path / "l.json")]) == 0
    out = capsys.readouterr().out
    assert "lowrank/pifa" in out and "dense/pifa" in out and "lowrank/pifa range" in out
    assert len(json.loads((tmp_path / "l.json").read_text())["rows"]) == 2
    assert main(["bench", "model", "--hidden", "64", "--mlp", "128", "--blocks", "1", "--vocab", "100",
                 "--prefill", "16", "--decode", "2", "--rounds", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "decode_x" in out and "prefill_x" in out and "pifa@0.5" in out


@pytest.mark.parametrize("args", [["layer", "--rank", "0"], ["layer", "--tokens", "-1"], ["layer", "--repeats", "0"],
                                  ["model", "--hidden", "0"]])
def test_bench_shapes_must_be_positive(args, capsys):
    assert main(["bench", *args, "--device", "cpu"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_report_writes_markdown_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    quality = {"rows": [{"model": "tiny", "method": m, "density": d, "heldout": {"ppl": p}}
                        for m, d, p in [("dense", 1.0, 10.0), ("svd", 0.5, 20.0), ("svd", 0.7, 14.0),
                                        ("mpifa", 0.5, 15.0), ("mpifa", 0.7, 12.0)]]}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    assert main(["bench", "layer", "--out-features", "32", "--in-features", "32", "--rank", "8", "--tokens", "4",
                 "--dtypes", "float32", "--rounds", "1", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    assert main(["report", str(tmp_path / "q.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| method |" in report or "| model | method |" in report
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == ["b.png", "q_tiny.png"]
    (tmp_path / "bad.json").write_text("{}")
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "rep2")]) == 2
    assert "not a pifa results file" in capsys.readouterr().err and not (tmp_path / "rep2").exists()


def test_report_single_density_comparison_plots_bars(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [{"model": "tiny", "method": m, "density": d, "cosine": c}
            for m, d, c in [("dense", 1.0, 1.0), ("mpifa", 0.5, 0.8), ("sparsegpt@2:4", 0.5, 0.86)]]
    (tmp_path / "s.json").write_text(json.dumps({"rows": rows}))
    assert main(["report", str(tmp_path / "s.json"), "--out", str(tmp_path / "rep")]) == 0
    assert [p.name for p in (tmp_path / "rep").glob("*.png")] == ["s_tiny.png"]
    assert "sparsegpt@2:4" in (tmp_path / "rep" / "report.md").read_text()


def test_report_allocation_matrix_plots_a_panel_per_method(tmp_path):
    """Several methods x allocations x densities: one figure with a panel per method (a line per allocation)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [{"model": "tiny", "method": "dense", "density": 1.0, "allocation": "-", "ppl": 10.0},
            {"model": "tiny", "method": "sparsegpt@2:4", "density": 0.5, "allocation": "uniform", "ppl": 20.0}]
    rows += [{"model": "tiny", "method": m, "density": d, "allocation": a, "ppl": 30.0 - 10 * d - i}
             for m in ("svd-llm", "mpifa") for i, a in enumerate(("uniform", "sensitivity")) for d in (0.5, 0.7)]
    (tmp_path / "m.json").write_text(json.dumps({"rows": rows}))
    figures = []
    real_save = plt.Figure.savefig

    def save(fig, *args, **kwargs):
        figures.append([(ax.get_title(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes])
        return real_save(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", save)
        assert main(["report", str(tmp_path / "m.json"), "--out", str(tmp_path / "rep")]) == 0
    assert [p.name for p in (tmp_path / "rep").glob("*.png")] == ["m_tiny.png"]
    assert figures == [[(m, ["uniform", "sensitivity", "sparsegpt@2:4", "dense"]) for m in ("svd-llm", "mpifa")]]
