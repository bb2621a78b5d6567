import json

from vitquant.bench import ResultsStore, SweepSpec, run_sweep
from vitquant.report.accuracy import render_accuracy


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
