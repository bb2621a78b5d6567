import json

from vitquant.bench import ResultsStore, SweepSpec, run_sweep
from vitquant.report.accuracy import render_accuracy, render_summary


def test_sweep_resumes_and_never_repeats(tmp_path, monkeypatch, tiny_vit_factory):
    import vitquant.bench as bench

    loads = []

    def fake_load(name):
        loads.append(name)
        return tiny_vit_factory(depth=1, embed_dim=32)

    monkeypatch.setattr(bench, "load_model", fake_load)
    store_path = tmp_path / "runs.jsonl"
    spec = SweepSpec(models=["tiny"], methods=["minmax"], bits=["w8a8", "w4a4"], seeds=[0], stress=True,
                     calib_size=8)
    run_sweep(spec, ResultsStore(store_path), progress=False)
    lines = store_path.read_text().splitlines()
    # float + 2 bit widths, for the natural and the stress variant
    assert len(lines) == 6
    recs = [json.loads(x) for x in lines]
    assert {r["variant"] for r in recs} == {"natural", "stress S=30"}
    assert all(0 <= r["top1"] <= 100 for r in recs)
    # a crash mid-write leaves a cut line: it is ignored and the run redone; finished runs are not repeated
    with open(store_path, "a") as f:
        f.write('{"model": "tiny", "vari')
    store = ResultsStore(store_path)
    assert len(store.records) == 6
    spec.seeds = [0, 1]
    run_sweep(spec, store, progress=False)
    assert len(store.records) == 10  # only the seed-1 runs were added
    assert len(ResultsStore(store_path).records) == 10  # and the file is intact
    md = render_accuracy(store.records)
    assert "### tiny — natural" in md and "W4A4" in md and "minmax" in md
    assert "### Tiny ViT — natural" in render_accuracy(store.records, labels={"tiny": "Tiny ViT"})
    summary = render_summary(store.records, bits=("W4A4",)).splitlines()
    assert "| tiny W4A4 | tiny stress W4A4 |" in summary[0] and summary[2].startswith("| float (FP32)")
    assert len(summary) == 2 + 1 + len(spec.methods)  # header, rule, float, one row per method


def test_sweep_method_options_are_validated_and_kept_as_their_own_row(tmp_path, monkeypatch, tiny_vit_factory):
    import pytest

    import vitquant.bench as bench
    from vitquant.errors import VitquantError

    with pytest.raises(VitquantError):
        SweepSpec(models=["tiny"], methods=["repq-vit:no_such_option=1"])
    monkeypatch.setattr(bench, "load_model", lambda name: tiny_vit_factory(depth=1, embed_dim=32))
    spec = SweepSpec(models=["tiny"], methods=["repq-vit", "repq-vit:reparam_head=true"], bits=["w4a4"],
                     seeds=[0], stress=False, calib_size=8)
    store = ResultsStore(tmp_path / "runs.jsonl")
    run_sweep(spec, store, progress=False)
    assert [r["method"] for r in store.records] == ["float", "repq-vit", "repq-vit:reparam_head=true"]
    assert "| repq-vit:reparam_head=true |" in render_accuracy(store.records)


def _rec(seed, top1, **kw):
    return {"model": "m", "variant": "natural", "method": "minmax", "bits": "W4A4", "seed": seed, "calib_size": 32,
            "top1": top1, "agreement": 90.0, **kw}


def test_summaries_count_each_run_once():
    from vitquant.bench import summarize

    # regression: two unlocked sweeps wrote seed 0 twice; the table said "3 seeds" and weighted it double
    records = [_rec(0, 10.0), _rec(1, 20.0), _rec(0, 10.0, finished="later")]
    s = summarize(records)[("m", "natural", "minmax", "W4A4")]
    assert s["n"] == 2 and s["top1"] == 15.0
    assert "mean over 2 calibration seeds" in render_accuracy(records)


def test_store_refuses_a_file_that_is_not_a_store_and_leaves_it_alone(tmp_path):
    import pytest

    from vitquant.errors import VitquantError

    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\nno trailing newline")
    with pytest.raises(VitquantError, match="not a vitquant results store"):
        ResultsStore(notes)
    assert notes.read_text() == "# my notes\nno trailing newline"


def test_store_reads_what_another_writer_appended(tmp_path):
    a, b = ResultsStore(tmp_path / "s.jsonl"), ResultsStore(tmp_path / "s.jsonl")
    a.append(_rec(0, 10.0))
    with b.claim(_rec(0, 10.0)) as mine:
        assert not mine  # finished by the other writer: seen when claiming
    b.append(_rec(1, 20.0))
    assert [r["seed"] for r in b.records] == [0, 1]
    assert [r["seed"] for r in ResultsStore(tmp_path / "s.jsonl").records] == [0, 1]


def test_a_store_with_its_own_key_reopens_its_records(tmp_path):
    """Benchmarks keep other records (architectures: family × method) under their own key: reopening such
    a store to resume must read them, and a record without the key's fields is still refused."""
    import pytest

    from vitquant.errors import VitquantError

    def key(r):
        return r["family"], r["method"]

    path = tmp_path / "arch.jsonl"
    ResultsStore(path, key=key).append({"family": "timm Swin", "method": "minmax", "cosine": 0.999})
    again = ResultsStore(path, key=key)
    assert again.done({"family": "timm Swin", "method": "minmax"}) and len(again.records) == 1
    with pytest.raises(VitquantError, match="not a vitquant results store"):
        ResultsStore(path)  # the default key needs model/variant/method/bits/seed


def test_refused_runs_are_kept_and_shown_not_averaged():
    from vitquant.bench import summarize
    from vitquant.report.accuracy import render_accuracy

    base = {"model": "m", "variant": "natural", "bits": "W4A4"}
    recs = [{**base, "method": "float", "bits": "FP32", "seed": 0, "top1": 90.0},
            {**base, "method": "a", "seed": 0, "top1": 80.0, "agreement": 90.0},
            {**base, "method": "fq-vit", "seed": 0, "refused": "fq-vit: explicit matmuls"}]
    s = summarize(recs)
    assert s[("m", "natural", "fq-vit", "W4A4")] == {"refused": "fq-vit: explicit matmuls", "n": 0}
    assert "| fq-vit       | refused |" in render_accuracy(recs)
